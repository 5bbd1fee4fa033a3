"""The Parquet schemas of the data stages — the one place they are documented.

Images are PNG bytes (RGB for images, L for masks with 255 = region to generate).
"""

from __future__ import annotations

import pyarrow as pa

CURATED = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),  # sha1 of the PNG bytes, 16 hex chars
        pa.field("source", pa.string(), nullable=False),  # procedural | folder | manifest
        pa.field("origin", pa.string(), nullable=False),  # file path, URI, or procedural recipe
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),  # PNG, RGB, image_size x image_size
        pa.field("phash", pa.string(), nullable=False),  # 64-bit DCT hash, hex
        pa.field("background", pa.binary()),  # PNG: the scene without the object (procedural only)
        pa.field("object_mask", pa.binary()),  # PNG L: exact mask of the removable object
        pa.field("object_label", pa.string()),  # e.g. "red circle", clipart category
    ]
)

DROPS = pa.schema(  # curate's table "drops": every input it did not keep
    [
        pa.field("origin", pa.string(), nullable=False),  # file path, URI, manifest row or recipe
        pa.field("reason", pa.string(), nullable=False),  # e.g. corrupt, missing, duplicate, outside_source
        pa.field("detail", pa.string(), nullable=False),
    ]
)

CONDITIONS = pa.schema(
    [
        pa.field("condition_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),  # fill | extend | removal | text
        pa.field("image", pa.binary(), nullable=False),  # PNG RGB input (masked region is ignored)
        pa.field("mask", pa.binary(), nullable=False),  # PNG L, 255 = generate here
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("target", pa.binary()),  # PNG RGB ground truth when known
        pa.field("mask_coverage", pa.float32(), nullable=False),  # share of masked pixels
        pa.field("split", pa.string(), nullable=False),  # train | heldout (by image)
        pa.field("params", pa.string(), nullable=False),  # JSON: side, ratio, text, label, ...
    ]
)

CANDIDATES = pa.schema(  # generate_candidates: the base's samples of a condition
    [
        pa.field("condition_id", pa.string(), nullable=False),
        pa.field("candidate_id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("steps", pa.int32(), nullable=False),
        pa.field("guidance", pa.float32(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),  # PNG RGB
    ]
)


PREFERENCES = pa.schema(  # label_preferences: one ordered pair (winner better than loser) per row
    [
        pa.field("pair_id", pa.string(), nullable=False),  # same for both orders of a pair on one criterion
        pa.field("condition_id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("criterion", pa.string(), nullable=False),  # e.g. alignment, removal_quality (config labels.criteria)
        pa.field("kind", pa.string(), nullable=False),  # cand_vs_cand | target_vs_cand | cand_vs_degraded
        # a candidate_id, COND-target, or SOURCE~degradation: the image_id of the artifact's table "images"
        pa.field("winner_id", pa.string(), nullable=False),
        pa.field("loser_id", pa.string(), nullable=False),
        pa.field("labeller", pa.string(), nullable=False),  # auto | import
        pa.field("confidence", pa.float32(), nullable=False),  # estimated probability that the label is right
        # the ground-truth measure of the loser minus the winner's (lower is better): negative where label noise
        # flipped the pair; NaN for an imported label on a condition without a target
        pa.field("margin", pa.float32(), nullable=False),
        pa.field("split", pa.string(), nullable=False),  # the condition's split: train | heldout
    ]
)

# label_preferences' table "images": each image its pairs name, once, and what the judge is shown of each condition
# (COND-context: the masked input)
PAIR_IMAGES = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("condition_id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),  # PNG RGB
    ]
)

REJECTED_LABELS = pa.schema(  # label_preferences' table "rejected": every imported entry it did not keep
    [
        pa.field("entry", pa.string(), nullable=False),  # the Label Studio task id (or #index when it has none)
        pa.field("pair_id", pa.string(), nullable=False),  # when the entry names one, else ""
        pa.field("reason", pa.string(), nullable=False),  # e.g. unknown_candidate, missing_choice, duplicate_pair
        pa.field("detail", pa.string(), nullable=False),
    ]
)

def table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


def check_columns(tbl: pa.Table | pa.Schema, schema: pa.Schema, what: str) -> None:
    """Refuse a table (or a table's schema) whose columns or types differ from the schema, naming the column."""
    have = tbl if isinstance(tbl, pa.Schema) else tbl.schema
    for field in schema:
        if field.name not in have.names:
            raise ValueError(f"{what}: missing column {field.name!r}")
        got = have.field(field.name).type
        if got != field.type and not (pa.types.is_large_binary(got) and pa.types.is_binary(field.type)):
            raise ValueError(f"{what}: column {field.name!r} has type {got}, expected {field.type}")
