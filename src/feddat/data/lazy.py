"""Splits whose images stay on disk: decoded per batch, only the rows asked for.

`LazySplit` is a `feddat.data.benchmarks.Split` (same fields, same `batch(idx, device)`) whose `pixels` is a
`LazyPixels` view of an `ImageTable` instead of a tensor of every image. Text, labels and the per-item
diagnostics stay in memory as tensors (a few bytes per item); an image costs nothing until a batch needs it.

Images are preprocessed as `feddat.data.real` does for the paper's datasets (`decode_image`: RGB, resized to the
backbone's square side with bicubic resampling, uint8), then normalised by `feddat.data.pool.pixel_tensor`, so
a batch holds the values the in-memory path would. Decoded images are kept in a cache of at most `cache_bytes`
(uint8, one preallocated slab, first-in first-out), so a client whose images fit in it decodes each image once, and
a large one stays within the budget.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from feddat.data.benchmarks import Split
from feddat.data.pool import pixel_tensor
from feddat.errors import FedDATError

DEFAULT_CACHE_MB = 64
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what PIL raises on bad files


def decode_image(source, size: int) -> np.ndarray:
    """One image (a path, raw bytes or a file object) as uint8 (size, size, 3): converted to RGB and resized to a
    square with bicubic resampling, exactly as `feddat.data.real` preprocesses the paper's datasets."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    with Image.open(source) as im:
        rgb = im.convert("RGB").resize((size, size), Image.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8)


def check_image(source) -> None:
    """Raise what PIL raises when `source` is missing, not an image, or (PNG and other formats PIL can verify)
    damaged; reads the file once without decoding its pixels."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    with Image.open(source) as im:
        im.verify()


class ImageTable:
    """The distinct images of one split, by position: each a file path, or a row of one of a few Arrow columns
    holding `datasets.Image` values (bytes and/or path). `load(rows)` decodes the rows asked for.

    `file` and `first_row[i]` (0-based) name the metadata row that first uses image i, for error messages."""

    def __init__(self, size: int, file: str, first_row: np.ndarray, paths: list[str] | None = None, arrow=None,
                 arrow_rows: np.ndarray | None = None, base_dir: str | None = None,
                 cache_bytes: int = DEFAULT_CACHE_MB << 20):
        if (paths is None) == (arrow is None):
            raise ValueError("an image table holds either paths or an Arrow column")
        self.size = size
        self.file = file
        self.first_row = first_row
        self.paths = paths
        self.arrow = arrow                  # datasets.Dataset objects formatted as Arrow, one image column each
        self.arrow_rows = arrow_rows        # (n, 2): which of them, which row
        self.base_dir = base_dir            # where relative paths in Arrow image values are
        self.cache_bytes = cache_bytes
        self._reset_cache()

    def _reset_cache(self) -> None:
        self._slab: np.ndarray | None = None     # (capacity, size, size, 3) uint8, allocated at the first decode
        self._slot_of: np.ndarray | None = None  # image -> slot, -1 when not kept
        self._owner: np.ndarray | None = None    # slot -> image, -1 when free
        self._next = 0

    def __len__(self) -> int:
        return len(self.paths) if self.paths is not None else len(self.arrow_rows)

    # pickling (a worker process receiving a client): the decoded-image cache stays behind
    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_slab=None, _slot_of=None, _owner=None, _next=0)
        return state

    def sources(self, rows) -> list:
        """What each row's image is read from: a path (str) or raw bytes."""
        if self.paths is not None:
            return [self.paths[int(i)] for i in rows]
        out: list = [None] * len(rows)
        refs = self.arrow_rows[np.asarray(rows, dtype=np.int64).reshape(-1)]
        for c, column in enumerate(self.arrow):
            picked = np.flatnonzero(refs[:, 0] == c)
            if len(picked) == 0:
                continue
            values = column[refs[picked, 1].tolist()].column(0).to_pylist()
            for k, value in zip(picked, values):
                value = value or {}
                if value.get("bytes") is not None:
                    out[k] = value["bytes"]
                elif value.get("path"):
                    path = Path(value["path"])
                    out[k] = str(path if path.is_absolute() or self.base_dir is None else Path(self.base_dir) / path)
        return out

    def describe(self, i: int) -> str:
        where = f"{self.file} row {int(self.first_row[i]) + 1}"
        return f"image {self.paths[i]} ({where})" if self.paths is not None else f"the image of {where}"

    def load(self, rows) -> np.ndarray:
        """uint8 (len(rows), size, size, 3), the images at `rows` in that order."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows), self.size, self.size, 3), dtype=np.uint8)
        slots = self._slot_of[rows] if self._slot_of is not None else np.full(len(rows), -1)
        hit = slots >= 0
        if hit.any():
            out[hit] = self._slab[slots[hit]]
        missing = np.flatnonzero(~hit)
        if len(missing):
            for k, source in zip(missing, self.sources(rows[missing])):
                i = int(rows[k])
                try:
                    if source is None:
                        raise ValueError("no image bytes or path")
                    out[k] = decode_image(source, self.size)
                except IMAGE_ERRORS as e:
                    raise FedDATError(f"{self.describe(i)} cannot be decoded ({type(e).__name__}: {e}); replace the "
                                      "file or remove its row (loading with skip_bad=True checks every image first "
                                      "and skips the bad ones)") from e
                self._keep(i, out[k])
        return out

    @property
    def cached(self) -> int:
        """How many decoded images the cache holds."""
        return 0 if self._owner is None else int((self._owner >= 0).sum())

    def _keep(self, i: int, image: np.ndarray) -> None:
        """Keep a decoded image in the cache: one preallocated uint8 slab of `cache_bytes` (no per-image
        allocations, which would fragment the heap), slots reused first-in first-out once it is full."""
        if self._slab is None:
            capacity = min(len(self), self.cache_bytes // image.nbytes)
            if capacity <= 0:
                return
            self._slab = np.empty((capacity, *image.shape), dtype=np.uint8)
            self._slot_of = np.full(len(self), -1, dtype=np.int64)
            self._owner = np.full(capacity, -1, dtype=np.int64)
        if self._slot_of[i] >= 0:
            return
        slot = self._next
        self._next = (self._next + 1) % len(self._slab)
        if self._owner[slot] >= 0:
            self._slot_of[self._owner[slot]] = -1
        self._slab[slot] = image
        self._owner[slot] = i
        self._slot_of[i] = slot


class LazyPixels:
    """Stands where `Split.pixels` holds a (n_images, 3, H, W) tensor: same shape, indexing decodes the images
    asked for (`pixels[rows]` is the float tensor the in-memory split would give)."""

    def __init__(self, table: ImageTable):
        self.table = table

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.table), 3, self.table.size, self.table.size))

    dtype = torch.float32

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, rows) -> torch.Tensor:
        if isinstance(rows, int) or (torch.is_tensor(rows) and rows.dim() == 0):
            return self[[int(rows)]][0]
        if isinstance(rows, slice):
            rows = range(*rows.indices(len(self.table)))
        rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        if len(rows) == 0:
            return torch.zeros(0, 3, self.table.size, self.table.size)
        listed = rows.tolist()
        if len(set(listed)) == len(listed):  # each image once (the usual batch): decode straight into place
            return pixel_tensor(self.table.load(listed))
        unique, inverse = torch.unique(rows, return_inverse=True)
        return pixel_tensor(self.table.load(unique.tolist()))[inverse]


@dataclass
class LazySplit(Split):
    """A `Split` whose images are decoded per batch from an `ImageTable` (`pixels` is its `LazyPixels`)."""

    images: ImageTable | None = None

    def batch(self, idx: torch.Tensor, device="cpu", pixels: bool = True) -> dict:
        idx = torch.as_tensor(idx, dtype=torch.long)
        out = self.text_batch(idx, device)
        if not pixels:  # nothing decoded
            if self.image_index2 is not None:
                out["pairs"] = True
            return out
        first = self.image_index[idx]
        if self.image_index2 is None:
            px = self.pixels[first]
        else:  # (B, 2, 3, H, W); both images of every statement decoded in one pass
            both = self.pixels[torch.cat([first, self.image_index2[idx]])]
            px = torch.stack([both[:len(idx)], both[len(idx):]], dim=1)
        out["pixel_values"] = px.to(device)
        return out
