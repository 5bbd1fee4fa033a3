"""The one call every orchestrator task makes: run stage NAME from input URIs to output URIs."""

from __future__ import annotations

import json

from onereward.config import load_config
from onereward.pipeline import GRAPH


def run_stage(name: str, config: str, overrides: str | list[str], inputs: dict[str, str],
              outputs: dict[str, str]) -> dict:
    from onereward.runner import execute_stage

    ovs = json.loads(overrides) if isinstance(overrides, str) else list(overrides)
    outcome = execute_stage(GRAPH.get(name), load_config(config, ovs), inputs, outputs)
    return {"status": outcome.status, "key": outcome.key, "outputs": outcome.outputs, "metrics": outcome.metrics}
