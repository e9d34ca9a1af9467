"""The shipped small BLIP (src/feddat/weights/blip-small): found without --model-path, checksummed at load."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from feddat.cli import main
from feddat.errors import FedDATError
from feddat.models.backbone import EMBEDDED_DIRS, embedded_dir, load_backbone
from feddat.models.blip import encode
from feddat.models.checkpoints import CHECKSUM_FILE


def test_the_shipped_blip_loads_frozen_and_encodes():
    model, tok = load_backbone(None, family="blip")
    assert model.family == "blip" and not any(p.requires_grad for p in model.parameters())
    assert model.config.hidden_size == 128 and model.config.image_size == 48
    enc = tok(["what color is the circle ?"], padding="max_length", max_length=12, return_tensors="pt",
              return_token_type_ids=False)
    _, pooled = encode(model, enc["input_ids"], enc["attention_mask"], torch.zeros(1, 3, 48, 48))
    assert pooled.shape == (1, 128) and torch.isfinite(pooled).all()
    shipped = embedded_dir("blip")
    listed = {line.split()[1] for line in (shipped / CHECKSUM_FILE).read_text().splitlines()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "pretrain_report.json"} <= listed
    assert sum(p.stat().st_size for p in shipped.iterdir()) <= 20 * 2**20
    report = json.loads((shipped / "pretrain_report.json").read_text())
    assert report["config"]["backbone"] == "blip" and report["eval"]["accuracy"] > 0.5


@pytest.fixture()
def shipped_copy(tmp_path, monkeypatch):
    copy = tmp_path / "blip-small"
    shutil.copytree(embedded_dir("blip"), copy)
    monkeypatch.setitem(EMBEDDED_DIRS, "blip", copy)
    return copy


def test_a_tampered_shipped_blip_is_refused(shipped_copy):
    load_backbone(None, family="blip")  # the intact copy loads
    weights = shipped_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(FedDATError, match=r"blip-small/model.safetensors does not match its checksum"):
        load_backbone(None, family="blip")


def test_a_missing_shipped_blip_names_the_rebuild(shipped_copy):
    (shipped_copy / "config.json").unlink()
    with pytest.raises(FedDATError, match="config.json is missing"):
        load_backbone(None, family="blip")
    shutil.rmtree(shipped_copy)
    with pytest.raises(FedDATError, match="embedded BLIP backbone is missing.*feddat pretrain --backbone blip"):
        load_backbone(None, family="blip")


@pytest.mark.integration
def test_a_run_with_backbone_blip_uses_the_shipped_one(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "--backbone", "blip", "--rounds", "1", "--clients", "2", "--train-per-client", "16",
                 "--val-per-client", "8", "--test-per-client", "16", "--batch-size", "8", "--threads", "1",
                 "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["backbone"] == "blip" and results["config"]["model_path"] is None
    assert all(0.0 <= s <= 1.0 for s in results["final"]["clients"].values())
    client = next(iter(results["final"]["clients"]))
    meta = json.loads((out / "clients" / client / "client.json").read_text())
    assert meta["backbone"]["family"] == "blip" and meta["backbone"]["model_path"] == "embedded"
    weights = embedded_dir("blip") / "model.safetensors"
    from feddat.models.checkpoints import file_sha256

    assert meta["backbone"]["sha256"] == file_sha256(weights)
    # predict and eval find the shipped BLIP from client.json alone
    from feddat.inference import load_client

    model = load_client(out, client)
    image = (torch.rand(48, 48, 3) * 255).to(torch.uint8).numpy()
    (answers,) = model.predict([image], ["what color is the circle ?"], top_k=1)
    assert len(answers) == 1
    assert main(["eval", "--run", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
