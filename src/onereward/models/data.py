"""The old name of `models/tensors.py`, kept only because each registered model carries the serving code of its
day (MLflow models from code): versions registered before the rename import `to_pngs` / `to_tensor` from here.
New code imports `onereward.models.tensors`."""

from onereward.models.tensors import to_pngs, to_tensor

__all__ = ["to_pngs", "to_tensor"]
