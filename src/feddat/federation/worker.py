"""What a client does in a round, whichever engine carries the messages.

One Worker per process holds the frozen backbone with adapter slots; a client's private state (its
private adapters, its head and any further private tensors of its method, `Method.private_state`) is a flat
dict of tensors loaded into the worker when the client trains or is scored, so memory does not grow with the
number of clients. What travels is the method's `shared_state`: a named adapter, or another named set of
tensors (backbone biases, LoRA weights, ...) for methods that train more than adapters.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from feddat.algorithms.base import LocalConfig, Method
from feddat.algorithms.losses import scores
from feddat.data.benchmarks import ClientData, Split
from feddat.data.pool import HeadSpec
from feddat.models.adapters import BottleneckAdapter
from feddat.models.backbone import backbone_family
from feddat.models.vl import AnswerHead, PrefixCache, adapt_backbone, compile_layers, make_head, pooled_features
from feddat.seeding import mix_seed

State = dict[str, torch.Tensor]


def lr_factor(progress: float, warmup: float = 0.1) -> float:
    """Linear warm-up over the first `warmup` of training, then linear decay to zero."""
    if progress < warmup:
        return (progress + 1e-8) / warmup
    return max(0.0, (1.0 - progress) / (1.0 - warmup))


@dataclass
class FitResult:
    state: State
    update: State | None
    metrics: dict[str, float]
    num_examples: int


class Worker:
    def __init__(self, method: Method, backbone, reduction: int, local: LocalConfig, device="cpu"):
        self.method = method
        self.local = local
        self.device = torch.device(device)
        self.warmup = local.warmup
        if method.modifies_backbone:  # it trains or hooks backbone modules: never those of a shared backbone
            backbone = copy.deepcopy(backbone)
        self.model = adapt_backbone(backbone, method.adapters, reduction, method.views)
        method.attach(self.model, local)
        self.model.to(self.device)
        # precision="bf16": every forward pass (training and scoring) under torch.autocast(bfloat16), see
        # feddat.models.vl.autocast; the adapters, the head and the optimiser state stay in float32.
        self.model.autocast_dtype = torch.bfloat16 if local.precision == "bf16" else None
        if local.compile:
            compile_layers(self.model.backbone)
        # The frozen layers below the first adapter run once per item (feddat.models.vl.PrefixCache).
        self.prefix_cache = PrefixCache(self.model, local.prefix_cache_mb << 20) \
            if local.prefix_cache_mb > 0 and not method.modifies_backbone and backbone_family(backbone) == "vilt" \
            else None
        self.dim = backbone.config.hidden_size
        self.bottleneck = self.dim // reduction
        for name in method.adapters:
            for p in self.model.adapter_parameters(name):
                p.requires_grad_(name in method.trained)

    def batch(self, split: Split, idx: torch.Tensor) -> dict:
        """Rows `idx` of a split on the worker's device, with their frozen prefix when the worker keeps it."""
        if self.prefix_cache is None:
            return split.batch(idx, self.device)
        return self.prefix_cache.batch(split, idx, self.device)

    # ----- state -----
    def _fresh_adapter(self, seed: int) -> State:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            a = BottleneckAdapter(self.dim, self.bottleneck)
        return {f"{i}.{k}": v.clone() for i in range(len(self.model.slots)) for k, v in a.state_dict().items()}

    def initial_global(self, seed: int) -> State | None:
        """The server's starting point for what travels (None when nothing does)."""
        if not self.method.shared:
            return None
        if self.method.shares_adapter:
            return self._fresh_adapter(mix_seed(seed, 0xA11))
        return {k: v.detach().cpu().clone() for k, v in
                self.method.initial_shared_state(self.model, mix_seed(seed, 0xA11)).items()}

    def initial_state(self, client_index: int, spec: HeadSpec | int, seed: int) -> State:
        state: State = {}
        for name in self.method.adapters:
            if name == self.method.shared:
                continue
            for k, v in self._fresh_adapter(mix_seed(seed, client_index, sum(name.encode()))).items():
                state[f"adapter.{name}.{k}"] = v
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(seed, client_index, 0x4EAD))
            head = make_head(self.dim, spec)
        for k, v in head.state_dict().items():
            state[f"head.{k}"] = v.clone()
        state.update(self.method.initial_private_state(self.local))
        return state

    def _load(self, state: State, global_state: State | None, spec: HeadSpec | int) -> AnswerHead:
        for name in self.method.adapters:
            if name == self.method.shared:
                continue
            prefix = f"adapter.{name}."
            self.model.load_adapter_state(name, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        if self.method.shared and global_state is not None:
            self.method.load_shared_state(self.model, global_state)
        self.method.load_private_state(self.model, state)
        head = make_head(self.dim, spec).to(self.device)
        head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
        return head

    def _save(self, head: AnswerHead) -> State:
        state: State = {}
        for name in self.method.adapters:
            if name != self.method.shared:
                for k, v in self.model.adapter_state(name).items():
                    state[f"adapter.{name}.{k}"] = v.cpu()
        for k, v in head.state_dict().items():
            state[f"head.{k}"] = v.detach().cpu().clone()
        state.update({k: v.detach().cpu().clone() for k, v in self.method.private_state(self.model).items()})
        return state

    # ----- round -----
    def fit(self, data: ClientData, state: State, global_state: State | None, round_idx: int, total_rounds: int,
            seed: int, client_index: int, progress=None) -> FitResult:
        method, cfg = self.method, self.local
        head = self._load(state, global_state, data.head_spec)
        self.model.round_state = {}
        method.begin_round(self.model)
        head.train()
        trained = method.trained_in_round(round_idx)
        for name in method.adapters:
            for p in self.model.adapter_parameters(name):
                p.requires_grad_(name in trained)
        gen = torch.Generator().manual_seed(mix_seed(seed, round_idx, client_index, 0xF17))
        n = len(data.train)
        batches_per_epoch = -(-n // cfg.batch_size)
        epochs = method.local_epochs(cfg)
        total_steps = epochs * batches_per_epoch
        opt = method.optimizer(method.param_groups(self.model, head, cfg), cfg, total_steps)
        run_schedule = not getattr(opt, "schedules_itself", False)
        sums: dict[str, float] = {}
        step = 0
        for epoch in range(epochs):
            method.begin_epoch(self.model, epoch, cfg)
            perm = torch.randperm(n, generator=gen)
            for start in range(0, n, cfg.batch_size):
                if run_schedule:
                    factor = lr_factor((round_idx + step / total_steps) / total_rounds, self.warmup)
                    for g in opt.param_groups:
                        g["lr"] = g["base_lr"] * factor
                batch = self.batch(data.train, perm[start:start + cfg.batch_size])
                losses = method.train_step(self.model, head, batch, opt, cfg)
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v
                step += 1
                if progress is not None:
                    progress.update(1)
        metrics = {k: v / max(step, 1) for k, v in sums.items()}
        update = {k: v.detach().cpu() for k, v in method.shared_state(self.model).items()} if method.shared else None
        return FitResult(self._save(head), update, metrics, n)

    def steps_per_round(self, n_train: int) -> int:
        return self.method.local_epochs(self.local) * -(-n_train // self.local.batch_size)

    # ----- scoring and prediction -----
    def prepare_eval(self, state: State, global_state: State | None, spec: HeadSpec | int,
                     newest_global: bool = True) -> AnswerHead:
        """Load a client's model as it is scored: its state, the global adapter and the method's eval-time
        preparation (FedDAT's frozen copy); returns the head in eval mode."""
        head = self._load(state, global_state, spec)
        head.eval()
        self.method.prepare_eval(self.model, newest_global)
        return head

    @torch.no_grad()
    def export(self, state: State, global_state: State | None, spec: HeadSpec | int, newest_global: bool = True) -> State:
        """The client's personalised model as scored: every named adapter (`adapter.<name>.<layer>.<param>`,
        the global one and FedDAT's frozen copy as prepared for evaluation), shared tensors that are not an
        adapter (`<shared>.<key>`, e.g. `lora.<key>`), the method's further private tensors and the head
        (`head.<param>`)."""
        head = self.prepare_eval(state, global_state, spec, newest_global)
        method = self.method
        out: State = {}
        for name in method.adapters:
            for k, v in self.model.adapter_state(name).items():
                out[f"adapter.{name}.{k}"] = v.detach().cpu().contiguous()
        if method.shared and not method.shares_adapter:
            for k, v in method.shared_state(self.model).items():
                out[method.shared_prefix + k] = v.detach().cpu().contiguous().clone()
        for k, v in method.private_state(self.model).items():
            out[k] = v.detach().cpu().contiguous().clone()
        for k, v in head.state_dict().items():
            out[f"head.{k}"] = v.detach().cpu().contiguous().clone()
        return out

    def export_shapes(self, spec: HeadSpec | int) -> dict[str, tuple[int, ...]]:
        """The keys and shapes of `export` for a client whose head is `spec` (a HeadSpec, or a count of answers)."""
        method = self.method
        shapes = {f"adapter.{n}.{k}": tuple(v.shape) for n in method.adapters
                  for k, v in self.model.adapter_state(n).items()}
        if method.shared and not method.shares_adapter:
            shapes.update({method.shared_prefix + k: tuple(v.shape)
                           for k, v in method.shared_state(self.model).items()})
        shapes.update({k: tuple(v.shape) for k, v in method.initial_private_state(self.local).items()})
        with torch.random.fork_rng(devices=[]):  # a template head: leave the caller's random stream alone
            head = make_head(self.dim, spec)
        shapes.update({f"head.{k}": tuple(v.shape) for k, v in head.state_dict().items()})
        return shapes

    @torch.no_grad()
    def evaluate(self, data: ClientData, state: State, global_state: State | None, split: str = "test",
                 views: tuple[str, ...] | None = None, newest_global: bool = True,
                 batch_size: int = 256) -> dict[str, dict]:
        """{view: {"score": mean, "scores": per-item tensor, "predictions": per-item answer index}}."""
        head = self.prepare_eval(state, global_state, data.head_spec, newest_global)
        views = views or (self.method.predict_view,)
        part: Split = getattr(data, split)
        out = {}
        for view in views:
            self.model.set_view(view)
            all_scores, preds = [], []
            for start in range(0, len(part), batch_size):
                idx = torch.arange(start, min(start + batch_size, len(part)))
                batch = self.batch(part, idx)
                logits = head(pooled_features(self.model, batch))
                all_scores.append(scores(logits, batch["labels"]).cpu())
                preds.append(logits.argmax(-1).cpu())
            s = torch.cat(all_scores)
            out[view] = {"score": float(s.mean()), "scores": s, "predictions": torch.cat(preds),
                         "breakdown": score_breakdown(part, s)}
        return out


def score_breakdown(split, item_scores: torch.Tensor) -> dict[str, float]:
    """Mean score per question type, and on questions with / without a client-specific word meaning."""
    s = item_scores.numpy()
    out = {f"qtype:{q}": float(s[split.qtypes == q].mean()) for q in sorted(set(split.qtypes.tolist()))}
    for name, mask in (("shifted", split.shifted), ("synonym", split.synonym)):
        if mask.any() and (~mask).any():
            out[name] = float(s[mask].mean())
            out[f"not-{name}"] = float(s[~mask].mean())
    return out
