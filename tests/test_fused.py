"""FedDAT's fused local step (student and DAT in one batched forward) against the unfused one, and the pass
counts of both; the split view of the adapter slots; the random-weight backbones of named sizes."""

import copy

import pytest
import torch

from feddat.algorithms.base import LocalConfig
from feddat.algorithms.feddat import FedDAT, FedDATConfig
from feddat.algorithms.losses import kd_loss, task_loss
from feddat.config import RunConfig
from feddat.errors import FedDATError
from feddat.models.adapters import AdapterSlot
from feddat.models.backbone import random_backbone, vilt_config
from feddat.models.vl import pooled_features, pooled_features_of_views
from tiny import QUESTIONS, tiny_batch


def _batch3(tokenizer, n=6, seed=0):
    return tiny_batch(tokenizer, n, seed, QUESTIONS + ("how many",))


def test_split_view_applies_one_mix_per_part_of_the_batch():
    slot = AdapterSlot(("local", "global_frozen", "global"), dim=8, bottleneck=2)
    with torch.no_grad():
        for p in slot.parameters():
            p.normal_()
    h = torch.randn(3, 5, 8)
    student, teacher = (("global", 1.0),), (("local", 0.5), ("global_frozen", 0.5))
    slot.split = (student, teacher)
    expected = torch.cat([h + slot.adapters["global"](h),
                          h + 0.5 * (slot.adapters["local"](h) + slot.adapters["global_frozen"](h))])
    assert torch.allclose(slot(torch.cat([h, h])), expected, atol=1e-6)
    with pytest.raises(ValueError, match="equal views"):
        slot(torch.randn(5, 8))


def test_set_view_clears_a_split(tiny):
    model, _, _ = tiny
    model.set_views(("student", "teacher"))
    assert all(slot.split and not slot.mix for slot in model.slots)
    model.set_view("student")
    assert all(not slot.split and slot.mix == (("global", 1.0),) for slot in model.slots)
    with pytest.raises(ValueError, match="unknown view"):
        model.set_views(("student", "dat"))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_fused_step_equals_unfused_step(tiny, optimizer):
    """Same parameters after two steps (SGD: same gradients; AdamW: the global adapter's deferred step is the
    same step), same losses. float64, so that equality is not blurred by float32 rounding."""
    model, head, tokenizer = tiny
    model.double()
    head.double()
    batch = {k: v.double() if v.is_floating_point() else v for k, v in _batch3(tokenizer).items()}
    method = FedDAT()
    twin_model, twin_head = copy.deepcopy(model), copy.deepcopy(head)

    def make_opt(m, h):
        groups = method.param_groups(m, h, LocalConfig())
        if optimizer == "sgd":
            return torch.optim.SGD(groups, lr=0.1)
        return torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01)

    opt, twin_opt = make_opt(model, head), make_opt(twin_model, twin_head)
    for _ in range(2):
        unfused = method.train_step(model, head, batch, opt, LocalConfig())
        fused = FedDAT(FedDATConfig(fused=True)).train_step(twin_model, twin_head, batch, twin_opt, LocalConfig())
        assert unfused.keys() == fused.keys()
        assert all(abs(unfused[k] - fused[k]) < 1e-12 for k in unfused), (unfused, fused)
    for (k, a), (_, b) in zip(model.state_dict().items(), twin_model.state_dict().items()):
        assert torch.allclose(a, b, rtol=0, atol=1e-12), k
    for (k, a), (_, b) in zip(head.state_dict().items(), twin_head.state_dict().items()):
        assert torch.allclose(a, b, rtol=0, atol=1e-12), k
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, twin_model.state_dict()[k])]
    assert not any("global_frozen" in k or k.startswith("backbone.") for k in changed)


def _count_passes(model):
    """Batch sizes seen by the backbone's first and last layers going forward, and by its last layer backward."""
    first, last, backward = [], [], []
    layers = model.backbone.encoder.layer
    layers[0].register_forward_hook(lambda m, args, out: first.append(args[0].shape[0]))
    layers[-1].register_forward_hook(lambda m, args, out: last.append(args[0].shape[0]))
    layers[-1].register_full_backward_hook(lambda m, gi, go: backward.append(go[0].shape[0]))
    return first, last, backward


@pytest.mark.parametrize("fused, first, last, backward", [(False, [6], [6, 6], [6, 6]), (True, [6], [12], [12])])
def test_step_passes(tiny, fused, first, last, backward):
    """Unfused: one DAT forward (reused for the DAT update) and one student forward, two backwards through the
    encoder, no third forward. Fused: one forward and one backward over the batch taken twice. Both: the frozen
    first layer, before any adapter, runs once."""
    model, head, tokenizer = tiny
    method = FedDAT(FedDATConfig(fused=fused))
    opt = torch.optim.SGD(method.param_groups(model, head, LocalConfig()), lr=0.1)
    seen = _count_passes(model)
    method.train_step(model, head, _batch3(tokenizer), opt, LocalConfig())
    assert seen == (first, last, backward)


def _two_pass_step(model, head, batch, opt, t):
    """The unfused step with two full encoder passes (nothing shared between the views)."""
    y = batch["labels"]
    model.set_view("teacher")
    teacher_features = pooled_features(model, batch)
    with torch.no_grad():
        teacher_logits = head(teacher_features)
    model.set_view("student")
    student_logits = head(pooled_features(model, batch))
    loss_student = (task_loss(student_logits, y) + kd_loss(student_logits, teacher_logits, t)) / 2
    opt.zero_grad(set_to_none=True)
    loss_student.backward()
    opt.step()
    teacher_logits = head(teacher_features)
    loss_teacher = (task_loss(teacher_logits, y) + kd_loss(teacher_logits, student_logits.detach(), t)) / 2
    opt.zero_grad(set_to_none=True)
    loss_teacher.backward()
    opt.step()


def test_unfused_step_is_bitwise_the_two_pass_step(tiny):
    """Sharing the frozen first layer between the views changes no bit of the result (float32, AdamW)."""
    model, head, tokenizer = tiny
    batch = _batch3(tokenizer)
    method, cfg = FedDAT(), LocalConfig()
    twin_model, twin_head = copy.deepcopy(model), copy.deepcopy(head)

    def adamw(m, h):
        return torch.optim.AdamW(method.param_groups(m, h, cfg), betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01)

    opt, twin_opt = adamw(model, head), adamw(twin_model, twin_head)
    for _ in range(3):
        method.train_step(model, head, batch, opt, cfg)
        _two_pass_step(twin_model, twin_head, batch, twin_opt, method.config.kd_temperature)
    for (k, a), (_, b) in zip(model.state_dict().items(), twin_model.state_dict().items()):
        assert torch.equal(a, b), k
    for (k, a), (_, b) in zip(head.state_dict().items(), twin_head.state_dict().items()):
        assert torch.equal(a, b), k


def test_views_share_the_frozen_first_layer_exactly(tiny):
    model, _, tokenizer = tiny
    batch = _batch3(tokenizer)
    expected = []
    for view in ("teacher", "student"):
        model.set_view(view)
        expected.append(pooled_features(model, batch))
    got = pooled_features_of_views(model, batch, ("teacher", "student"))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    stacked = pooled_features_of_views(model, batch, ("teacher", "student"), stacked=True)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(stacked, expected))


def test_fused_run_matches_unfused_run(tiny_config):
    """A client's round through the Worker: the same update and private state, fused or not (float32)."""
    from feddat.federation.inprocess import build

    results = []
    for fused in (False, True):
        cfg = tiny_config(method="feddat", fused=fused)
        assert cfg.method_config.fused is fused
        setup = build(cfg)
        client = setup.clients[0]
        state = setup.worker.initial_state(0, len(client.answers), 0)
        results.append(setup.worker.fit(client, state, setup.worker.initial_global(0), 0, 2, 0, 0))
    unfused, fused = results
    for k in unfused.update:
        assert torch.allclose(unfused.update[k], fused.update[k], rtol=1e-4, atol=1e-6), k
    for k in unfused.state:
        assert torch.allclose(unfused.state[k], fused.state[k], rtol=1e-4, atol=1e-6), k
    assert unfused.metrics.keys() == fused.metrics.keys()


def test_fused_option_is_validated_and_parsed():
    from feddat.cli import parser

    assert RunConfig().fused is False and RunConfig().validate().method_config.fused is False
    with pytest.raises(FedDATError, match="fused"):
        RunConfig(fused="yes").validate()
    assert parser().parse_args(["run", "--no-fused"]).fused is False
    assert parser().parse_args(["run", "--fused"]).fused is True
    assert parser().parse_args(["run"]).fused is None  # not given: --config or the default decides


def test_named_sizes_build_the_architectures():
    base = vilt_config("base")
    assert (base.hidden_size, base.num_hidden_layers, base.num_attention_heads, base.intermediate_size) == \
        (768, 12, 12, 3072)
    assert (base.image_size, base.patch_size, base.max_position_embeddings, base.vocab_size) == (384, 32, 40, 30522)
    small = random_backbone("small")
    assert small.config.hidden_size == 128 and not any(p.requires_grad for p in small.parameters())
    assert not small.training
    with pytest.raises(FedDATError, match="size"):
        vilt_config("large")
