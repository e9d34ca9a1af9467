"""Pins of the personalised-FL rivals (Ditto, FedRep, APFL) and FedProx on the bottleneck adapters."""

from __future__ import annotations

import copy

import pytest
import torch

from feddat.algorithms.base import LocalConfig
from feddat.algorithms.baselines import FedProxAdapter, FedProxConfig
from feddat.algorithms.losses import clipped_sgd_step, proximal_term, task_loss
from feddat.algorithms.personalised import (ALPHA, APFLAdapter, APFLConfig, DittoAdapter, DittoConfig, FedRepAdapter,
                                            FedRepConfig)
from feddat.models.adapters import AdapterSlot, ParameterMix
from feddat.models.backbone import load_backbone
from feddat.models.vl import AnswerHead, adapt_vilt, pooled_features
from tiny import tiny_batch


def _tiny(backbone_dir, method, seed=0):
    """The tiny backbone with the method's adapters (random, so that they differ) and a head."""
    backbone, tokenizer = load_backbone(backbone_dir)
    model = adapt_vilt(backbone, method.adapters, reduction=4, views=method.views)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in method.adapters:
            for p in model.adapter_parameters(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
                p.requires_grad_(name in method.trained)
    torch.manual_seed(1)
    head = AnswerHead(backbone.config.hidden_size, 4)
    return model, head, tokenizer


class Recorder(torch.optim.SGD):
    """SGD with learning rate 0 that records the gradient of every parameter at each step."""

    def __init__(self, groups):
        super().__init__([{"params": g["params"]} for g in groups], lr=0.0)
        self.grads: list[dict[int, torch.Tensor]] = []

    def step(self, closure=None):
        self.grads.append({id(p): p.grad.clone() for g in self.param_groups for p in g["params"]
                           if p.grad is not None})
        return super().step(closure)


def _task_grads(model, head, batch, view, params):
    model.set_view(view)
    loss = task_loss(head(pooled_features(model, batch)), batch["labels"])
    return torch.autograd.grad(loss, params)


# ----- the proximal term (Ditto, FedProx) -----
def test_proximal_gradient_is_coefficient_times_difference():
    p = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    q = torch.tensor([[3.0]], requires_grad=True)
    anchor = [torch.tensor([0.0, 1.0, 0.5]), torch.tensor([[1.0]])]
    lam = 0.3
    loss = proximal_term([p, q], anchor, lam)
    assert loss.item() == pytest.approx(lam / 2 * (1 + 9 + 0 + 4))
    loss.backward()
    assert torch.allclose(p.grad, torch.tensor([0.3, -0.9, 0.0]))
    assert torch.allclose(q.grad, torch.tensor([[0.6]]))
    with pytest.raises(ValueError):
        proximal_term([p], anchor, lam)


def test_ditto_personal_step_is_task_gradient_plus_lambda_times_distance_to_received_global(tiny_backbone_dir):
    method = DittoAdapter(DittoConfig(ditto_lambda=0.7))
    model, head, tokenizer = _tiny(tiny_backbone_dir, method)
    batch = tiny_batch(tokenizer)
    cfg = LocalConfig()
    method.begin_round(model)
    received = [p.detach().clone() for p in model.adapter_parameters("global")]
    local = model.adapter_parameters("local")
    twin_model, twin_head = copy.deepcopy(model), copy.deepcopy(head)
    expected_task = _task_grads(twin_model, twin_head, batch, "local", twin_model.adapter_parameters("local"))
    opt = Recorder(method.param_groups(model, head, cfg))
    losses = method.train_step(model, head, batch, opt, cfg)
    assert len(opt.grads) == 2 and losses["prox"] > 0
    global_step, personal_step = opt.grads
    # the global adapter learns the task alone, the personal adapter nothing in that sub-step
    assert all(id(p) in global_step for p in model.adapter_parameters("global"))
    assert not any(id(p) in global_step for p in local)
    # the personal sub-step: task gradient + lambda * (personal - global as received); no gradient into global
    assert not any(id(p) in personal_step for p in model.adapter_parameters("global"))
    for p, g_task, w in zip(local, expected_task, received):
        assert torch.allclose(personal_step[id(p)], g_task + 0.7 * (p.detach() - w), atol=1e-6)


def test_fedprox_gradient_adds_mu_times_distance_to_received_global(tiny_backbone_dir):
    method = FedProxAdapter(FedProxConfig(fedprox_mu=2.0))
    model, head, tokenizer = _tiny(tiny_backbone_dir, method)
    batch = tiny_batch(tokenizer)
    cfg = LocalConfig()
    method.begin_round(model)
    received = [p.detach().clone() for p in model.adapter_parameters("global")]
    with torch.no_grad():  # as if some local steps had moved the adapter away from what was received
        for p in model.adapter_parameters("global"):
            p.add_(0.05)
    twin_model, twin_head = copy.deepcopy(model), copy.deepcopy(head)
    expected_task = _task_grads(twin_model, twin_head, batch, "student", twin_model.adapter_parameters("global"))
    opt = Recorder(method.param_groups(model, head, cfg))
    method.train_step(model, head, batch, opt, cfg)
    for p, g_task, w in zip(model.adapter_parameters("global"), expected_task, received):
        assert torch.allclose(opt.grads[0][id(p)], g_task + 2.0 * (p.detach() - w), atol=1e-6)


# ----- FedRep -----
def _snapshot(model, head):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(head.state_dict())


def _changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_fedrep_trains_the_head_then_the_adapter(tiny_backbone_dir):
    method = FedRepAdapter(FedRepConfig(fedrep_head_epochs=2))
    model, head, tokenizer = _tiny(tiny_backbone_dir, method)
    cfg = LocalConfig(local_epochs=1)
    assert method.local_epochs(cfg) == 3
    opt = torch.optim.AdamW(method.param_groups(model, head, cfg), weight_decay=cfg.weight_decay)
    phases = []
    for epoch in range(method.local_epochs(cfg)):
        method.begin_epoch(model, epoch, cfg)
        m0, h0 = _snapshot(model, head)
        method.train_step(model, head, tiny_batch(tokenizer, seed=epoch), opt, cfg)
        m1, h1 = _snapshot(model, head)
        phases.append((model.round_state["phase"], _changed(m0, m1), _changed(h0, h1), set(h0)))
    assert [p[0] for p in phases] == ["head", "head", "adapter"]
    for phase, model_changed, head_changed, head_keys in phases:
        if phase == "head":
            assert not model_changed and head_changed == head_keys   # the adapter is fixed, weight decay too
        else:
            assert model_changed and all(".adapters.global." in k for k in model_changed)
            assert not head_changed                                   # the head is fixed


# ----- APFL -----
def test_parameter_mix_gradient_in_alpha_by_hand():
    # one layer of width 1, bottleneck 1: A(h) = u * relu(d * h + b_d) + b_u
    slot = AdapterSlot(("local", "global"), dim=1, bottleneck=1)
    values = {"local": (1.0, 0.0, 2.0, 0.0), "global": (3.0, 0.0, 0.0, 1.0)}   # (d, b_d, u, b_u)
    with torch.no_grad():
        for name, (d, bd, u, bu) in values.items():
            a = slot.adapters[name]
            a.down.weight.fill_(d), a.down.bias.fill_(bd), a.up.weight.fill_(u), a.up.bias.fill_(bu)
    alpha = torch.tensor(0.25, requires_grad=True)
    slot.mix = ParameterMix("local", "global", alpha)
    out = slot(torch.ones(1, 1))
    # mixed: d = 0.25*1 + 0.75*3 = 2.5, u = 0.25*2 = 0.5, b_u = 0.75 -> A(1) = 0.5*2.5 + 0.75 = 2
    assert out.item() == pytest.approx(3.0)
    out.sum().backward()
    # L(alpha) = 1 + 2a * (3 - 2a) + (1 - a) = 1 + 5a - 4a^2 -> dL/dalpha = 5 - 8a = 3 at a = 0.25
    assert alpha.grad.item() == pytest.approx(3.0)
    # the local adapter gets alpha times the mixed parameter's gradient; the global one none (detached)
    assert slot.adapters["local"].up.weight.grad.item() == pytest.approx(0.25 * 2.5)
    assert slot.adapters["local"].down.weight.grad.item() == pytest.approx(0.25 * 0.5)
    assert all(p.grad is None for p in slot.adapters["global"].parameters())


def test_clipped_sgd_step_keeps_alpha_in_unit_interval():
    a = torch.tensor(0.5)
    assert clipped_sgd_step(a, torch.tensor(2.0), 0.1).item() == pytest.approx(0.3)
    assert clipped_sgd_step(a, torch.tensor(2.0), 1.0).item() == 0.0
    assert clipped_sgd_step(a, torch.tensor(-2.0), 1.0).item() == 1.0


def test_apfl_step_moves_alpha_by_the_mixed_loss_gradient(tiny_backbone_dir):
    method = APFLAdapter(APFLConfig(apfl_alpha_lr=0.5))
    model, head, tokenizer = _tiny(tiny_backbone_dir, method)
    batch = tiny_batch(tokenizer)
    cfg = LocalConfig()
    method.load_private_state(model, {ALPHA: torch.tensor(0.4)})
    with pytest.raises(ValueError, match="set_parameter_mix"):
        type(model)(model.backbone, [], 32, ("local", "global"), 8, method.views).set_view("mixed")
    model.set_view("mixed")
    loss = task_loss(head(pooled_features(model, batch)), batch["labels"])
    (g_alpha,) = torch.autograd.grad(loss, [model.mix_alpha])
    assert g_alpha.abs() > 1e-6
    opt = Recorder(method.param_groups(model, head, cfg))
    method.train_step(model, head, batch, opt, cfg)
    assert model.mix_alpha.item() == pytest.approx(min(max(0.4 - 0.5 * g_alpha.item(), 0.0), 1.0), abs=1e-6)
    assert method.private_state(model)[ALPHA].item() == pytest.approx(model.mix_alpha.item())
    # one step: w from its own loss only, v from the mixed loss only
    twin_model, twin_head = copy.deepcopy(model), copy.deepcopy(head)
    expected_w = _task_grads(twin_model, twin_head, batch, "student", twin_model.adapter_parameters("global"))
    (step,) = opt.grads
    for p, g in zip(model.adapter_parameters("global"), expected_w):
        assert torch.allclose(step[id(p)], g, atol=1e-6)
    assert all(id(p) in step for p in model.adapter_parameters("local"))


def test_personalised_methods_send_what_feddat_sends(tiny_config):
    from feddat.federation.aggregate import update_bytes
    from feddat.federation.inprocess import build

    sent = {}
    for name in ("feddat", "ditto-adapter", "fedrep-adapter", "apfl-adapter"):
        setup = build(tiny_config(method=name))
        worker, client = setup.worker, setup.clients[0]
        state = worker.initial_state(0, len(client.answers), 0)
        res = worker.fit(client, state, worker.initial_global(0), 0, 1, 0, 0)
        sent[name] = ({k: (tuple(v.shape), v.dtype) for k, v in res.update.items()}, update_bytes(res.update))
        if name == "apfl-adapter":
            assert set(res.state) - set(state) == set() and ALPHA in res.state
    assert all(v == sent["feddat"] for v in sent.values())
