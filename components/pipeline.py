"""Compile the OneReward KFP v2 pipeline (built from the pipeline graph) to YAML.

    python -m components.pipeline --profile flux --output pipeline.yaml \
        --image ghcr.io/onereward/onereward:0.1.0 --gpu-image ghcr.io/onereward/onereward:0.1.0-gpu
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    from onereward.config import load_config
    from onereward.orchestration.kfp_pipeline import compile_pipeline

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="flux", help="profile whose resources (node pools, GPU) apply")
    p.add_argument("--output", default="pipeline.yaml")
    p.add_argument("--image", default="ghcr.io/onereward/onereward:0.1.0")
    p.add_argument("--gpu-image", default="ghcr.io/onereward/onereward:0.1.0-gpu")
    args = p.parse_args(argv)
    compile_pipeline(args.output, load_config(args.profile), args.image, args.gpu_image)
    print(f"compiled {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
