import json

import pytest
import torch
from transformers import BertConfig, BertModel

from feddat.errors import FedDATError
from feddat.models.backbone import encode, load_backbone
from feddat.models.checkpoints import write_checksums


def test_local_checkpoint_loads_frozen_and_encodes(tiny_backbone_dir):
    model, tok = load_backbone(tiny_backbone_dir)
    assert not any(p.requires_grad for p in model.parameters())
    enc = tok(["what color is the circle ?"], padding="max_length", max_length=12, return_tensors="pt",
              return_token_type_ids=False)
    seq, pooled = encode(model, enc["input_ids"], enc["attention_mask"], torch.zeros(1, 3, 48, 48))
    assert seq.shape == (1, 12 + 17, 32) and pooled.shape == (1, 32)
    assert tok.convert_ids_to_tokens(enc["input_ids"][0, :3].tolist()) == ["[CLS]", "what", "color"]


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(FedDATError, match="'bert' checkpoint, not a ViLT"):
        load_backbone(tmp_path)


def test_missing_or_unreadable_config_is_reported(tmp_path):
    with pytest.raises(FedDATError, match="config.json"):
        load_backbone(tmp_path)


def test_checksum_mismatch_is_reported(tiny_backbone_dir, tmp_path):
    import shutil

    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_backbone_dir, copy)
    write_checksums(copy)
    load_backbone(copy)  # intact: loads
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(FedDATError, match="does not match its checksum"):
        load_backbone(copy)


def test_checkpoint_with_wrong_image_size_gives_clear_error(tiny_backbone_dir, tmp_path):
    import shutil

    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_backbone_dir, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["image_size"] = 96
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FedDATError):
        model, _ = load_backbone(copy)
        encode(model, torch.ones(1, 12, dtype=torch.long), torch.ones(1, 12, dtype=torch.long),
               torch.zeros(1, 3, 48, 48))
