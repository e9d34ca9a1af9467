"""A client's model: the shared frozen backbone with named adapters, plus a personal answer head."""

from __future__ import annotations

import torch
from torch import nn

from feddat.models.adapters import AdaptedModel
from feddat.models.backbone import backbone_family, encode, encode_from, encode_until


class AnswerHead(nn.Module):
    """Linear(d, 2d) -> LayerNorm -> GELU -> Linear(2d, answers), the VQA head of the authors' code."""

    def __init__(self, dim: int, n_answers: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 2 * dim), nn.LayerNorm(2 * dim), nn.GELU(), nn.Linear(2 * dim, n_answers))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(pooled)


def adapt_vilt(backbone, names: tuple[str, ...], reduction: int) -> AdaptedModel:
    """Attach adapter slots after the output block of every ViLT layer."""
    dim = backbone.config.hidden_size
    if reduction <= 0 or dim // reduction < 1:
        raise ValueError(f"adapter reduction {reduction} does not fit hidden size {dim}")
    layers = [layer.output for layer in backbone.encoder.layer]
    return AdaptedModel(backbone, layers, dim, names, dim // reduction)


def adapt_backbone(backbone, names: tuple[str, ...], reduction: int) -> AdaptedModel:
    """Attach adapter slots to a backbone of either family: `adapt_vilt`, or after the FFN of every layer of
    both of BLIP's encoders (`BlipBackbone.adapted_layers`)."""
    if backbone_family(backbone) == "vilt":
        return adapt_vilt(backbone, names, reduction)
    dim = backbone.config.hidden_size
    if reduction <= 0 or dim // reduction < 1:
        raise ValueError(f"adapter reduction {reduction} does not fit hidden size {dim}")
    return AdaptedModel(backbone, backbone.adapted_layers(), dim, names, dim // reduction)


def pooled_features(model: AdaptedModel, batch: dict) -> torch.Tensor:
    """The pooled [CLS] vector under the model's current view (for BLIP: the text encoder's [CLS] position)."""
    if backbone_family(model.backbone) == "blip":
        from feddat.models import blip

        return blip.encode(model.backbone, batch["input_ids"], batch["attention_mask"], batch["pixel_values"])[1]
    return encode(model.backbone, batch["input_ids"], batch["attention_mask"], batch["pixel_values"])[1]


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
    if backbone_family(model.backbone) == "blip":
        from feddat.models import blip

        return blip.pooled_features_of_views(model, batch, views, stacked)
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
