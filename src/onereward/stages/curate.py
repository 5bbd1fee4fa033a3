"""curate: ingest images from the configured sources, drop bad ones with a counted reason, write shards."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import NoReturn

import numpy as np
import pandas as pd
from rich.progress import track

from onereward import storage, tracking
from onereward.config import FolderSource, ManifestSource, ProceduralSource, Settings
from onereward.data import procedural, schema, validation
from onereward.data.images import ImageRejected, center_square, decode_guarded, hamming, phash, to_png, try_from_png
from onereward.data.parallel import ordered_map
from onereward.stages import StageContext

# (source, origin, load): load() returns the encoded image or a drawn scene, or raises ImageRejected (a counted
# drop). Loading is left to the workers (prepare), so reads and decodes of several images overlap.
Item = tuple[str, str, Callable[[], bytes | procedural.Scene]]
MAX_FILE_BYTES = 64 * 1024 * 1024
# A JPEG decodes at a reduced DCT scale keeping this many times the output side, so the resize still filters
# (256 -> 64 -> 32 px: decoding 2.5x faster, 0.77/255 mean change; README, Benchmarks)
DECODE_OVERSAMPLE = 2


def _rejected(reason: str, detail: str) -> Callable[[], NoReturn]:
    def load() -> NoReturn:
        raise ImageRejected(reason, detail)

    return load


def _draw(seed: int, i: int, size: int, src: ProceduralSource) -> procedural.Scene:
    return procedural.scene(np.random.default_rng([seed, i]), size, src.photos, src.clipart)


def _procedural(src: ProceduralSource, s: Settings) -> Iterator[Item]:
    # the scenes' cached assets are loaded here, once, before the workers draw from them
    if src.photos:
        procedural.photo_names()
    if src.clipart:
        procedural.clipart_files()
    for i in range(src.count):
        yield "procedural", f"scene:{i}", partial(_draw, s.seed, i, s.image_size, src)


def _read_guarded(uri: str, name: str) -> bytes:
    """The bytes of one source image. A missing file is a counted drop; any other storage error (after
    the storage module's retries) fails the stage, because a flaky bucket is not bad data."""
    try:
        if storage.file_size(uri) > MAX_FILE_BYTES:
            raise ImageRejected("too_large", f"{name} is over {MAX_FILE_BYTES} bytes")
        return storage.read_bytes(uri)
    except FileNotFoundError as e:
        raise ImageRejected("missing", f"{name}: {e}") from None


def _files(root: Path) -> list[tuple[str, bool]]:
    """(path, is a symlink) of each file under root not named .*, in path order, from the directory entries
    alone (a stat a file is slow on network and overlay filesystems). As `Path.rglob`: linked folders are not
    entered, unreadable folders and entries (a link loop) are skipped, paths read as `root / name` does."""
    found, todo = [], [str(root)]
    while todo:
        try:
            with os.scandir(todo.pop()) as listing:
                entries = list(listing)
        except OSError:
            continue
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    todo.append(e.path)
                elif not e.name.startswith(".") and e.is_file():
                    found.append((Path(e.path), e.is_symlink()))
            except OSError:
                continue
    return [(str(p), link) for p, link in sorted(found, key=lambda f: f[0])]


def _folder(src: FolderSource) -> Iterator[Item]:
    root = Path(src.path)
    if not root.is_dir():
        raise FileNotFoundError(f"curate: folder source {src.path!r} does not exist")
    real_root = root.resolve()
    for p, link in _files(root):
        if link and not Path(p).resolve().is_relative_to(real_root):
            yield "folder", p, _rejected("outside_source", f"{p} links outside {real_root}")
            continue
        yield "folder", p, partial(_read_guarded, p, p)


def _manifest(src: ManifestSource) -> Iterator[Item]:
    tbl = storage.read_parquet_uri(src.uri)
    if src.column not in tbl.column_names:
        raise ValueError(f"manifest {src.uri}: missing column {src.column!r} (has {tbl.column_names})")
    uris = tbl.column(src.column).to_pylist()
    bad = [(i, u) for i, u in enumerate(uris) if u and "://" in u and not u.startswith(("s3://", "file://"))]
    if bad:
        rows = ", ".join(f"row {i}: {u!r}" for i, u in bad[:5])
        raise ValueError(f"manifest {src.uri}: {len(bad)} URI(s) with an unsupported scheme (supported: s3://, "
                         f"file://, local paths): {rows}")
    for i, uri in enumerate(uris):
        if not uri:
            yield "manifest", f"{src.uri}#row{i}", _rejected("empty_uri", f"row {i}: empty URI")
            continue
        yield "manifest", uri, partial(_read_guarded, uri, f"{uri} (manifest row {i})")


def iter_sources(s: Settings) -> Iterator[Item]:
    for src in s.curate.sources:
        if isinstance(src, ProceduralSource):
            yield from _procedural(src, s)
        elif isinstance(src, FolderSource):
            yield from _folder(src)
        else:
            yield from _manifest(src)


def source_fingerprint(s: Settings) -> list:
    """What the sources hold now (folder listings, manifest bytes, installed clipart), hashed into the key."""
    out = []
    for src in s.curate.sources:
        if isinstance(src, ProceduralSource) and src.clipart:
            out.append(["clipart", procedural.asset_fingerprint(procedural.clipart_files())])
        elif isinstance(src, FolderSource):
            root = Path(src.path)
            files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
            stats = [(p, p.stat()) for p in files]
            listing = "\n".join(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}" for p, st in stats)
            out.append(["folder", src.path, hashlib.sha256(listing.encode()).hexdigest()[:16]])
        elif isinstance(src, ManifestSource):
            # the manifest's own bytes: a new manifest (new URIs) is new data
            data = storage.read_bytes(src.uri) if storage.exists(src.uri) else b""
            out.append(["manifest", src.uri, hashlib.sha256(data).hexdigest()[:16]])
    return out


def source_count(s: Settings) -> int | None:
    if all(isinstance(src, ProceduralSource) for src in s.curate.sources):
        return sum(src.count for src in s.curate.sources)  # type: ignore[union-attr]
    return None


@dataclass
class Prepared:
    """One source item made ready for the sequential part of curation (dedup, ids), or why it is dropped."""

    source: str
    origin: str
    drop: tuple[str, str] | None = None  # (reason, detail)
    png: bytes = b""
    shape: tuple[int, ...] = ()
    phash: int = 0
    extra: dict = field(default_factory=dict)


def prepare(item: Item, s: Settings) -> Prepared:
    """Load, decode, square, hash and encode one item (duplicates too: they are found after). Writes no shared
    state and reads only caches loaded before (iter_sources): runs on several cores (ordered_map)."""
    source, origin, load = item
    extra: dict = {"background": None, "object_mask": None, "object_label": None}
    try:
        payload = load()
        if isinstance(payload, procedural.Scene):
            arr = payload.image
            extra = {"background": to_png(payload.background),
                     "object_mask": to_png(payload.object_mask.astype(np.uint8) * 255),
                     "object_label": payload.object_label}
            origin = f"{origin}:{payload.recipe}"
        else:
            im = decode_guarded(payload, origin, min_side=s.curate.min_side, max_pixels=s.curate.max_pixels,
                                reduce_to=DECODE_OVERSAMPLE * s.image_size)
            arr = np.asarray(center_square(im, s.image_size))
    except ImageRejected as e:
        return Prepared(source, origin, (e.reason, str(e)))
    if float(arr.std()) < s.curate.min_std:
        return Prepared(source, origin, ("near_constant", f"{origin}: pixel std {arr.std():.2f} < {s.curate.min_std}"))
    return Prepared(source, origin, png=to_png(arr), shape=arr.shape, phash=phash(arr), extra=extra)


def curate(ctx: StageContext) -> dict[str, float]:
    s, c = ctx.settings, ctx.settings.curate
    out = ctx.outputs["curated"]
    drops: list[dict[str, str]] = []
    seen: set[int] = set()
    hashes: list[int] = []
    rows: list[dict] = []
    total = 0

    def drop(origin: str, reason: str, detail: str) -> None:
        drops.append({"origin": origin, "reason": reason, "detail": detail})

    with contextlib.closing(ordered_map(partial(prepare, s=s), iter_sources(s))) as items:
        for p in track(items, description="curate", total=source_count(s)):
            total += 1
            if p.drop is not None:
                drop(p.origin, *p.drop)
                continue
            if p.phash in seen or (c.dedup_hamming and any(hamming(p.phash, o) <= c.dedup_hamming for o in hashes)):
                drop(p.origin, "duplicate", f"{p.origin}: perceptual hash {p.phash:016x} seen before")
                continue
            seen.add(p.phash)
            hashes.append(p.phash)
            rows.append({"image_id": hashlib.sha1(p.png).hexdigest()[:16], "source": p.source, "origin": p.origin,
                         "width": p.shape[1], "height": p.shape[0], "image": p.png, "phash": f"{p.phash:016x}",
                         **p.extra})

    # Identical pixels from two origins share an image_id: keep the first.
    first = {}
    for r in rows:
        first.setdefault(r["image_id"], r)
    for r in rows:
        if first[r["image_id"]] is not r:
            drop(r["origin"], "duplicate", f"{r['origin']}: identical pixels to {first[r['image_id']]['origin']}")
    rows = [r for r in rows if first[r["image_id"]] is r]
    counts = Counter(d["reason"] for d in drops)
    if not rows:
        named = "; ".join(f"{d['origin']} ({d['reason']}: {d['detail']})" for d in drops[:5])
        raise ValueError(f"curate: no image survived curation of {total} input(s) ({dict(counts)}); first: {named}")
    validate_curated(rows, s, decodable=[True] * len(rows))  # each PNG was just encoded from decoded pixels
    for i in range(0, len(rows), c.shard_rows):
        out.write_table(schema.table(rows[i : i + c.shard_rows], schema.CURATED))
    # every dropped input, by name and reason; the report keeps counts and a few examples
    out.write_table(schema.table(drops, schema.DROPS), name="drops")
    examples: dict[str, list[str]] = {}
    for d in drops:
        if len(examples.setdefault(d["reason"], [])) < 5:
            examples[d["reason"]].append(d["detail"])
    report = {"seen": total, "kept": len(rows), "dropped": dict(counts), "examples": examples,
              "by_source": dict(Counter(r["source"] for r in rows))}
    out.write_json("report.json", report)
    tracking.log_dict(report, "curation_report.json")
    return {"images_seen": total, "images_kept": len(rows),
            **{f"dropped.{k}": v for k, v in counts.items()}}


def validate_curated(rows: list[dict], s: Settings, decodable: list[bool] | None = None) -> None:
    """The curated suite on `rows`; `decodable` (one flag per row) spares decoding images a caller has
    already decoded."""
    df = pd.DataFrame([{k: v for k, v in r.items() if k not in ("background", "object_mask")} for r in rows])
    df["decodable"] = decodable if decodable is not None else [try_from_png(r["image"]) is not None for r in rows]
    validation.validate("curated", df, validation.curated_suite(s.curate.min_side), "image_id")
