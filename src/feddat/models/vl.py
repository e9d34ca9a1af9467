"""A client's model: the shared frozen backbone with named adapters, plus a personal answer head."""

from __future__ import annotations

import contextlib
import weakref
from typing import Mapping

import torch
from torch import nn

from feddat.data.pool import HeadSpec
from feddat.models import blip
from feddat.models.adapters import AdaptedModel, View
from feddat.models.backbone import LayerCall, backbone_family, encode, encode_from, encode_until


class AnswerHead(nn.Module):
    """Linear(d, 2d) -> LayerNorm -> GELU -> Linear(2d, answers), the VQA head of the authors' code. With
    `inputs=2` (image pairs, as ViLT's NLVR2 classifier) it reads the two pooled vectors concatenated:
    Linear(2d, 2d) first."""

    def __init__(self, dim: int, n_answers: int, inputs: int = 1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(inputs * dim, 2 * dim), nn.LayerNorm(2 * dim), nn.GELU(),
                                 nn.Linear(2 * dim, n_answers))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:  # (B, d), or (B, inputs, d)
        return self.net(pooled.flatten(1))


class ChoiceHead(nn.Module):
    """Multiple choice (VCR-style): Dropout(0.1) -> Linear(d, 1) per candidate; the candidates' scores are the
    logits over the choice."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Dropout(0.1), nn.Linear(dim, 1))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:  # (B, k, d)
        return self.net(pooled).squeeze(-1)


def make_head(dim: int, spec: "HeadSpec | int") -> nn.Module:
    """The head of a client's task; a bare int is a VQA head with that many answers."""
    if isinstance(spec, int):
        spec = HeadSpec("vqa", spec)
    if spec.task == "pair":
        return AnswerHead(dim, spec.n_answers, inputs=2)
    if spec.task == "choice":
        return ChoiceHead(dim)
    if spec.task in ("vqa", "entailment"):
        return AnswerHead(dim, spec.n_answers)
    raise ValueError(f"unknown task {spec.task!r}")


def ungroup(batch: dict) -> tuple[dict, int | None]:
    """A batch of image pairs (pixel_values (B, 2, 3, H, W)) or of candidate texts (input_ids (B, k, L)) as a
    flat batch of B*k (image, text) inputs, and k (None for a plain batch)."""
    ids, mask, px = batch["input_ids"], batch["attention_mask"], batch.get("pixel_values")
    if ids.dim() == 3:
        k = ids.shape[1]
        px = None if px is None else px.repeat_interleave(k, 0)
        ids, mask = ids.flatten(0, 1), mask.flatten(0, 1)
    elif (px is not None and px.dim() == 5) or batch.get("pairs"):  # "pairs": a batch whose images were left out
        k = 2 if px is None else px.shape[1]
        px = None if px is None else px.flatten(0, 1)
        ids, mask = ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
    else:
        return batch, None
    out = {**batch, "input_ids": ids, "attention_mask": mask}
    if px is not None:
        out["pixel_values"] = px
    return out, k


def _regroup(features: torch.Tensor, k: int | None) -> torch.Tensor:
    return features if k is None else features.unflatten(0, (-1, k))


def adapt_vilt(backbone, names: tuple[str, ...], reduction: int, views: Mapping[str, View] | None = None) -> AdaptedModel:
    """Attach adapter slots after the output block of every ViLT layer; `views` beyond the base ones (a method's
    `views`)."""
    dim = backbone.config.hidden_size
    if reduction <= 0 or dim // reduction < 1:
        raise ValueError(f"adapter reduction {reduction} does not fit hidden size {dim}")
    layers = [layer.output for layer in backbone.encoder.layer]
    return AdaptedModel(backbone, layers, dim, names, dim // reduction, views)


def adapt_backbone(backbone, names: tuple[str, ...], reduction: int,
                   views: Mapping[str, View] | None = None) -> AdaptedModel:
    """Attach adapter slots to a backbone of either family: `adapt_vilt`, or after the FFN of every layer of
    both of BLIP's encoders (`BlipBackbone.adapted_layers`)."""
    if backbone_family(backbone) == "vilt":
        return adapt_vilt(backbone, names, reduction, views)
    dim = backbone.config.hidden_size
    if reduction <= 0 or dim // reduction < 1:
        raise ValueError(f"adapter reduction {reduction} does not fit hidden size {dim}")
    return AdaptedModel(backbone, backbone.adapted_layers(), dim, names, dim // reduction, views)


def compile_layers(backbone) -> None:
    """torch.compile each encoder layer (with its adapter hook) in place: FedDAT runs the layers after the
    first one itself (`pooled_features_of_views`), so compiling the whole model would leave them eager. The
    modules, their parameters and state-dict keys stay the same; each layer compiles at its first call."""
    if backbone_family(backbone) == "blip":
        layers = [*backbone.vision_model.encoder.layers, *backbone.text_model.encoder.layer]
    else:
        layers = backbone.encoder.layer
    for layer in layers:
        layer.compile()


def autocast(model: AdaptedModel):
    """The context of the model's forward passes: torch.autocast to `model.autocast_dtype` (bfloat16 with
    `precision="bf16"`) on the backbone's device, or nothing (fp32) when it is None."""
    if model.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(next(model.backbone.parameters()).device.type, dtype=model.autocast_dtype)


def _autocast_out(model: AdaptedModel, features: torch.Tensor) -> torch.Tensor:
    """Features computed under `autocast` back in float32 (without autocast: untouched)."""
    return features if model.autocast_dtype is None else features.float()


def pooled_features(model: AdaptedModel, batch: dict) -> torch.Tensor:
    """The pooled [CLS] vector under the model's current view (for BLIP: the text encoder's [CLS] position):
    (B, d), or (B, k, d) for a batch of image pairs or candidate texts (`ungroup`). Computed under `autocast`,
    returned in float32 (the head and the losses stay in float32)."""
    batch, k = ungroup(batch)
    with autocast(model):
        if backbone_family(model.backbone) == "blip":
            pooled = blip.encode(model.backbone, batch["input_ids"], batch["attention_mask"],
                                 batch["pixel_values"])[1]
        elif "prefix" in batch:
            call = batch["prefix"]
            pooled = encode_from(model.backbone, call, model.slots[0](call.hidden))[1]
        else:
            pooled = encode(model.backbone, batch["input_ids"], batch["attention_mask"], batch["pixel_values"])[1]
    return _regroup(_autocast_out(model, pooled), k)


def pooled_features_of_views(model: AdaptedModel, batch: dict, views: tuple[str, ...],
                             stacked: bool = False) -> list[torch.Tensor]:
    """`pooled_features` under each view, with what comes before the first adapter slot (embeddings and
    ViLT's first layer, the same in every view) computed once. One pass per view in turn (the model is left
    in the last view), or with `stacked` one pass over the views side by side along the batch dimension
    (`AdaptedModel.set_views`), split again at the end.

    The values are those of separate `pooled_features` calls (up to rounding when stacked); the shared part
    must not require gradients (a frozen backbone), since every view's backward goes through it.
    For BLIP the shared part is the image embeddings, the first image layer up to its FFN output, and the text
    embeddings (`feddat.models.blip.pooled_features_of_views`).
    """
    batch, k = ungroup(batch)
    with autocast(model):
        if backbone_family(model.backbone) == "blip":
            features = blip.pooled_features_of_views(model, batch, views, stacked)
        else:
            features = _vilt_features_of_views(model, batch, views, stacked)
    return [_regroup(_autocast_out(model, f), k) for f in features]


def _vilt_features_of_views(model: AdaptedModel, batch: dict, views: tuple[str, ...],
                            stacked: bool) -> list[torch.Tensor]:
    if "prefix" in batch:
        call = batch["prefix"]
    else:
        model.set_view("none")
        call = encode_until(model.backbone, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], 1)
    if stacked:
        model.set_views(views)
        call = call.repeated(len(views))
        return list(encode_from(model.backbone, call, model.slots[0](call.hidden))[1].chunk(len(views)))
    features = []
    for view in views:
        model.set_view(view)
        features.append(encode_from(model.backbone, call, model.slots[0](call.hidden))[1])
    return features


class PrefixCache:
    """ViLT's frozen layers before the first adapter slot (the embeddings and layer 0: `encode_until(..., 1)`),
    run once over each split the worker meets and kept, so that every later pass over its items (each epoch,
    each view, each evaluation) starts at the first adapter. For methods that train and hook nothing below it
    (`Method.modifies_backbone` False); `pooled_features` and `pooled_features_of_views` take the rows of a
    batch from `batch["prefix"]`. The rows are those a pass over the batch computes (every row of ViLT's
    forward is computed on its own; `tests/test_prefix_cache.py`), so results do not change.

    Splits are kept while their total stays within `budget_bytes`; a split that would go past it is computed
    batch by batch as without the cache. BLIP backbones are not cached (their frozen part differs).
    """

    CHUNK = 256

    def __init__(self, model: AdaptedModel, budget_bytes: int):
        self.model = model
        self.budget = budget_bytes
        self.used = 0
        self._calls: dict[int, tuple[weakref.ref, LayerCall | None, int]] = {}

    def batch(self, split, idx: torch.Tensor, device) -> dict:
        """`split.batch(idx, device)`, with the rows of its frozen prefix under "prefix" when it is kept (and
        then without the images: nothing reads them, and a client folder's would be decoded for nothing)."""
        call, k = self._of(split, device)
        batch = split.batch(idx, device, pixels=call is None)
        if call is not None:
            rows = idx if k is None else (idx[:, None] * k + torch.arange(k)).flatten()
            batch["prefix"] = call.rows(rows)
        return batch

    @torch.no_grad()
    def _of(self, split, device) -> tuple[LayerCall | None, int | None]:
        held = self._calls.get(id(split))
        if held is not None and held[0]() is split:
            return held[1], held[2]
        call, k = self._compute(split, device)
        self._calls[id(split)] = (weakref.ref(split, lambda _, key=id(split): self._forget(key)), call, k)
        return call, k

    def _forget(self, key: int) -> None:
        """A split is gone: free what was kept for it."""
        held = self._calls.pop(key, None)
        if held is not None and held[1] is not None:
            self.used -= _call_bytes(held[1])

    def _compute(self, split, device) -> tuple[LayerCall | None, int | None]:
        n = len(split)
        if self.budget <= self.used or n == 0:
            return None, None
        model, calls, k = self.model, [], None
        view = model.view
        model.set_view("none")
        try:
            for start in range(0, n, self.CHUNK):
                flat, k = ungroup(split.batch(torch.arange(start, min(start + self.CHUNK, n)), device))
                with autocast(model):
                    calls.append(encode_until(model.backbone, flat["input_ids"], flat["attention_mask"],
                                              flat["pixel_values"], 1))
                if start == 0:  # give up on a split that would go past the budget before computing the rest
                    estimate = _call_bytes(calls[0]) * n // min(self.CHUNK, n)
                    if self.used + estimate > self.budget:
                        return None, None
        finally:  # the caller's view, as it set it
            model.set_views(tuple(view.split("+"))) if "+" in view else model.set_view(view)
        call = LayerCall.cat(calls) if len(calls) > 1 else calls[0]
        self.used += _call_bytes(call)
        return call, k


def _call_bytes(call: LayerCall) -> int:
    tensors = [call.hidden, *call.args, *call.kwargs.values()]
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))
