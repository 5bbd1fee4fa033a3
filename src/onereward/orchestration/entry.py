"""The calls orchestrator tasks make: plan every stage's URIs once, then run stage NAME from input URIs to
output URIs."""

from __future__ import annotations

import json

from onereward.config import load_config
from onereward.pipeline import GRAPH, Graph


def _overrides(overrides: str | list[str]) -> list[str]:
    return json.loads(overrides) if isinstance(overrides, str) else list(overrides)


def plan_uris(config: str, overrides: str | list[str], graph: Graph = GRAPH) -> dict[str, dict]:
    """{stage: {"key", "inputs": {name: URI}, "outputs": {name: URI}}}, keyed like the local runner
    (`{root}/{stage}/{key}/{artifact}`), so a rerun with unchanged inputs finds its outputs cached."""
    from onereward.runner import plan

    return {p.stage.name: {"key": p.key, "inputs": p.inputs, "outputs": p.outputs}
            for p in plan(load_config(config, _overrides(overrides)), graph)}


def run_stage(name: str, config: str, overrides: str | list[str], inputs: dict[str, str],
              outputs: dict[str, str]) -> dict:
    from onereward.runner import execute_stage

    outcome = execute_stage(GRAPH.get(name), load_config(config, _overrides(overrides)), inputs, outputs)
    return {"status": outcome.status, "key": outcome.key, "outputs": outcome.outputs, "metrics": outcome.metrics}
