"""MLflow pyfunc for the generator, logged as "models from code" (no pickled Python objects).

Input: a DataFrame with columns `image` and `mask` (base64 PNG; mask 255 = generate) and `prompt`.
Params: steps, guidance, negative_prompt, seed. Output: a DataFrame with column `image` (base64 PNG).
Served with `mlflow models serve -m models:/onereward-generator@champion --env-manager local`.
"""

from __future__ import annotations

import base64

import mlflow
import pandas as pd


class GeneratorModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from onereward.models.generator import load_generator

        self.generator = load_generator(context.artifacts["generator"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from onereward.models.data import to_pngs, to_tensor

        p = {"steps": 4, "guidance": 1.0, "negative_prompt": "", "seed": 0, **(params or {})}
        images = to_tensor([base64.b64decode(v) for v in model_input["image"]])
        masks = to_tensor([base64.b64decode(v) for v in model_input["mask"]], "L")
        out = self.generator.sample(images, masks, list(model_input["prompt"]), steps=int(p["steps"]),
                                    guidance=float(p["guidance"]), negative_prompt=str(p["negative_prompt"]),
                                    seed=int(p["seed"]))
        return pd.DataFrame({"image": [base64.b64encode(b).decode() for b in to_pngs(out)]})


mlflow.models.set_model(GeneratorModel())
