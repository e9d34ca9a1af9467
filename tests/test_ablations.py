"""Pins of FedDAT's ablations: each differs from FedDAT in exactly the piece it removes."""

from __future__ import annotations

import copy

import pytest
import torch

from feddat.algorithms.ablations import (FedDATKDStudent, FedDATKDTeacher, FedDATNoFrozen, FedDATNoMKD,
                                         FedDATSingleTeacher)
from feddat.algorithms.base import LocalConfig
from feddat.algorithms.feddat import FedDAT
from feddat.models.backbone import load_backbone
from feddat.models.vl import AnswerHead, adapt_vilt
from tiny import tiny_batch


@pytest.fixture()
def parts(tiny_backbone_dir):
    backbone, tokenizer = load_backbone(tiny_backbone_dir)
    return backbone, tokenizer


def _model(backbone, method, seed=0):
    model = adapt_vilt(backbone, method.adapters, reduction=4, views=method.views)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in method.adapters:
            for p in model.adapter_parameters(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
                p.requires_grad_(name in method.trained)
    torch.manual_seed(1)
    return model, AnswerHead(backbone.config.hidden_size, 4)


def _after_step(method, model, head, batch, perturb: str | None, read: str = "global", cfg=LocalConfig()):
    """Adapter `read` after one SGD train_step, with adapter `perturb` changed first (on copies)."""
    model, head = copy.deepcopy(model), copy.deepcopy(head)
    if perturb is not None:
        with torch.no_grad():
            for p in model.adapter_parameters(perturb):
                p.add_(0.3)
    method.train_step(model, head, batch, torch.optim.SGD(method.param_groups(model, head, cfg)), cfg)
    return model.adapter_state(read)


def _differs(a, b):
    return any(not torch.allclose(a[k], b[k], rtol=0, atol=1e-9) for k in a)


@pytest.mark.parametrize("method, teacher_part, learns_from_teacher", [
    (FedDAT(), "local", True),
    (FedDATNoMKD(), "local", False),            # no distillation: the student never sees the teacher
    (FedDATSingleTeacher(), "global_frozen", True),
    (FedDATNoFrozen(), "local", True),
    (FedDATKDStudent(), "local", True),         # the DAT still teaches the student
    (FedDATKDTeacher(), "local", False),        # only the student teaches: the student learns the task alone
])
def test_student_update_depends_on_the_teacher_only_with_distillation(parts, method, teacher_part,
                                                                      learns_from_teacher):
    backbone, tokenizer = parts
    model, head = _model(backbone, method)
    batch = tiny_batch(tokenizer)
    base = _after_step(method, model, head, batch, None)
    moved = _after_step(method, model, head, batch, teacher_part)
    assert _differs(base, moved) == learns_from_teacher


@pytest.mark.parametrize("method, learns_from_student", [
    (FedDAT(), True),
    (FedDATNoMKD(), False),
    (FedDATKDStudent(), False),     # the local adapter learns the task alone
    (FedDATKDTeacher(), True),
])
def test_local_update_depends_on_the_student_only_with_distillation_into_the_teacher(parts, method,
                                                                                      learns_from_student):
    backbone, tokenizer = parts
    model, head = _model(backbone, method)
    batch = tiny_batch(tokenizer)
    # The head does not move (no gradient): the student reaches the teacher's sub-step only through distillation.
    head.requires_grad_(False)
    cfg = LocalConfig(lr_adapter=0.5)
    base = _after_step(method, model, head, batch, None, "local", cfg)
    moved = _after_step(method, model, head, batch, "global", "local", cfg)
    assert _differs(base, _model(backbone, method)[0].adapter_state("local"))   # the step moved it
    assert _differs(base, moved) == learns_from_student


def test_mkd_losses_per_sub_step(parts):
    task, kd = torch.tensor(2.0), torch.tensor(1.0)
    expected = {FedDAT: (1.5, 1.5), FedDATNoMKD: (2.0, 2.0), FedDATKDStudent: (1.5, 2.0),
                FedDATKDTeacher: (2.0, 1.5)}
    for cls, (student, teacher) in expected.items():
        assert cls().mkd_loss(task, kd, "student").item() == student
        assert cls().mkd_loss(task, kd, "teacher").item() == teacher


def test_one_way_probes_are_not_in_methods_all():
    from feddat.experiments.sweep import resolve_methods

    assert "feddat-kd-student" not in resolve_methods("all") and "feddat-nomkd" in resolve_methods("all")
    assert resolve_methods("feddat-kd-student,feddat-kd-teacher") == ["feddat-kd-student", "feddat-kd-teacher"]


def test_single_teacher_is_the_frozen_copy_and_trains_the_global_adapter_and_head_only(parts):
    backbone, tokenizer = parts
    method = FedDATSingleTeacher()
    assert method.adapters == ("global", "global_frozen") and method.teacher_view == "frozen"
    model, head = _model(backbone, method)
    method.begin_round(model)
    frozen = model.adapter_state("global_frozen")
    assert not _differs(frozen, model.adapter_state("global"))
    opt = torch.optim.AdamW(method.param_groups(model, head, LocalConfig()))
    method.train_step(model, head, tiny_batch(tokenizer), opt, LocalConfig())
    assert _differs(frozen, model.adapter_state("global"))
    assert not _differs(frozen, model.adapter_state("global_frozen"))


def test_nofrozen_has_no_frozen_copy_and_its_teacher_is_the_local_adapter(parts):
    backbone, tokenizer = parts
    method = FedDATNoFrozen()
    assert "global_frozen" not in method.adapters and method.predict_view == method.teacher_view == "local"
    model, head = _model(backbone, method)
    method.begin_round(model)   # nothing to copy
    method.prepare_eval(model, newest_global=True)
    local = model.adapter_state("local")
    opt = torch.optim.AdamW(method.param_groups(model, head, LocalConfig()))
    method.train_step(model, head, tiny_batch(tokenizer), opt, LocalConfig())
    assert _differs(local, model.adapter_state("local"))


def test_ablations_send_what_feddat_sends(tiny_config):
    from feddat.federation.inprocess import build

    shapes = {}
    for name in ("feddat", "feddat-nomkd", "feddat-single-teacher", "feddat-nofrozen", "feddat-kd-student",
                 "feddat-kd-teacher"):
        worker = build(tiny_config(method=name)).worker
        shapes[name] = {k: tuple(v.shape) for k, v in worker.initial_global(0).items()}
    assert all(v == shapes["feddat"] for v in shapes.values())
