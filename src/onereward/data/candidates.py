"""A candidates table (generate_candidates: schema.CANDIDATES) read a condition at a time: on flux it holds 160,000
512 px PNGs, which no reader should hold at once."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator

from onereward import storage
from onereward.data import schema


def candidate_counts(art: storage.Artifact) -> Counter[str]:
    """Candidates a condition, from the light column alone."""
    return Counter(art.read_table(columns=["condition_id"]).column(0).to_pylist())


def candidates_by_condition(art: storage.Artifact, per_condition: Counter[str]) -> Iterator[tuple[str, list[dict]]]:
    """(condition id, its candidates sorted by id), read a shard at a time; a condition is given once all its
    `per_condition` candidates are read (generate_candidates writes a condition's candidates together)."""
    pending: dict[str, list[dict]] = defaultdict(list)
    for t in art.iter_batches():
        schema.check_columns(t, schema.CANDIDATES, f"candidates artifact {art.uri}")
        for c in t.to_pylist():
            group = pending[c["condition_id"]]
            group.append(c)
            if len(group) == per_condition[c["condition_id"]]:
                yield c["condition_id"], sorted(pending.pop(c["condition_id"]), key=lambda x: x["candidate_id"])
