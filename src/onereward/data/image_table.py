"""A table of images by id (schema.PAIR_IMAGES) read by position: label_preferences stores each image its pairs name
once, and a judge's training draws its batches from it.

A table whose decoded pixels fit `DECODE_LIMIT_BYTES` is decoded once (tiny: 6,079 images of 32 px, 75 MB). A
larger one (flux: 20,000 conditions x ~11 images of 512 px would be ~690 GB as float32, counted, not measured) is
read from the artifact's local Parquet files a row group at a time, only the groups a batch needs, and decoded a
batch at a time.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from onereward import storage
from onereward.models import tensors

GROUP_ROWS = 16  # rows a row group: a lazy read of one image fetches its group (16 x ~0.4 MB at 512 px)
DECODE_LIMIT_BYTES = 2 * 2**30


class ImageTable:
    """`take(positions)` -> (B, 3, H, W) in [-1, 1]; `positions(ids)` maps image ids to positions."""

    def __init__(self, ids: list[str], decoded: torch.Tensor | None = None, files: list[Path] | None = None,
                 where: np.ndarray | None = None):
        self.ids = ids
        self._pos = {image_id: n for n, image_id in enumerate(ids)}
        if len(self._pos) != len(ids):
            twice = sorted(i for i, n in Counter(ids).items() if n > 1)[:5]
            raise ValueError(f"image table: ids stored more than once: {twice}")
        self._decoded = decoded
        self._files = files or []
        self._where = where  # (N, 3): file, row group, row within the group
        self._open: dict[int, pq.ParquetFile] = {}

    @property
    def lazy(self) -> bool:
        return self._decoded is None

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def read(cls, art: storage.Artifact, name: str = "images", limit_bytes: int = DECODE_LIMIT_BYTES
             ) -> ImageTable:
        """The table `name` of `art` from its local files (an S3 artifact is downloaded once a node): decoded when
        its pixels fit `limit_bytes`, else read lazily."""
        files = art.local_shards(name)
        ids: list[str] = []
        where = []
        for f, path in enumerate(files):
            shard = pq.ParquetFile(path)
            ids += shard.read(columns=["image_id"]).column(0).to_pylist()
            for g in range(shard.num_row_groups):
                where += [(f, g, i) for i in range(shard.metadata.row_group(g).num_rows)]
        if not ids:
            raise ValueError(f"artifact {art.uri}: table {name!r} holds no images")
        table = cls(ids, files=files, where=np.asarray(where, dtype=np.int64))
        one = table.take(torch.tensor([0]))
        if one[0].numel() * one.element_size() * len(ids) > limit_bytes:
            return table
        pngs = [p for path in files for p in pq.read_table(path, columns=["image"]).column(0).to_pylist()]
        return cls(ids, decoded=tensors.to_tensor(pngs))

    def positions(self, ids: list[str]) -> torch.Tensor:
        missing = sorted({i for i in ids if i not in self._pos})
        if missing:
            raise ValueError(f"image table: no image with id {missing[:5]}")
        return torch.tensor([self._pos[i] for i in ids], dtype=torch.long)

    def take(self, positions: torch.Tensor) -> torch.Tensor:
        if self._decoded is not None:
            return self._decoded[positions]
        pos = positions.tolist()
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for p in pos:
            f, g, _ = self._where[p]
            groups[(int(f), int(g))].append(p)
        pngs: dict[int, bytes] = {}
        for (f, g), members in groups.items():
            if f not in self._open:
                self._open[f] = pq.ParquetFile(self._files[f])
            column = self._open[f].read_row_group(g, columns=["image"]).column(0)
            for p in members:
                pngs[p] = column[int(self._where[p][2])].as_py()
        return tensors.to_tensor([pngs[p] for p in pos])
