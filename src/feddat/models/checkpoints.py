"""Checkpoint files of a backbone: their SHA256SUMS, written at pretraining and checked at every load, and the
named architecture sizes a backbone of either family (ViLT, BLIP) can be built at."""

from __future__ import annotations

import hashlib
from pathlib import Path

from feddat.errors import FedDATError

CHECKSUM_FILE = "SHA256SUMS"
SIZES = ("small", "base")  # `small`: the embedded backbone's architecture; `base`: the published base model's


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_checksums(directory: Path) -> None:
    lines = [f"{file_sha256(p)}  {p.name}" for p in sorted(directory.iterdir())
             if p.is_file() and p.name != CHECKSUM_FILE]
    (directory / CHECKSUM_FILE).write_text("\n".join(lines) + "\n")


def verify_checksums(directory: Path) -> None:
    sums = directory / CHECKSUM_FILE
    if not sums.exists():
        return
    for line in sums.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        path = directory / name
        if not path.exists():
            raise FedDATError(f"backbone file {path} is missing; rebuild it with `feddat pretrain`")
        if file_sha256(path) != digest:
            raise FedDATError(
                f"backbone file {path} does not match its checksum in {sums}: the file is corrupt or was "
                "changed; restore it (git checkout) or rebuild it with `feddat pretrain`"
            )
