"""Shared fixtures: a tiny random-weight ViLT saved like a real checkpoint, and tiny benchmark data."""

from __future__ import annotations

import pytest
import torch
from transformers import ViltModel

from feddat.data.questions import WORDS
from feddat.models.backbone import build_word_tokenizer, small_vilt_config


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory):
    """A ViLT with 2 layers of width 32, saved with save_pretrained plus its tokenizer."""
    path = tmp_path_factory.mktemp("tiny-vilt")
    tok = build_word_tokenizer(WORDS)
    torch.manual_seed(0)
    model = ViltModel(small_vilt_config(len(tok), hidden=32, layers=2, heads=2, intermediate=64))
    torch.nn.init.normal_(model.embeddings.cls_token, std=0.02)
    torch.nn.init.normal_(model.embeddings.position_embeddings, std=0.02)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One cache for the tests' runs: the benchmarks' client folders are keyed by what decides their content,
    so runs of the same tiny benchmark read the folders the first one wrote."""
    return tmp_path_factory.mktemp("shared-cache")


@pytest.fixture()
def tiny_config(tiny_backbone_dir, shared_cache):
    from feddat.config import RunConfig

    def make(**overrides):
        values = dict(model_path=str(tiny_backbone_dir), cache_dir=str(shared_cache), rounds=2,
                      train_per_client=32, val_per_client=8, test_per_client=32, batch_size=16, threads=1,
                      reduction=4)  # hidden 32 / 4: bottleneck 8 (the default 16 would leave 2)
        values.update(overrides)
        return RunConfig(**values).validate()

    return make


@pytest.fixture()
def tiny(tiny_backbone_dir):
    """FedDAT's model on the tiny ViLT with random adapters (the frozen copy frozen, as a Worker makes it), a
    4-answer head and the tokenizer."""
    from feddat.algorithms.feddat import FedDAT
    from feddat.models.backbone import load_backbone
    from feddat.models.vl import AnswerHead, adapt_vilt
    from tiny import randomise_adapters

    backbone, tokenizer = load_backbone(tiny_backbone_dir)
    model = adapt_vilt(backbone, FedDAT.adapters, reduction=4, views=FedDAT.views)
    randomise_adapters(model)
    for p in model.adapter_parameters("global_frozen"):
        p.requires_grad_(False)
    torch.manual_seed(1)
    return model, AnswerHead(backbone.config.hidden_size, 4), tokenizer
