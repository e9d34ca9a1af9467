"""Pins of the authors' departures (feddat.algorithms.authors) on a tiny real ViLT: each behaviour on its own."""

import math

import pytest
import torch

from feddat.algorithms.authors import (AuthorsOptimizer, FedAvgAdapterAuthors, FedDATAuthors, FedDATAuthorsConfig,
                                       FedDATAuthorsZeroGrad, authors_lr_factor)
from feddat.algorithms.base import LocalConfig
from feddat.algorithms.feddat import FedDAT
from feddat.cli import main
from feddat.errors import FedDATError
from tiny import tiny_batch


def test_methods_lists_the_authors_variants(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("feddat-authors", "fedavg-adapter-authors", "feddat-authors-schedule", "feddat-authors-zerograd",
                 "feddat-authors-freeze"):
        assert name in out


def test_authors_schedule_is_transformers_polynomial_decay_with_warmup():
    from transformers import get_polynomial_decay_schedule_with_warmup

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = get_polynomial_decay_schedule_with_warmup(opt, num_warmup_steps=3, num_training_steps=30, lr_end=0.0)
    for step in range(30):
        assert math.isclose(opt.param_groups[0]["lr"], authors_lr_factor(step, 30), abs_tol=1e-12), step
        opt.step()
        sched.step()


def _worker_run(tiny_config, method: str, rounds=(0, 1), **overrides):
    """The learning rates of every optimiser step in each round, and client 0's (private state, global adapter) at
    the start and after each round."""
    from feddat.federation.inprocess import build

    setup = build(tiny_config(method=method, **overrides))
    worker, client = setup.worker, setup.clients[0]
    state, global_state = worker.initial_state(0, client.head_spec, 0), worker.initial_global(0)
    lrs, states = [], [(state, global_state)]
    step = AuthorsOptimizer.step

    def recording_step(self, closure=None):
        lrs[-1].append(self.param_groups[-1]["lr"])
        return step(self, closure)

    AuthorsOptimizer.step = recording_step
    try:
        for r in rounds:
            lrs.append([])
            res = worker.fit(client, state, global_state, r, 4, 0, 0)
            state, global_state = res.state, res.update
            states.append((state, global_state))
    finally:
        AuthorsOptimizer.step = step
    return lrs, states, -(-len(client.train) // setup.cfg.batch_size), setup.cfg


def test_schedule_restarts_every_round_and_steps_per_sub_step(tiny_config):
    lrs, _, batches, cfg = _worker_run(tiny_config, "feddat-authors-schedule", train_per_client=48)
    horizon = cfg.authors_horizon_epochs * batches
    expected = [cfg.lr_adapter * authors_lr_factor(k, horizon) for k in range(2 * batches)]  # two sub-steps a batch
    assert lrs[0][0] == 0.0
    for round_lrs in lrs:  # the same ramp in round 0 and round 1: restarted
        assert round_lrs == pytest.approx(expected, rel=1e-12)
    fedavg_lrs, _, _, _ = _worker_run(tiny_config, "fedavg-adapter-authors", train_per_client=48)
    assert fedavg_lrs[1] == pytest.approx(expected[:batches], rel=1e-12)  # once per batch: half as far up the ramp


def test_frozen_local_adapter_trains_in_round_zero_only(tiny_config):
    _, states, _, _ = _worker_run(tiny_config, "feddat-authors-freeze", rounds=(0, 1, 2))
    local = lambda s: {k: v for k, v in s[0].items() if k.startswith("adapter.local.")}
    head = lambda s: {k: v for k, v in s[0].items() if k.startswith("head.")}
    equal = lambda a, b: all(torch.equal(a[k], v) for k, v in b.items())
    _, faithful, _, _ = _worker_run(tiny_config, "feddat", rounds=(0, 1))
    assert equal(local(states[1]), local(faithful[1]))        # round 0 is FedDAT's round 0
    assert not equal(local(states[1]), local(states[0]))      # in which the local adapter trains
    for later in states[2:]:
        assert equal(local(later), local(states[1]))          # then never again, bit for bit
        assert not equal(head(later), head(states[1]))        # while the head
    assert not equal(states[3][1], states[2][1])              # and the global adapter train
    assert not equal(local(faithful[2]), local(faithful[1]))  # the faithful FedDAT trains it every round


def _global_after_each_sub_step(method, model, head, tokenizer, steps: int = 2):
    """The global adapter after every optimiser step, and the optimiser's AdamW state after each."""
    cfg = LocalConfig(lr_adapter=0.05, weight_decay=0.01)
    opt = method.optimizer(method.param_groups(model, head, cfg), cfg, batches=10)
    for g in opt.param_groups:
        g["lr"] = g["base_lr"]
    params = model.adapter_parameters("global")
    seen = []
    step = opt.step

    def recording_step(closure=None):
        out = step(closure)
        seen.append(([p.detach().clone() for p in params],
                     [{k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()} for p in params]))
        return out

    opt.step = recording_step
    for _ in range(steps // 2):
        method.train_step(model, head, tiny_batch(tokenizer), opt, cfg)
    return seen, cfg


def test_every_departure_together_trains_rounds_of_several_batches(tiny_config):
    lrs, states, batches, _ = _worker_run(tiny_config, "feddat-authors", rounds=(0, 1, 2))
    assert batches > 1 and all(len(r) == 2 * batches for r in lrs)
    local = [{k: v for k, v in s.items() if k.startswith("adapter.local.")} for s, _ in states]
    assert all(torch.equal(local[3][k], v) for k, v in local[1].items())
    assert all(torch.isfinite(v).all() for v in states[3][1].values())


def test_zero_filled_gradients_move_the_untrained_adapter_by_adamw_momentum_exactly(tiny):
    model, head, tokenizer = tiny
    seen, cfg = _global_after_each_sub_step(FedDATAuthorsZeroGrad(), model, head, tokenizer)
    (after_student, state1), (after_teacher, state2) = seen
    beta1, beta2, eps, lr, wd = 0.9, 0.98, 1e-8, cfg.lr_adapter, cfg.weight_decay
    moved = False
    for p1, p2, s1, s2 in zip(after_student, after_teacher, state1, state2):
        assert int(s2["step"]) == 2  # the DAT sub-step took an AdamW step on the global adapter, with grad 0
        m, v = s1["exp_avg"] * beta1, s1["exp_avg_sq"] * beta2
        # momentum decays with a zero gradient (AdamW's lerp rounds its last bit differently from a product)
        assert torch.allclose(m, s2["exp_avg"], rtol=1e-6, atol=0) and torch.allclose(v, s2["exp_avg_sq"], rtol=1e-6)
        expected = p1 * (1 - lr * wd)
        expected = expected - (lr / (1 - beta1 ** 2)) * m / (v.sqrt() / math.sqrt(1 - beta2 ** 2) + eps)
        assert torch.allclose(p2, expected, rtol=0, atol=1e-7)
        moved |= not torch.equal(p1, p2)
    assert moved


def test_faithful_step_leaves_the_untrained_adapter_exactly_as_it_is(tiny):
    model, head, tokenizer = tiny
    method = FedDAT()
    cfg = LocalConfig()
    opt = method.optimizer(method.param_groups(model, head, cfg), cfg, batches=10)
    params = model.adapter_parameters("global")
    seen = []
    step = opt.step
    opt.step = lambda closure=None: (step(closure), seen.append([p.detach().clone() for p in params]))[0]
    method.train_step(model, head, tiny_batch(tokenizer), opt, cfg)
    assert all(torch.equal(a, b) for a, b in zip(*seen))


def test_authors_variants_refuse_the_fused_step_with_zero_filled_gradients(tiny):
    model, head, _ = tiny
    method = FedDATAuthors(FedDATAuthorsConfig(fused=True))
    with pytest.raises(FedDATError, match="no fused form"):
        method.optimizer(method.param_groups(model, head, LocalConfig()), LocalConfig(), 10)
    assert FedAvgAdapterAuthors().departures == ("schedule",)
