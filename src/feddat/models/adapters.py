"""Bottleneck adapters as named objects, mixed per layer by an explicit view.

peft has no bottleneck adapter and AdapterHub's `adapters` pins an old transformers without ViLT support,
so the dual adapter is ours: a few dozen lines, tested against the formula it implements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

# A view says which adapters a layer's output goes through: a weighted sum of named adapters' outputs
# (h + sum_k w_k * A_k(h)), or `MixedParameters`: one adapter whose *parameters* mix two named adapters. The views
# every model has are `BASE_VIEWS`; a method declares the others it uses (`Method.views`: FedDAT's teacher, ...).
OutputMix = tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class MixedParameters:
    """A view running one adapter with parameters alpha * first + (1 - alpha) * second, alpha set by
    `AdaptedModel.set_parameter_mix` (APFL's personalised model). The second enters detached: APFL trains it on
    its own loss, not through the mix."""

    first: str
    second: str


View = OutputMix | MixedParameters
BASE_VIEWS: dict[str, View] = {
    "none": (),
    "student": (("global", 1.0),),   # the global adapter alone
    "local": (("local", 1.0),),      # the local adapter alone
}


class BottleneckAdapter(nn.Module):
    """d -> d/r -> ReLU -> d. The up-projection starts at zero, so a new adapter is the identity."""

    def __init__(self, dim: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.down(h)))


def mixed_adapter(first: BottleneckAdapter, second: BottleneckAdapter, alpha: torch.Tensor | float,
                  h: torch.Tensor) -> torch.Tensor:
    """The bottleneck adapter with parameters alpha * first + (1 - alpha) * second.detach(), applied to h."""
    def mix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return alpha * a + (1 - alpha) * b.detach()

    down = F.linear(h, mix(first.down.weight, second.down.weight), mix(first.down.bias, second.down.bias))
    return F.linear(torch.relu(down), mix(first.up.weight, second.up.weight), mix(first.up.bias, second.up.bias))


@dataclass(frozen=True)
class ParameterMix:
    """A MixedParameters view as a slot runs it: one adapter with parameters alpha * first + (1 - alpha) * second."""

    first: str
    second: str
    alpha: torch.Tensor | float


Mix = tuple[tuple[str, float], ...] | ParameterMix


class AdapterSlot(nn.Module):
    """The adapters of one transformer layer: h -> h + sum_k w_k * A_k(h) over the active view.

    With `split` set (one mix per view), the batch is cut into that many equal parts along its first
    dimension and part i goes through mix i: several views of the same inputs in one forward pass.
    """

    def __init__(self, names: tuple[str, ...], dim: int, bottleneck: int):
        super().__init__()
        self.adapters = nn.ModuleDict({n: BottleneckAdapter(dim, bottleneck) for n in names})
        self.mix: Mix = ()
        self.split: tuple[Mix, ...] = ()

    def hook(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        return self(output)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.split:
            if h.shape[0] % len(self.split):
                raise ValueError(f"a batch of {h.shape[0]} does not split into {len(self.split)} equal views")
            return torch.cat([self._mixed(part, mix) for part, mix in zip(h.chunk(len(self.split)), self.split)])
        return self._mixed(h, self.mix)

    def _mixed(self, h: torch.Tensor, mix: Mix) -> torch.Tensor:
        if isinstance(mix, ParameterMix):
            return h + mixed_adapter(self.adapters[mix.first], self.adapters[mix.second], mix.alpha, h)
        if not mix:
            return h
        return h + sum(w * self.adapters[n](h) for n, w in mix)


class AdaptedModel(nn.Module):
    """A frozen backbone whose layer outputs pass through adapter slots (Pfeiffer placement).

    `layers` are the modules whose output each slot adapts (for ViLT, every `ViltLayer.output`).
    The backbone's own state dict is untouched: adapters are attached with forward hooks.
    """

    def __init__(self, backbone: nn.Module, layers: list[nn.Module], dim: int, names: tuple[str, ...],
                 bottleneck: int, views: Mapping[str, View] | None = None):
        super().__init__()
        self.backbone = backbone
        self.names = names
        self.views: dict[str, View] = {**BASE_VIEWS, **(views or {})}
        self.slots = nn.ModuleList([AdapterSlot(names, dim, bottleneck) for _ in layers])
        # Bound methods (not closures) as hooks, so that copy.deepcopy of the model rewires them to the copy.
        self._hooks = [layer.register_forward_hook(slot.hook) for layer, slot in zip(layers, self.slots)]
        self.view = "none"
        self.mix_alpha: torch.Tensor | float | None = None  # the weight of MixedParameters views
        # Per-client values of the round this model is running for one client (a method's proximal anchor, its
        # training phase): the worker empties it when a client's round starts, so the method object holds none.
        self.round_state: dict[str, Any] = {}
        self.autocast_dtype: torch.dtype | None = None  # the forward passes' autocast dtype (None: float32)

    def set_parameter_mix(self, alpha: torch.Tensor | float) -> None:
        """The weight alpha of the first adapter in MixedParameters views (a tensor may require grad); takes
        effect at the next set_view."""
        self.mix_alpha = alpha

    def set_view(self, view: str) -> None:
        mix = self._mix(view)
        for slot in self.slots:
            slot.mix, slot.split = mix, ()
        self.view = view

    def set_views(self, views: tuple[str, ...]) -> None:
        """One view per equal part of the batch (first part, first view): the batch must hold the inputs
        repeated len(views) times, and the pooled output splits the same way."""
        mixes = tuple(self._mix(v) for v in views)
        for slot in self.slots:
            slot.mix, slot.split = (), mixes
        self.view = "+".join(views)

    def _mix(self, view: str) -> Mix:
        if view not in self.views:
            raise ValueError(f"unknown view {view!r}; choose one of {', '.join(self.views)}")
        spec = self.views[view]
        if isinstance(spec, MixedParameters):
            missing = [n for n in (spec.first, spec.second) if n not in self.names]
            if missing:
                raise ValueError(f"view {view!r} needs adapters {missing} that this model does not have")
            if self.mix_alpha is None:
                raise ValueError(f"view {view!r} mixes adapter parameters: set its weight with set_parameter_mix")
            return ParameterMix(spec.first, spec.second, self.mix_alpha)
        missing = [n for n, _ in spec if n not in self.names]
        if missing:
            raise ValueError(f"view {view!r} needs adapters {missing} that this model does not have")
        return spec

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [p for slot in self.slots for p in slot.adapters[name].parameters()]

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors of one named adapter across all layers, detached copies keyed 'layer.param'."""
        return {f"{i}.{k}": v.detach().clone() for i, slot in enumerate(self.slots)
                for k, v in slot.adapters[name].state_dict().items()}

    def load_adapter_state(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        for i, slot in enumerate(self.slots):
            prefix = f"{i}."
            slot.adapters[name].load_state_dict({k[len(prefix):]: v for k, v in state.items()
                                                 if k.startswith(prefix)})

    def copy_adapter(self, src: str, dst: str) -> None:
        with torch.no_grad():
            for slot in self.slots:
                for p_dst, p_src in zip(slot.adapters[dst].parameters(), slot.adapters[src].parameters()):
                    p_dst.copy_(p_src)

    def forward(self, *args, **kwargs):
        return self.backbone(*args, **kwargs)


def adapter_size(dim: int, bottleneck: int) -> int:
    return 2 * dim * bottleneck + bottleneck + dim
