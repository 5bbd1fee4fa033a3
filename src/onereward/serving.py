"""MLflow pyfunc for the generator, logged as "models from code" (no pickled Python objects).

Input: a DataFrame with columns `image` and `mask` (base64 PNG or JPEG; mask white = generate, the image's size),
`prompt` and `task` (fill | extend | removal | text). Params: steps, guidance, negative_prompt, seed.
Output: a DataFrame with column `image` (base64 PNG). A malformed row (unknown task, not an image, a mask of
another size, an empty mask, an image of another size than the model generates) is refused with a message that
names the row and field; `mlflow models serve` answers it with HTTP 400.
Served with `mlflow models serve -m models:/onereward-generator@champion --env-manager local`.
"""

from __future__ import annotations

import base64
import binascii

import mlflow
import pandas as pd

TASK_PROMPT = {"extend": "extend"}  # what a task's prompt is when the request leaves it empty


def _refuse(message: str):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    raise MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _decode(value, row: int, field: str, mode: str):
    from onereward.data.images import try_from_png

    try:
        data = base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError):
        _refuse(f"row {row}: field {field!r} is not base64")
    arr = try_from_png(data, mode)
    if arr is None:
        _refuse(f"row {row}: field {field!r} is not a PNG or JPEG image")
    return arr


class GeneratorModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from onereward.models.generator import load_generator

        self.generator = load_generator(context.artifacts["generator"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        import numpy as np
        import torch

        from onereward.config import TASKS
        from onereward.models.tensors import to_pngs

        missing = {"image", "mask", "prompt", "task"} - set(model_input.columns)
        if missing:
            _refuse(f"missing column(s) {sorted(missing)}; expected image, mask, prompt, task")
        size = self.generator.image_size
        images, masks, prompts = [], [], []
        for i, row in enumerate(model_input.itertuples(index=False)):
            if row.task not in TASKS:
                _refuse(f"row {i}: task {row.task!r}: expected one of {', '.join(TASKS)}")
            img, mask = _decode(row.image, i, "image", "RGB"), _decode(row.mask, i, "mask", "L")
            if img.shape[:2] != (size, size):
                _refuse(f"row {i}: image is {img.shape[1]}x{img.shape[0]}; this model generates {size}x{size}")
            if mask.shape != img.shape[:2]:
                _refuse(f"row {i}: mask is {mask.shape[1]}x{mask.shape[0]}, the image {img.shape[1]}x{img.shape[0]}")
            if not (mask > 127).any():
                _refuse(f"row {i}: mask is empty (no white pixel): nothing to generate")
            images.append(img)
            masks.append(mask)
            prompts.append(str(row.prompt or "") or TASK_PROMPT.get(row.task, ""))
        p = {"steps": 4, "guidance": 1.0, "negative_prompt": "", "seed": 0, **(params or {})}
        x = torch.from_numpy(np.stack(images).astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
        m = torch.from_numpy((np.stack(masks) > 127).astype(np.float32))[:, None]
        out = self.generator.sample(x, m, prompts, steps=int(p["steps"]), guidance=float(p["guidance"]),
                                    negative_prompt=str(p["negative_prompt"]), seed=int(p["seed"]))
        return pd.DataFrame({"image": [base64.b64encode(b).decode() for b in to_pngs(out)]})


mlflow.models.set_model(GeneratorModel())
