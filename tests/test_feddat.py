"""Pins of the FedDAT algorithm on a tiny real ViLT."""

import copy

import torch

from feddat.algorithms.base import LocalConfig
from feddat.algorithms.feddat import FedDAT
from feddat.algorithms.losses import kd_loss, task_loss
from feddat.models.adapters import AdapterSlot
from feddat.models.vl import pooled_features
from tiny import tiny_batch


def test_slot_adds_the_weighted_mix_of_adapter_outputs():
    slot = AdapterSlot(("local", "global_frozen", "global"), dim=8, bottleneck=2)
    with torch.no_grad():
        for p in slot.parameters():
            p.normal_()
    h = torch.randn(3, 8)
    slot.mix = (("local", 0.5), ("global_frozen", 0.5))
    expected = h + 0.5 * (slot.adapters["local"](h) + slot.adapters["global_frozen"](h))
    assert torch.allclose(slot(h), expected)


def test_teacher_view_equals_mean_of_adapters_formula_through_the_model(tiny):
    model, _, tokenizer = tiny
    batch = tiny_batch(tokenizer)
    model.set_view("teacher")
    got = pooled_features(model, batch)
    # Manual rollout of ViLT with h <- h + 0.5 * (A_local(h) + A_frozen(h)) after every layer.
    vilt = model.backbone
    model.set_view("none")
    from transformers.masking_utils import create_bidirectional_mask

    from feddat.models.backbone import image_embeddings

    with torch.no_grad():
        img = image_embeddings(vilt, batch["pixel_values"])
        mask = torch.ones(img.shape[:2], dtype=torch.long)
        h, attn = vilt.embeddings(batch["input_ids"], batch["attention_mask"], None, None, mask, None, img)
        ext = create_bidirectional_mask(config=vilt.config, inputs_embeds=h, attention_mask=attn)
        for layer, slot in zip(vilt.encoder.layer, model.slots):
            h = layer(h, ext)[0]
            h = h + 0.5 * (slot.adapters["local"](h) + slot.adapters["global_frozen"](h))
        expected = vilt.pooler(vilt.layernorm(h))
    assert torch.allclose(got, expected, atol=1e-5)
    model.set_view("none")
    assert not torch.allclose(pooled_features(model, batch), got, atol=1e-3)


def _snapshot(model, head):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(head.state_dict())


def _changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_local_step_changes_only_global_local_and_head(tiny):
    model, head, tokenizer = tiny
    method = FedDAT()
    for name in method.adapters:
        for p in model.adapter_parameters(name):
            p.requires_grad_(name in method.trained)
    cfg = LocalConfig()
    opt = torch.optim.AdamW(method.param_groups(model, head, cfg), weight_decay=cfg.weight_decay)
    m0, h0 = _snapshot(model, head)
    method.train_step(model, head, tiny_batch(tokenizer), opt, cfg)
    m1, h1 = _snapshot(model, head)
    changed = _changed(m0, m1)
    assert changed, "the step changed nothing"
    assert all(".adapters.global." in k or ".adapters.local." in k for k in changed), changed
    assert any(".adapters.global." in k for k in changed) and any(".adapters.local." in k for k in changed)
    assert not any(k.startswith("backbone.") for k in changed)
    assert not any("global_frozen" in k for k in changed)
    assert _changed(h0, h1) == set(h0)


def test_begin_round_copies_global_into_frozen(tiny):
    model, _, _ = tiny
    FedDAT().begin_round(model)
    g, f = model.adapter_state("global"), model.adapter_state("global_frozen")
    assert all(torch.equal(g[k], f[k]) for k in g)


def _reference_three_forward_step(model, head, batch, opt, t):
    """The authors' form: teacher logits, student step, then a fresh (third) teacher forward."""
    y = batch["labels"]
    model.set_view("teacher")
    with torch.no_grad():
        z_t = head(pooled_features(model, batch))
    model.set_view("student")
    z_s = head(pooled_features(model, batch))
    loss_s = (task_loss(z_s, y) + kd_loss(z_s, z_t, t)) / 2
    opt.zero_grad(set_to_none=True)
    loss_s.backward()
    opt.step()
    model.set_view("teacher")
    z_t2 = head(pooled_features(model, batch))
    loss_t = (task_loss(z_t2, y) + kd_loss(z_t2, z_s.detach(), t)) / 2
    opt.zero_grad(set_to_none=True)
    loss_t.backward()
    opt.step()


def test_efficient_step_equals_three_forward_form(tiny):
    model, head, tokenizer = tiny
    method = FedDAT()
    for p in model.adapter_parameters("global_frozen"):
        p.requires_grad_(False)
    # float64, so that equality is not blurred by float32 rounding of differently ordered kernels
    model.double()
    head.double()
    batch = {k: v.double() if v.is_floating_point() else v for k, v in tiny_batch(tokenizer).items()}
    cfg = LocalConfig()
    twin_model, twin_head = copy.deepcopy(model), copy.deepcopy(head)

    def sgd(m, h):  # plain SGD makes parameter equality the same as gradient equality
        return torch.optim.SGD(method.param_groups(m, h, cfg), lr=0.1)

    for _ in range(2):
        method.train_step(model, head, batch, sgd(model, head), cfg)
        _reference_three_forward_step(twin_model, twin_head, batch, sgd(twin_model, twin_head), method.config.kd_temperature)
    for (k, a), (_, b) in zip(model.state_dict().items(), twin_model.state_dict().items()):
        assert torch.allclose(a, b, rtol=0, atol=1e-12), k
    for (k, a), (_, b) in zip(head.state_dict().items(), twin_head.state_dict().items()):
        assert torch.allclose(a, b, rtol=0, atol=1e-12), k
    assert not torch.equal(model.adapter_state("local")["0.up.weight"], twin_model.adapter_state("global")["0.up.weight"])


def test_backbone_is_frozen_after_a_federated_run(tiny_config):
    from feddat.federation.inprocess import build

    setup = build(tiny_config(method="feddat"))
    worker = setup.worker
    before = copy.deepcopy(worker.model.backbone.state_dict())
    assert not any(p.requires_grad for p in worker.model.backbone.parameters())
    client = setup.clients[0]
    state = worker.initial_state(0, len(client.answers), 0)
    res = worker.fit(client, state, worker.initial_global(0), 0, 1, 0, 0)
    after = worker.model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert set(res.update) == set(worker.initial_global(0))
    assert not torch.equal(res.state["adapter.local.0.up.weight"], state["adapter.local.0.up.weight"])
    # the frozen copy in the state equals the global adapter the client received
    g0 = worker.initial_global(0)
    assert all(torch.equal(res.state[f"adapter.global_frozen.{k}"], v) for k, v in g0.items())
