"""`feddat pretrain` on a toy budget: it writes a loadable backbone, resumes, and refuses a changed recipe."""

import json

import pytest

from feddat.errors import FedDATError
from feddat.models.backbone import load_backbone
from feddat.pretrain import PretrainConfig, pretrain


def _toy(**kw):
    values = dict(steps=4, batch_size=8, pool_images=40, questions_per_image=2, eval_questions=40, hidden=32,
                  layers=1, heads=2, intermediate=64, warmup=2, checkpoint_every=2, threads=1)
    values.update(kw)
    return PretrainConfig(**values)


def test_pretrain_writes_a_checksummed_backbone_and_resumes(tmp_path):
    info = pretrain(_toy(), tmp_path, progress=False)
    backbone_dir = tmp_path / "backbone"
    model, tok = load_backbone(backbone_dir)
    assert model.config.hidden_size == 32 and len(tok) == model.config.vocab_size
    report = json.loads((backbone_dir / "pretrain_report.json").read_text())
    assert [h["step"] for h in report["history"]] == [2, 4]
    assert "crimson" in report["words_unseen_in_pretraining"]
    # unseen words were re-drawn at the norm of trained ones
    emb = model.embeddings.text_embeddings.word_embeddings.weight
    vocab = tok.get_vocab()
    seen_norm = emb[vocab["color"]].norm()
    assert emb[vocab["crimson"]].norm() > 0.5 * seen_norm
    weights = (backbone_dir / "model.safetensors").read_bytes()
    # a second call finds the finished checkpoint and only rewrites the same backbone
    again = pretrain(_toy(threads=2), tmp_path, progress=False)
    assert again["eval"] == info["eval"]
    assert (backbone_dir / "model.safetensors").read_bytes() == weights


def test_changed_recipe_does_not_resume(tmp_path):
    pretrain(_toy(), tmp_path, progress=False)
    with pytest.raises(FedDATError, match="another pretraining config"):
        pretrain(_toy(lr=5e-4), tmp_path, progress=False)


def test_bad_pretrain_numbers_are_refused(tmp_path):
    with pytest.raises(FedDATError, match="steps must be positive"):
        pretrain(_toy(steps=0), tmp_path, progress=False)
    with pytest.raises(FedDATError, match="divisible"):
        pretrain(_toy(hidden=30, heads=4), tmp_path, progress=False)
