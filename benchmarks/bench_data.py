"""Throughput of curate + synthesize_masks on a folder of real photo crops, and its ratio to the pure
decode + encode time of the same images (target <= 1.5x).

Two numbers: "cold" includes one-off start-up (importing great-expectations, creating the MLflow sqlite
store), "warm" is a second, equal-sized run in the same process, i.e. the per-image cost a long
curation job pays.

    .venv/bin/python benchmarks/bench_data.py [--images 600] [--size 256]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_folder(root: Path, n: int, size: int) -> list[Path]:
    from onereward.data import procedural

    rng = np.random.default_rng(0)
    names = procedural.photo_names()
    paths = []
    for i in range(n):
        img = procedural._crop(rng, procedural._photo(str(rng.choice(names))), size)
        p = root / f"img_{i:05d}.jpg"
        Image.fromarray(img).save(p, quality=90)
        paths.append(p)
    return paths


def pure_decode_encode(paths: list[Path], out_size: int) -> float:
    from onereward.data.images import center_square, to_png

    t = time.perf_counter()
    for p in paths:
        with Image.open(p) as im:
            to_png(center_square(im.convert("RGB"), out_size))
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    os.environ["ONEREWARD_HOME"] = str(work / "home")
    folder = work / "images"
    folder.mkdir()
    paths = make_folder(folder, args.images, args.size)

    from onereward.config import load_config
    from onereward.pipeline import GRAPH
    from onereward.runner import execute_stage

    s = load_config("tiny", [f"curate.sources=[{{kind: folder, path: '{folder}'}}]", "curate.dedup_hamming=0"])
    base = pure_decode_encode(paths, s.image_size)
    for label in ("cold", "warm"):
        out = work / label
        t = time.perf_counter()
        cur = execute_stage(GRAPH.get("curate"), s, {}, {"curated": str(out / "curated")})
        masks = execute_stage(GRAPH.get("synthesize_masks"), s, {"curated": str(out / "curated")},
                              {"conditions": str(out / "conditions")})
        stage = time.perf_counter() - t
        print(f"[{label}] images: {args.images} ({args.size}px JPEG -> {s.image_size}px), "
              f"kept {cur.metrics['images_kept']:.0f}, conditions {masks.metrics['conditions']:.0f}; "
              f"curate {cur.seconds:.2f}s + synthesize_masks {masks.seconds:.2f}s (with MLflow + validation)")
        print(f"[{label}] curate+masks: {args.images / stage:.1f} images/s; "
              f"pure decode+encode: {args.images / base:.1f} images/s; "
              f"ratio stage/decode+encode: {stage / base:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
