"""Pins of the FedAvg + PEFT baselines: what each trains and sends, and that it survives save, load, resume."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from torch import nn

from feddat.algorithms.peft_baselines import PromptEncoder
from feddat.errors import FedDATError
from feddat.federation.inprocess import build, run


def _fit(setup, client_index=0, seed=0):
    worker, client = setup.worker, setup.clients[client_index]
    state = worker.initial_state(client_index, len(client.answers), seed)
    global_state = worker.initial_global(seed)
    return global_state, worker.fit(client, state, global_state, 0, 1, seed, client_index)


def _backbone_changes(tiny_config, method, **overrides):
    """(names of the backbone tensors a local round changed, the update's keys, the setup)."""
    setup = build(tiny_config(method=method, **overrides))
    before = copy.deepcopy(setup.worker.model.backbone.state_dict())
    _, res = _fit(setup)
    after = setup.worker.model.backbone.state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}, set(res.update), setup


def test_bitfit_trains_and_sends_every_bias_and_nothing_else(tiny_config):
    changed, sent, setup = _backbone_changes(tiny_config, "fedavg-bitfit")
    backbone = setup.worker.model.backbone
    biases = {f"{n}.bias" for n, m in backbone.named_modules() if isinstance(getattr(m, "bias", None), nn.Parameter)}
    assert sent == biases and changed and changed <= biases
    assert len(biases) > 2 * backbone.config.num_hidden_layers


def test_layernorm_trains_and_sends_layernorm_parameters_only(tiny_config):
    changed, sent, setup = _backbone_changes(tiny_config, "fedavg-layernorm")
    norms = {f"{n}.{k}" for n, m in setup.worker.model.backbone.named_modules() if isinstance(m, nn.LayerNorm)
             for k in ("weight", "bias")}
    assert sent == norms and changed and changed <= norms


def test_full_finetuning_sends_the_whole_backbone_at_its_own_learning_rate(tiny_config):
    changed, sent, setup = _backbone_changes(tiny_config, "fedavg-full", lr_backbone=3e-4)
    backbone = setup.worker.model.backbone
    assert sent == set(dict(backbone.named_parameters())) and len(changed) > len(sent) // 2
    groups = setup.worker.method.param_groups(setup.worker.model, nn.Linear(1, 1), setup.worker.local)
    assert [g["lr"] for g in groups][1] == 3e-4


def test_backbone_methods_never_touch_the_shared_backbone(tiny_backbone_dir):
    from feddat.algorithms.base import LocalConfig
    from feddat.algorithms.registry import get_method
    from feddat.federation.worker import Worker
    from feddat.models.backbone import load_backbone

    backbone, _ = load_backbone(tiny_backbone_dir)
    before = copy.deepcopy(backbone.state_dict())
    for name in ("fedavg-bitfit", "fedavg-full", "fedavg-lora", "fedavg-prompt"):
        worker = Worker(get_method(name, {"lora_rank": 4}), backbone, 4, LocalConfig())
        assert worker.model.backbone is not backbone
    assert backbone.state_dict().keys() == before.keys()
    assert all(torch.equal(backbone.state_dict()[k], v) for k, v in before.items())
    assert not any(p.requires_grad for p in backbone.parameters())
    assert not backbone.embeddings._forward_hooks


def test_lora_sends_the_low_rank_factors_of_query_and_value_only(tiny_config):
    changed, sent, setup = _backbone_changes(tiny_config, "fedavg-lora", lora_rank=4)
    backbone = setup.worker.model.backbone
    layers = backbone.config.num_hidden_layers
    expected = {f"encoder.layer.{i}.attention.attention.{t}.lora_{ab}.weight" for i in range(layers)
                for t in ("query", "value") for ab in "AB"}
    assert sent == expected
    global_state = setup.worker.initial_global(0)
    dim = backbone.config.hidden_size
    assert global_state["encoder.layer.0.attention.attention.query.lora_A.weight"].shape == (4, dim)
    assert global_state["encoder.layer.0.attention.attention.query.lora_B.weight"].shape == (dim, 4)
    # the pretrained weights stay: only LoRA factors change
    assert changed and all(".lora_" in k for k in changed)


def test_lora_starts_as_the_pretrained_model_from_the_seed(tiny_config, tiny_backbone_dir):
    from feddat.models.backbone import encode, load_backbone

    setup, other = build(tiny_config(method="fedavg-lora", lora_rank=4)), build(tiny_config(method="fedavg-lora",
                                                                                           lora_rank=4))
    a, b, c = setup.worker.initial_global(0), other.worker.initial_global(0), other.worker.initial_global(1)
    assert all(torch.equal(a[k], b[k]) for k in a) and any(not torch.equal(a[k], c[k]) for k in a)
    assert all(not v.any() for k, v in a.items() if "lora_B" in k)
    worker, client = setup.worker, setup.clients[0]
    worker.prepare_eval(worker.initial_state(0, len(client.answers), 0), a, len(client.answers))
    batch = client.test.batch(torch.arange(4), "cpu")
    plain, _ = load_backbone(tiny_backbone_dir)
    args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    with torch.no_grad():
        assert torch.allclose(encode(worker.model.backbone, *args)[1], encode(plain, *args)[1], atol=1e-6)


def test_lora_targets_that_match_nothing_are_refused(tiny_config):
    with pytest.raises(FedDATError, match="lora-targets"):
        build(tiny_config(method="fedavg-lora", lora_targets="no_such_layer"))
    with pytest.raises(FedDATError, match="lora-targets"):
        tiny_config(method="fedavg-lora", lora_targets="query,,value")


def test_prompts_are_inserted_after_each_modalitys_cls_token():
    torch.manual_seed(0)
    k, dim, text_len, patches = 3, 8, 5, 4
    prompt = PromptEncoder(dim, k)
    emb = torch.randn(2, text_len + 1 + patches, dim)
    masks = torch.cat([torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]), torch.ones(2, 1 + patches, dtype=torch.long)], 1)
    out, out_masks = prompt.hook(None, (None, masks[:, :text_len]), {}, (emb, masks))
    text, image = prompt.prompts()
    assert out.shape == (2, text_len + 1 + patches + 2 * k, dim)
    assert torch.equal(out[:, 0], emb[:, 0])                                    # text [CLS] first: ViLT pools it
    assert torch.allclose(out[:, 1:1 + k], text.expand(2, -1, -1))
    assert torch.equal(out[:, 1 + k:text_len + k], emb[:, 1:text_len])
    assert torch.equal(out[:, text_len + k], emb[:, text_len])                  # image [CLS]
    assert torch.allclose(out[:, text_len + k + 1:text_len + 2 * k + 1], image.expand(2, -1, -1))
    assert torch.equal(out[:, text_len + 2 * k + 1:], emb[:, text_len + 1:])
    assert out_masks[:, 1:1 + k].eq(1).all() and out_masks[:, text_len + k + 1:text_len + 2 * k + 1].eq(1).all()
    assert torch.equal(out_masks[:, 1 + k:text_len + k], masks[:, 1:text_len])


def test_prompt_tuning_trains_and_sends_the_prompt_module_only(tiny_config):
    changed, sent, setup = _backbone_changes(tiny_config, "fedavg-prompt", prompt_tokens=2)
    assert not changed
    assert sent == {"text", "image", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"}
    g = setup.worker.initial_global(0)
    assert g["text"].shape == (2, setup.worker.dim)


@pytest.mark.parametrize("method", ["fedavg-lora", "apfl-adapter"])
def test_saved_clients_reload_and_resume_exactly(tiny_config, tmp_path, method):
    """Shared tensors that are not an adapter (LoRA) and private state beyond the adapters (APFL's alpha)
    survive the checkpoint (exact resume) and the saved client model (load_client scores as the run)."""
    from feddat.cli import main
    from feddat.federation.checkpoint import complete_checkpoints, load_checkpoint
    from feddat.inference import load_client

    cfg = tiny_config(method=method, lora_rank=4, apfl_alpha_lr=50.0, rounds=2)
    out = tmp_path / "run"
    results = run(cfg, out_dir=out, progress=False)
    ck = load_checkpoint(out)
    if method == "apfl-adapter":
        alphas = {c: float(s["apfl.alpha"]) for c, s in ck.states.items()}
        assert any(a != 0.5 for a in alphas.values()), alphas
    for client in results["clients"][:2]:
        model = load_client(out, client)
        data = next(c for c in build(cfg).clients if c.name == client)
        assert model.evaluate(data)[model.predict_view]["score"] == pytest.approx(results["final"]["clients"][client])
    # resume from the round-1 checkpoint: the same numbers
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(complete_checkpoints(resumed)[-1])
    (resumed / "results.json").unlink()
    assert main(["run", "--resume", str(resumed), "--quiet"]) == 0
    again = json.loads((resumed / "results.json").read_text())
    assert [r["train"] for r in again["rounds"]] == [r["train"] for r in results["rounds"]]
    assert again["final"]["clients"] == results["final"]["clients"]


@pytest.mark.integration
@pytest.mark.parametrize("method", ["apfl-adapter", "fedavg-lora"])
def test_flower_matches_inprocess(tiny_config, method):
    """On Flower the clients keep their private state (APFL's alpha) in the node's context between rounds, and
    shared tensors other than an adapter (LoRA's) travel in the same records: the numbers are the in-process
    engine's."""
    from feddat.federation.flower.server_app import run_flower

    cfg = tiny_config(method=method, lora_rank=4, apfl_alpha_lr=50.0)
    ref = run(cfg, progress=False)
    got = run_flower(cfg, progress=False)
    for g, r in zip(got["rounds"], ref["rounds"]):
        assert g["bytes_sent"] == r["bytes_sent"]
        for client in r["train"]:
            assert g["train"][client] == pytest.approx(r["train"][client], abs=1e-6), (g["round"], client)
    assert got["final"]["clients"] == pytest.approx(ref["final"]["clients"], abs=1e-6)
    if method == "apfl-adapter":   # alpha moved in round 1 and was carried into round 2
        alphas = [r["train"][c]["alpha"] for r in ref["rounds"] for c in r["train"]]
        assert len(set(alphas)) > 1
