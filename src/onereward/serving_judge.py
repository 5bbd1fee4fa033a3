"""MLflow pyfunc for the judge, logged as "models from code" (no pickled Python objects).

Input: a DataFrame with columns `image_a`, `image_b` (base64 PNG), `task`, `criterion`, `prompt` (the
condition's prompt) and `masked_input` (base64 PNG: the condition's image with the masked region blanked, what
the judge is shown before each of the two images).
Output: a DataFrame with column `p_a_better`: P(image A better than B), asked in both orders and averaged
(OneReward's reward is the judge's P(Yes); averaging the two orders removes the position bias).
"""

from __future__ import annotations

import base64

import mlflow
import pandas as pd


class JudgeModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from onereward.models.judge import Judge

        self.judge = Judge.load(context.artifacts["judge"])
        self.judge.model.eval()

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        import torch

        from onereward.models.judge import Query
        from onereward.models.tensors import to_tensor

        def images(column: str) -> torch.Tensor:
            return to_tensor([base64.b64decode(v) for v in model_input[column]])

        a, b = images("image_a"), images("image_b")
        q = Query(list(model_input["task"]), list(model_input["criterion"]), list(model_input["prompt"]),
                  images("masked_input"))
        with torch.no_grad():
            p_ab, p_ba = self.judge.p_yes_both_orders(a, b, q)
            p = (p_ab + 1 - p_ba) / 2
        return pd.DataFrame({"p_a_better": p.cpu().numpy()})  # a pretrained judge sits on a GPU if there is one


mlflow.models.set_model(JudgeModel())
