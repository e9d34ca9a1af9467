"""FedAvg with the other PEFT methods of the paper's baselines, heads personal as in every method.

None of them uses the bottleneck adapters: what a client trains, and sends, is a named set of tensors of the
backbone or added to it (`Method.shared_state`), averaged by the server like an adapter:

- fedavg-bitfit: every bias of the backbone (BitFit: Ben Zaken, Goldberg, Ravfogel, ACL 2022).
- fedavg-layernorm: the weights and biases of the backbone's LayerNorms (LayerNorm tuning, as in the
  authors' code).
- fedavg-full: the whole backbone (full finetuning), at its own learning rate `lr_backbone`.
- fedavg-lora: LoRA (Hu et al., ICLR 2022) through `peft`, rank `lora_rank` on `lora_targets`
  (query and value by default); the pretrained weights stay as they are and only the low-rank factors
  travel (`get_peft_model_state_dict` / `set_peft_model_state_dict`).
- fedavg-prompt: prompt tuning (Lester, Al-Rfou, Constant, EMNLP 2021), `prompt_tokens` learned tokens for the
  text and as many for the image, produced by a small reparameterising MLP (Li and Liang, ACL 2021) and
  inserted after each modality's [CLS] token; the prompt embeddings and the MLP travel.

Each client's backbone is its worker's own copy (`modifies_backbone`): the tuned tensors are reloaded from
the global state before every local round and evaluation. Learning rate: `lr_adapter` for the PEFT tensors,
`lr_backbone` for full finetuning; the head has `lr_head`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from feddat.algorithms.base import LocalConfig, Method, MethodConfig, State
from feddat.errors import FedDATError
from feddat.models.adapters import AdaptedModel
from feddat.models.vl import AnswerHead
from feddat.settings import check, is_count, is_number, setting

LORA_ADAPTER = "default"   # peft's name for the one LoRA adapter a model carries


def _load_into(params: dict[str, nn.Parameter], state: State) -> None:
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k])


class TunedTensors(Method):
    """FedAvg of a named set of tensors (`tuned`) and a personal head; no adapters."""

    modifies_backbone = True
    predict_view = "none"   # no bottleneck adapter: the tuned model itself predicts

    def tuned(self, model: AdaptedModel) -> dict[str, nn.Parameter]:
        """The live tensors trained and sent, by name."""
        raise NotImplementedError

    def learning_rate(self, cfg: LocalConfig) -> float:
        return cfg.lr_adapter

    def attach(self, model: AdaptedModel, cfg: LocalConfig) -> None:
        tuned = self.tuned(model)
        for p in tuned.values():
            p.requires_grad_(True)
        # the pretrained values: every process starts the federation from them
        self._initial = {k: p.detach().clone() for k, p in tuned.items()}

    def shared_state(self, model: AdaptedModel) -> State:
        return {k: p.detach().clone() for k, p in self.tuned(model).items()}

    def load_shared_state(self, model: AdaptedModel, state: State) -> None:
        _load_into(self.tuned(model), state)

    def initial_shared_state(self, model: AdaptedModel, seed: int) -> State:
        return {k: v.clone() for k, v in self._initial.items()}

    def param_groups(self, model: AdaptedModel, head: AnswerHead, cfg: LocalConfig) -> list[dict]:
        lr = self.learning_rate(cfg)
        return [{"params": list(head.parameters()), "lr": cfg.lr_head, "base_lr": cfg.lr_head},
                {"params": list(self.tuned(model).values()), "lr": lr, "base_lr": lr}]


def _joined(module_name: str, param_name: str) -> str:
    return f"{module_name}.{param_name}" if module_name else param_name


class FedAvgBitFit(TunedTensors):
    name = "fedavg-bitfit"
    summary = "FedAvg + BitFit: every bias of the backbone trained and averaged"
    shared = "bias"

    def tuned(self, model: AdaptedModel) -> dict[str, nn.Parameter]:
        return {_joined(n, "bias"): m.bias for n, m in model.backbone.named_modules()
                if isinstance(getattr(m, "bias", None), nn.Parameter)}


class FedAvgLayerNorm(TunedTensors):
    name = "fedavg-layernorm"
    summary = "FedAvg + LayerNorm tuning: the weights and biases of the backbone's LayerNorms trained and averaged"
    shared = "layernorm"

    def tuned(self, model: AdaptedModel) -> dict[str, nn.Parameter]:
        return {_joined(n, k): p for n, m in model.backbone.named_modules() if isinstance(m, nn.LayerNorm)
                for k, p in m.named_parameters(recurse=False)}


@dataclass(frozen=True)
class FullConfig(MethodConfig):
    lr_backbone: float = setting(1e-4, "fedavg-full: peak learning rate of the backbone's own weights")

    def __post_init__(self) -> None:
        check(is_number(self.lr_backbone) and self.lr_backbone > 0, "lr_backbone", "a positive number",
              self.lr_backbone)


@dataclass(frozen=True)
class LoRAConfig(MethodConfig):
    lora_rank: int = setting(16, "fedavg-lora: rank of the low-rank factors")
    lora_alpha: float = setting(16.0, "fedavg-lora: scaling lora_alpha / lora_rank")
    lora_targets: str = setting("query,value", "fedavg-lora: comma-separated names of the linear layers it wraps")

    def __post_init__(self) -> None:
        check(is_count(self.lora_rank) and self.lora_rank > 0, "lora_rank", "a positive integer", self.lora_rank)
        check(is_number(self.lora_alpha) and self.lora_alpha > 0, "lora_alpha", "a positive number", self.lora_alpha)
        targets = self.lora_targets.split(",") if isinstance(self.lora_targets, str) else []
        check(bool(targets) and all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", t.strip()) for t in targets),
              "lora_targets", "comma-separated module names (e.g. 'query,value')", self.lora_targets)


@dataclass(frozen=True)
class PromptConfig(MethodConfig):
    prompt_tokens: int = setting(5, "fedavg-prompt: learned prompt tokens per modality")

    def __post_init__(self) -> None:
        check(is_count(self.prompt_tokens) and self.prompt_tokens > 0, "prompt_tokens", "a positive integer",
              self.prompt_tokens)


class FedAvgFull(TunedTensors):
    name = "fedavg-full"
    summary = "FedAvg + full finetuning: the whole backbone trained (lr_backbone) and averaged"
    shared = "backbone"
    Config = FullConfig

    def tuned(self, model: AdaptedModel) -> dict[str, nn.Parameter]:
        return dict(model.backbone.named_parameters())

    def learning_rate(self, cfg: LocalConfig) -> float:
        return self.config.lr_backbone


class FedAvgLoRA(Method):
    name = "fedavg-lora"
    summary = "FedAvg + LoRA (peft; rank lora_rank on lora_targets): the low-rank factors trained and averaged"
    shared = "lora"
    modifies_backbone = True
    predict_view = "none"
    Config = LoRAConfig

    def attach(self, model: AdaptedModel, cfg: LocalConfig) -> None:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer

        own = self.config
        targets = [t.strip() for t in own.lora_targets.split(",")]
        config = LoraConfig(r=own.lora_rank, lora_alpha=own.lora_alpha, target_modules=targets, lora_dropout=0.0,
                            bias="none")
        try:
            inject_adapter_in_model(config, model.backbone, adapter_name=LORA_ADAPTER)
        except ValueError as e:
            raise FedDATError(f"lora-targets {own.lora_targets!r} do not fit the backbone: {e}") from e
        self.layers = [m for m in model.backbone.modules() if isinstance(m, LoraLayer)]

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers
                for p in (*layer.lora_A[LORA_ADAPTER].parameters(), *layer.lora_B[LORA_ADAPTER].parameters())]

    def shared_state(self, model: AdaptedModel) -> State:
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in
                get_peft_model_state_dict(model.backbone, adapter_name=LORA_ADAPTER).items()}

    def load_shared_state(self, model: AdaptedModel, state: State) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model.backbone, state, adapter_name=LORA_ADAPTER)
        if result.unexpected_keys:
            raise FedDATError(f"LoRA state with keys the model lacks: {sorted(result.unexpected_keys)[:4]}")

    def initial_shared_state(self, model: AdaptedModel, seed: int) -> State:
        # peft's default initialisation (A: Kaiming-uniform, B: zero, so the start is the pretrained model),
        # drawn on the CPU from the seed so that every process and device starts from the same factors
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            for layer in self.layers:
                a, b = layer.lora_A[LORA_ADAPTER].weight, layer.lora_B[LORA_ADAPTER].weight
                init = torch.empty(a.shape, dtype=a.dtype)
                nn.init.kaiming_uniform_(init, a=math.sqrt(5))
                a.copy_(init)
                b.zero_()
        return self.shared_state(model)

    def param_groups(self, model: AdaptedModel, head: AnswerHead, cfg: LocalConfig) -> list[dict]:
        return [{"params": list(head.parameters()), "lr": cfg.lr_head, "base_lr": cfg.lr_head},
                {"params": self.lora_parameters(), "lr": cfg.lr_adapter, "base_lr": cfg.lr_adapter}]


class PromptEncoder(nn.Module):
    """`tokens` prompt vectors per modality: P = MLP(E), MLP = Linear(d, d) -> tanh -> Linear(d, d), one MLP
    for both modalities. As a forward hook on the ViLT embeddings it inserts the text prompts after the
    text [CLS] token and the image prompts after the image [CLS] token (attention mask 1 for all)."""

    def __init__(self, dim: int, tokens: int):
        super().__init__()
        self.text = nn.Parameter(torch.randn(tokens, dim) * 0.02)
        self.image = nn.Parameter(torch.randn(tokens, dim) * 0.02)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, dim))

    def prompts(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mlp(self.text), self.mlp(self.image)

    def hook(self, module: nn.Module, args: tuple, kwargs: dict, output):
        embeddings, masks = output
        attention_mask = kwargs["attention_mask"] if "attention_mask" in kwargs else args[1]
        text_len = attention_mask.shape[1]
        b = embeddings.shape[0]
        text, image = (p.to(embeddings.dtype).unsqueeze(0).expand(b, -1, -1) for p in self.prompts())
        ones = torch.ones(b, text.shape[1], dtype=masks.dtype, device=masks.device)
        embeddings = torch.cat([embeddings[:, :1], text, embeddings[:, 1:text_len + 1], image,
                                embeddings[:, text_len + 1:]], dim=1)
        masks = torch.cat([masks[:, :1], ones, masks[:, 1:text_len + 1], ones, masks[:, text_len + 1:]], dim=1)
        return embeddings, masks


class FedAvgPrompt(TunedTensors):
    name = "fedavg-prompt"
    summary = ("FedAvg + prompt tuning: prompt_tokens learned tokens per modality through a small MLP, "
               "trained and averaged")
    shared = "prompt"
    Config = PromptConfig

    def attach(self, model: AdaptedModel, cfg: LocalConfig) -> None:
        if getattr(model.backbone, "family", "vilt") != "vilt":
            raise FedDATError(f"{self.name} inserts its prompts into ViLT's joint embedding sequence; it has no "
                              f"form for the {model.backbone.family} backbone yet: use --backbone vilt")
        dim = model.backbone.config.hidden_size
        with torch.random.fork_rng(devices=[]):  # placeholder values, replaced by the global state
            model.prompt = PromptEncoder(dim, self.config.prompt_tokens)
        model.backbone.embeddings.register_forward_hook(model.prompt.hook, with_kwargs=True)
        for p in model.prompt.parameters():
            p.requires_grad_(True)

    def tuned(self, model: AdaptedModel) -> dict[str, nn.Parameter]:
        return dict(model.prompt.named_parameters())

    def initial_shared_state(self, model: AdaptedModel, seed: int) -> State:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh = PromptEncoder(model.backbone.config.hidden_size, self.config.prompt_tokens)
        return {k: v.detach().clone() for k, v in fresh.state_dict().items()}
