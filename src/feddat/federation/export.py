"""Saved client models: what a run leaves under DIR/clients/<client>/ for `feddat predict` and `feddat eval`.

Each client directory holds
- `model.safetensors`: the client's personalised model as it was scored: every named adapter of its method
  (`adapter.<name>.<layer>.<param>`; the newest global adapter for methods that have one, and for FedDAT the
  frozen copy its teacher view uses: the newest aggregate with eval_frozen="newest", the copy kept from the
  client's last round with "last_round") and its answer head (`head.<param>`);
- `client.json`: what is needed to rebuild it: the backbone (its family, vilt or blip; path or "embedded",
  sha256 of its weights file, its shape), the adapters (names, reduction, bottleneck), the head shape, the method and its views, the
  eval_frozen setting, the local training knobs (`local`: among them those that shape the model, such as the
  LoRA rank), the client's label space, and the sha256 of model.safetensors.

Methods that share more than an adapter save their shared tensors as `<shared>.<key>` (e.g. `lora.<key>`,
`bias.<key>`), and any further private tensors under their own names (e.g. APFL's `apfl.alpha`).

Both engines write the same files through `feddat.federation.rounds.client_export` and `write_client`: the
in-process driver from its states, the Flower server from what the clients' final evaluate replies carry.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import torch

from feddat.errors import FedDATError
from feddat.models.backbone import backbone_family, embedded_dir
from feddat.models.checkpoints import file_sha256

State = dict[str, torch.Tensor]

FORMAT = "feddat-client-v1"
CLIENTS_DIR = "clients"
MODEL_FILE = "model.safetensors"
META_FILE = "client.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(Path(path))


def cached_sha256(path: Path) -> str:
    """sha256 of a file, computed once per (path, size, mtime) in this process (backbones can be large)."""
    st = path.stat()
    return _sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)


def backbone_weights_file(model_path: str | None, family: str = "vilt") -> Path | None:
    """The weights file of a backbone: in its directory (None = the embedded one of `family`), or a hub id's
    cached copy."""
    local = embedded_dir(family) if model_path is None else Path(model_path)
    if local.is_dir():
        for name in WEIGHT_FILES:
            if (local / name).is_file():
                return local / name
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        for name in WEIGHT_FILES:
            found = try_to_load_from_cache(str(model_path), name)
            if isinstance(found, str):
                return Path(found)
    except Exception:  # no hub client or not a hub id: nothing to checksum
        pass
    return None


def backbone_record(model_path: str | None, backbone) -> dict[str, Any]:
    """The backbone as client.json names it: where it came from, its weights' checksum and its shape."""
    weights = backbone_weights_file(model_path, backbone_family(backbone))
    if model_path is None:
        where = "embedded"
    else:
        where = str(Path(model_path).resolve()) if Path(model_path).exists() else str(model_path)
    c = backbone.config
    return {
        "family": backbone_family(backbone),
        "model_path": where,
        "weights_file": weights.name if weights is not None else None,
        "sha256": cached_sha256(weights) if weights is not None else None,
        "hidden_size": c.hidden_size,
        "num_layers": c.num_hidden_layers,
        "image_size": c.image_size,
        "patch_size": c.patch_size,
        "text_len": c.max_position_embeddings,
    }


def client_dir(run_dir: Path, client: str) -> Path:
    return Path(run_dir) / CLIENTS_DIR / client


def write_client(run_dir: Path, tensors: State, meta: dict[str, Any]) -> Path:
    """Write DIR/clients/<client>/{model.safetensors, client.json}, each through a temp file and a rename;
    client.json (written last) records the checksum of model.safetensors."""
    from safetensors.torch import save_file

    directory = client_dir(run_dir, meta["client"])
    directory.mkdir(parents=True, exist_ok=True)
    model_tmp = directory / (MODEL_FILE + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(model_tmp),
              metadata={"format": FORMAT})  # one key: safetensors writes metadata in hash-map order
    os.chmod(model_tmp, 0o644)  # safetensors creates it owner-only; a model is no secret to the run's readers
    meta = dict(meta, model_file=MODEL_FILE, model_sha256=file_sha256(model_tmp))
    os.replace(model_tmp, directory / MODEL_FILE)
    meta_tmp = directory / (META_FILE + ".tmp")
    meta_tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(meta_tmp, directory / META_FILE)
    return directory


def save_clients(run_dir: Path, exports: dict[str, tuple[State, dict[str, Any]]]) -> None:
    for name in sorted(exports):
        write_client(run_dir, *exports[name])


def saved_clients(run_dir: Path) -> list[str]:
    root = Path(run_dir) / CLIENTS_DIR
    return sorted(p.name for p in root.iterdir() if (p / META_FILE).is_file()) if root.is_dir() else []


def read_client(run_dir: Path, client: str) -> tuple[State, dict[str, Any]]:
    """(tensors, client.json) of a saved client; FedDATError naming the file for anything missing or damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FedDATError(f"run directory {run_dir} does not exist; pass the --out of a `feddat run`")
    directory = client_dir(run_dir, client)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        saved = saved_clients(run_dir)
        if not saved:
            raise FedDATError(f"{run_dir} holds no saved client models ({CLIENTS_DIR}/<client>/{META_FILE}); "
                              "rerun `feddat run --out` with this version to save them")
        raise FedDATError(f"{run_dir} has no saved client {client!r}; saved clients: {', '.join(saved)}")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FedDATError(f"{meta_path} is unreadable or not JSON ({e}); rerun the training to rewrite it") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise FedDATError(f"{meta_path} is not a FedDAT client description (format {FORMAT!r})")
    model_path = directory / meta.get("model_file", MODEL_FILE)
    if not model_path.is_file():
        raise FedDATError(f"{model_path} is missing; rerun the training to rewrite it")
    if meta.get("model_sha256") and file_sha256(model_path) != meta["model_sha256"]:
        raise FedDATError(f"{model_path} does not match the checksum in {meta_path}: the file is corrupt or was "
                          "changed; rerun the training to rewrite it")
    try:
        tensors = load_file(str(model_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FedDATError(f"{model_path} is unreadable or corrupt ({first}); rerun the training to rewrite it") \
            from e
    return tensors, meta
