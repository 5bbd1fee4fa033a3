"""Registering generators in the MLflow model registry (pyfunc from code + safetensors weights)."""

from __future__ import annotations

import base64
import contextlib
import io
import sys
import warnings
from pathlib import Path
from typing import TextIO

from onereward.data.images import to_png

SERVING_CODE = Path(__file__).resolve().parents[1] / "serving.py"
JUDGE_CODE = Path(__file__).resolve().parents[1] / "serving_judge.py"
PIP_REQUIREMENTS = ["torch==2.13.0", "diffusers==0.42.1", "transformers==5.24.0", "safetensors==0.8.0",
                    "pillow==13.0.0", "onereward==0.1.0"]


def example_input(image_size: int):
    import numpy as np
    import pandas as pd

    img = np.full((image_size, image_size, 3), 127, np.uint8)
    mask = np.zeros((image_size, image_size), np.uint8)
    mask[: image_size // 2] = 255
    return pd.DataFrame({"image": [base64.b64encode(to_png(img)).decode()],
                         "mask": [base64.b64encode(to_png(mask)).decode()], "prompt": ["extend"], "task": ["extend"]})


# What MLflow prints to stderr while it registers: said once, in the stage's own line, instead
MLFLOW_REGISTRY_LINES = ("Successfully registered model", "Registered model", "Created version")


class _WithoutLines(io.TextIOBase):
    """A text stream passing each complete line on to `to` as it is written, less those starting with
    `prefixes`: nothing else is held back, so a hang or a kill loses no line."""

    def __init__(self, to: TextIO, prefixes: tuple[str, ...]):
        self.to, self.prefixes, self.partial = to, prefixes, ""

    def write(self, text: str) -> int:
        *lines, self.partial = (self.partial + text).split("\n")
        for line in lines:
            if not line.startswith(self.prefixes):
                self.to.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self.partial and not self.partial.startswith(self.prefixes):
            self.to.write(self.partial)
        self.partial = ""
        self.to.flush()


def _log_and_register(code: Path, artifacts: dict[str, str], name: str, alias: str, signature,
                      tags: dict[str, str] | None) -> str:
    import mlflow

    quiet = _WithoutLines(sys.stderr, MLFLOW_REGISTRY_LINES)
    try:
        with contextlib.redirect_stderr(quiet), warnings.catch_warnings():
            # the signature is given; an input example would make MLflow load and run the model to check it.
            # MLflow colours the message: it does not start with its first word
            warnings.filterwarnings("ignore", message=r".*An input example was not provided")
            info = mlflow.pyfunc.log_model(
                name=next(iter(artifacts)), python_model=str(code), artifacts=artifacts, signature=signature,
                pip_requirements=PIP_REQUIREMENTS, registered_model_name=name,
            )
    finally:
        quiet.flush()
    version = str(info.registered_model_version)
    run = mlflow.active_run()
    stage = f"{run.info.run_name}: " if run else ""
    print(f"{stage}registered {name} version {version}", flush=True)
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(name, alias, version)
    print(f"{stage}{name}@{alias} -> version {version}", flush=True)
    for k, v in (tags or {}).items():
        client.set_model_version_tag(name, version, k, v)
    return version


def register_generator(model_dir: str | Path, name: str, alias: str, image_size: int,
                       tags: dict[str, str] | None = None) -> str:
    """Log the generator folder as a pyfunc under the active run, register it, point `alias` at it."""
    import pandas as pd
    from mlflow.models import infer_signature

    signature = infer_signature(example_input(image_size), pd.DataFrame({"image": ["..."]}),
                                params={"steps": 4, "guidance": 1.0, "negative_prompt": "", "seed": 0})
    return _log_and_register(SERVING_CODE, {"generator": str(model_dir)}, name, alias, signature, tags)


def judge_example(image_size: int):
    import numpy as np
    import pandas as pd

    pngs = [base64.b64encode(to_png(np.full((image_size, image_size, 3), v, np.uint8))).decode()
            for v in (60, 190, 127)]
    return pd.DataFrame({"image_a": [pngs[0]], "image_b": [pngs[1]], "task": ["fill"], "criterion": ["alignment"],
                         "prompt": ["fill red"], "masked_input": [pngs[2]]})


def register_judge(model_dir: str | Path, name: str, alias: str, image_size: int,
                   tags: dict[str, str] | None = None) -> str:
    """Log the judge folder as a pyfunc scoring (image A, image B, task, criterion, prompt, masked input)
    -> P(A better)."""
    import pandas as pd
    from mlflow.models import infer_signature

    signature = infer_signature(judge_example(image_size), pd.DataFrame({"p_a_better": [0.5]}))
    return _log_and_register(JUDGE_CODE, {"judge": str(model_dir)}, name, alias, signature, tags)
