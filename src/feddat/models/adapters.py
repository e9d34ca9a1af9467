"""Bottleneck adapters as named objects, mixed per layer by an explicit view.

peft has no bottleneck adapter and AdapterHub's `adapters` pins an old transformers without ViLT support,
so the dual adapter is ours: a few dozen lines, tested against the formula it implements.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

# Which adapters each view adds to a layer's output, and with what weight.
VIEWS: dict[str, tuple[tuple[str, float], ...]] = {
    "none": (),
    "student": (("global", 1.0),),
    "local": (("local", 1.0),),
    "teacher": (("local", 0.5), ("global_frozen", 0.5)),   # the Dual-Adapter Teacher
    "frozen": (("global_frozen", 1.0),),                   # single-adapter teacher (ablation)
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


class AdapterSlot(nn.Module):
    """The adapters of one transformer layer: h -> h + sum_k w_k * A_k(h) over the active view."""

    def __init__(self, names: tuple[str, ...], dim: int, bottleneck: int):
        super().__init__()
        self.adapters = nn.ModuleDict({n: BottleneckAdapter(dim, bottleneck) for n in names})
        self.mix: tuple[tuple[str, float], ...] = ()

    def hook(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        return self(output)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.mix:
            return h
        delta = sum(w * self.adapters[n](h) for n, w in self.mix)
        return h + delta


class AdaptedModel(nn.Module):
    """A frozen backbone whose layer outputs pass through adapter slots (Pfeiffer placement).

    `layers` are the modules whose output each slot adapts (for ViLT, every `ViltLayer.output`).
    The backbone's own state dict is untouched: adapters are attached with forward hooks.
    """

    def __init__(self, backbone: nn.Module, layers: list[nn.Module], dim: int, names: tuple[str, ...],
                 bottleneck: int):
        super().__init__()
        self.backbone = backbone
        self.names = names
        self.slots = nn.ModuleList([AdapterSlot(names, dim, bottleneck) for _ in layers])
        # Bound methods (not closures) as hooks, so that copy.deepcopy of the model rewires them to the copy.
        self._hooks = [layer.register_forward_hook(slot.hook) for layer, slot in zip(layers, self.slots)]
        self.view = "none"

    def set_view(self, view: str) -> None:
        if view not in VIEWS:
            raise ValueError(f"unknown view {view!r}; choose one of {', '.join(VIEWS)}")
        mix = VIEWS[view]
        missing = [n for n, _ in mix if n not in self.names]
        if missing:
            raise ValueError(f"view {view!r} needs adapters {missing} that this model does not have")
        for slot in self.slots:
            slot.mix = mix
        self.view = view

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
