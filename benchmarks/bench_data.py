"""Throughput of curate + synthesize_masks on a folder of real photo crops, and its ratio to the pure
decode + encode time of the same images (target <= 1.5x).

"cold" includes one-off start-up (importing great-expectations, creating the MLflow sqlite store); "warm"
are further, equal-sized runs in the same process, each beside a new measurement of the pure decode +
encode (this VM's speed moves between seconds; the best of each is compared). A second ratio is to the
codec floor: every PNG decode and encode the two stages cannot avoid (decode and encode each source
image, decode each curated image once, encode each condition's new mask and target). The same is measured at
twice the images, and the marginal ratio (extra stage time over extra decode+encode time) is what each further
image costs, the stages' fixed cost (MLflow run, validation suites, commit) cancelled. curate decodes a JPEG at
the smallest DCT scale that keeps twice the output side (1/4 at 256 -> 32 px); the ratio to that decode + encode
is printed too, so the gain from decoding less and the stages' own overhead can be told apart.

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


def pure_decode_encode(paths: list[Path], out_size: int, reduce_to: int = 0) -> float:
    """Seconds to decode each file in full (with `reduce_to`: as curate does, a JPEG at a reduced DCT scale),
    square and resize it, and encode the PNG."""
    from onereward.data.images import center_square, decode_guarded, to_png

    t = time.perf_counter()
    for p in paths:
        if reduce_to:
            to_png(center_square(decode_guarded(p.read_bytes(), p.name, min_side=1, max_pixels=2**40,
                                                reduce_to=reduce_to), out_size))
            continue
        with Image.open(p) as im:
            to_png(center_square(im.convert("RGB"), out_size))
    return time.perf_counter() - t


def condition_codec(curated: str, conditions: str) -> float:
    """Seconds to decode each curated image once and encode each condition's mask and new target."""
    from onereward import storage
    from onereward.data.images import from_png, to_png

    images = [r["image"] for r in storage.Artifact(curated).read_table().to_pylist()]
    made = []
    for r in storage.Artifact(conditions).read_table().to_pylist():
        made.append(from_png(r["mask"], "L"))
        if r["target"] is not None and r["target"] != r["image"]:
            made.append(from_png(r["target"]))
    t = time.perf_counter()
    for png in images:
        from_png(png)
    for arr in made:
        to_png(arr)
    return time.perf_counter() - t


def measure(work: Path, paths: list[Path], repeats: int, size: int) -> dict[str, float]:
    """Best of `repeats` warm runs (after one cold run) of both stages on `paths`, each beside its own
    decode+encode and codec-floor measurement: seconds under "stage", "base" and "floor"."""
    from onereward.config import load_config
    from onereward.pipeline import GRAPH
    from onereward.runner import execute_stage
    from onereward.stages.curate import DECODE_OVERSAMPLE

    folder = paths[0].parent
    s = load_config("tiny", [f"curate.sources=[{{kind: folder, path: '{folder}'}}]", "curate.dedup_hamming=0"])
    best: dict[str, float] = {}
    for i in range(1 + repeats):
        label = "cold" if i == 0 else f"warm {i}"
        out = work / f"{folder.name}-run{i}"
        base = pure_decode_encode(paths, s.image_size)
        reduced = pure_decode_encode(paths, s.image_size, reduce_to=DECODE_OVERSAMPLE * s.image_size)
        t = time.perf_counter()
        cur = execute_stage(GRAPH.get("curate"), s, {}, {"curated": str(out / "curated")})
        masks = execute_stage(GRAPH.get("synthesize_masks"), s, {"curated": str(out / "curated")},
                              {"conditions": str(out / "conditions")})
        stage = time.perf_counter() - t
        floor = base + condition_codec(str(out / "curated"), str(out / "conditions"))
        print(f"[{label}] images: {len(paths)} ({size}px JPEG -> {s.image_size}px), "
              f"kept {cur.metrics['images_kept']:.0f}, conditions {masks.metrics['conditions']:.0f}; "
              f"curate {cur.seconds:.2f}s + synthesize_masks {masks.seconds:.2f}s (with MLflow + validation); "
              f"decode+encode {base:.2f}s (JPEG at curate's reduced scale {reduced:.2f}s), codec floor {floor:.2f}s")
        if i:
            for k, v in (("stage", stage), ("base", base), ("floor", floor), ("reduced", reduced)):
                best[k] = min(best.get(k, v), v)
    n = len(paths)
    print(f"[warm, best of {repeats}, {n} images] curate+masks: {n / best['stage']:.1f} images/s; "
          f"pure decode+encode: {n / best['base']:.1f} images/s; "
          f"ratio stage/decode+encode: {best['stage'] / best['base']:.2f}x (target <= 1.5x); "
          f"ratio stage/codec floor: {best['stage'] / best['floor']:.2f}x; "
          f"ratio stage/decode+encode at curate's reduced JPEG scale: {best['stage'] / best['reduced']:.2f}x")
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="warm runs")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    os.environ["ONEREWARD_HOME"] = str(work / "home")
    runs = []
    for n in (args.images, 2 * args.images):
        folder = work / f"images-{n}"
        folder.mkdir()
        runs.append(measure(work, make_folder(folder, n, args.size), args.repeats, args.size))
    # What each further image costs: the fixed cost of a stage (MLflow run, validation suites, commit) cancels.
    small, large = runs
    extra_base = large["base"] - small["base"]
    # the doubled decode+encode must take clearly longer, or the ratio divides by the VM's noise
    ratio = (f"{(large['stage'] - small['stage']) / extra_base:.2f}x" if extra_base > 0.25 * small["base"]
             else f"not measurable (decode+encode {small['base']:.2f}s -> {large['base']:.2f}s: noise)")
    print(f"[marginal, {args.images} -> {2 * args.images} images] stage/decode+encode: {ratio}; "
          f"fixed cost of the two stages ~{2 * small['stage'] - large['stage']:.2f}s")


if __name__ == "__main__":
    main()
