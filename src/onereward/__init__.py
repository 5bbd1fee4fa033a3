"""onereward: the training system for unified mask-guided image generation (OneReward method)."""

import os

# One progress display per stage (the stage's own): the libraries' save/load bars read this at import.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # registering a model printed 9 bar lines
