"""Cost of one local training step: FedDAT against FedAvg-adapter and full finetuning, in one run.

    python bench/step_cost.py                                             # small backbone, CPU, 1-2 minutes
    python bench/step_cost.py --size base --batch-size 2 --repeats 6 --warmup 1   # ViLT-B/32, CPU, ~5 minutes
    python bench/step_cost.py --size base --device cuda --batch-size 32 --precision bf16 --compile
    python bench/step_cost.py --backbone blip                             # the small BLIP (dual-stream)

Steps compared, on the same batches and the same backbone architecture (random weights, its own copy each):
- `fedavg-adapter`: one forward and one backward through the global adapter (`Method.train_step`);
- `feddat`: FedDAT's local step as trained (`FedDAT.train_step`: one DAT forward reused for the DAT update,
  one student forward, two backwards; the frozen layer before the first adapter runs once for both views);
- `feddat-fused`: the same step with both views side by side in one forward and one backward (`--fused`);
- `feddat-3fwd`: the authors' form, for reference: a third forward recomputes the DAT for its update;
- `full-finetune`: every backbone parameter and the head trained with the task loss.

Every step is taken `--warmup` times first (not timed; with `--compile` this includes compilation), then
`--repeats` rounds each time every step `--steps` times, in an order that rotates from round to round, so that
load from other processes falls on all of them alike. Ratios are taken within a round and summarised by their
median over rounds, and also taken between the fastest rounds (noise only adds time): on a shared machine
these are the figures to trust, more than the samples per second. On CPU with one thread the clock is this
process's CPU time (time spent waiting for a core is not counted), else the wall clock (`--clock`).

Memory, after timing, one step each: on CUDA the peak of `torch.cuda.max_memory_allocated` above what was
allocated before the step (parameters, optimiser state and inputs are excluded); on CPU the same quantity from
the tensor allocations the profiler records (`profile_memory=True`), plus the growth of the process's peak
resident set (VmHWM, reset before the step) which understates it because the C allocator keeps freed memory.

Writes OUT/step_cost.json (settings, every timing, the ratios) and OUT/step_cost.md (the table).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from feddat.algorithms.base import LocalConfig, Method
from feddat.algorithms.baselines import FedAvgAdapter
from feddat.algorithms.feddat import FedDAT, FedDATConfig
from feddat.algorithms.losses import kd_loss, task_loss
from feddat.config import PRECISIONS
from feddat.federation.worker import Worker
from feddat.models.backbone import BACKBONES, backbone_family, encode, random_backbone, vilt_config
from feddat.models.checkpoints import SIZES
from feddat.models.vl import AnswerHead, compile_layers, pooled_features

MODES = ("fedavg-adapter", "feddat", "feddat-fused", "feddat-3fwd", "full-finetune")
REFERENCE = "fedavg-adapter"


class ThreeForwardFedDAT(FedDAT):
    """FedDAT's step as in the authors' code: teacher logits without gradient, the student step, then a fresh
    DAT forward for the teacher step (three forwards, two backwards; same result up to dropout)."""

    def train_step(self, model, head, batch, opt, cfg):
        y, t = batch["labels"], self.config.kd_temperature
        model.set_view("teacher")
        with torch.no_grad():
            teacher_logits = head(pooled_features(model, batch))
        model.set_view("student")
        student_logits = head(pooled_features(model, batch))
        loss_student = (task_loss(student_logits, y) + kd_loss(student_logits, teacher_logits, t)) / 2
        opt.zero_grad(set_to_none=True)
        loss_student.backward()
        opt.step()
        model.set_view("teacher")
        teacher_logits = head(pooled_features(model, batch))
        loss_teacher = (task_loss(teacher_logits, y) + kd_loss(teacher_logits, student_logits.detach(), t)) / 2
        opt.zero_grad(set_to_none=True)
        loss_teacher.backward()
        opt.step()
        return {"loss": loss_teacher.item()}


@dataclass
class Contender:
    name: str
    step: Callable[[dict], dict]
    optimizer: torch.optim.Optimizer
    trained_parameters: int


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=SIZES, default="small", help="small (the embedded backbone's architecture) or "
                   "base (ViLT-B/32); random weights either way (default: small)")
    p.add_argument("--backbone", choices=BACKBONES, default="vilt", help="vilt (single-stream) or blip (dual-stream: "
                   "BLIP's image encoder and text encoder with cross-attention; small = 4 + 4 layers of width 128 at "
                   "48 px, base = BLIP-base) (default: vilt)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per step (default: 32)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads; 0 = torch's default "
                   "(default: 1, steadier on a shared machine)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="fp32, or bf16: the forward passes under "
                   "torch.autocast(bfloat16), as `feddat run --precision bf16` trains (meant for GPUs) (default: fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile every encoder layer of every backbone, as "
                   "`feddat run --compile` does (compiles during warm-up: give --warmup 3 or more)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per mode first (default: 3)")
    p.add_argument("--repeats", type=int, default=48, help="interleaved timing rounds (default: 48)")
    p.add_argument("--steps", type=int, default=1, help="steps per mode per round (default: 1)")
    p.add_argument("--answers", type=int, default=100, help="answer classes of the head (default: 100)")
    p.add_argument("--reduction", type=int, default=16, help="adapter reduction factor (default: 16)")
    p.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto", help="what the table's ratios "
                   "time: this process's CPU time (steadier when other jobs share the cores; counts every thread) "
                   "or the wall clock; auto = CPU time on CPU with one thread, else wall clock")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/step_cost", help="directory for step_cost.json and step_cost.md")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown or REFERENCE not in args.modes:
        p.error(f"--modes takes a subset of {', '.join(MODES)} that includes {REFERENCE}; got {unknown or args.modes}")
    for name in ("batch_size", "repeats", "steps", "answers", "reduction"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer")
    if args.warmup < 0 or args.threads < 0:
        p.error("--warmup and --threads must be >= 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda, but this torch sees no CUDA device")
    return args


def make_batches(config, batch_size: int, answers: int, count: int, device, seed: int) -> list[dict]:
    """`count` batches of random questions (padded to the backbone's text length from at least half of it)
    and random images of the backbone's size."""
    g = torch.Generator().manual_seed(seed)
    text_len, side = config.max_position_embeddings, config.image_size
    out = []
    for _ in range(count):
        lengths = torch.randint(text_len // 2, text_len + 1, (batch_size, 1), generator=g)
        batch = {"input_ids": torch.randint(4, config.vocab_size, (batch_size, text_len), generator=g),
                 "attention_mask": (torch.arange(text_len) < lengths).long(),
                 "pixel_values": torch.rand(batch_size, config.num_channels, side, side, generator=g) * 2 - 1,
                 "labels": torch.randint(0, answers, (batch_size,), generator=g)}
        out.append({k: v.to(device) for k, v in batch.items()})
    return out


def backbone_shape(args):
    """The config of the architecture timed (what `make_batches` reads), without building the model."""
    if args.backbone == "blip":
        from feddat.models.blip import QUESTION_TOKENS, BlipShape, blip_config

        config = blip_config(args.size)
        return BlipShape(config, min(config.text_config.max_position_embeddings, QUESTION_TOKENS))
    return vilt_config(args.size)


def plain_pooled(backbone, batch: dict) -> torch.Tensor:
    """The pooled output of a backbone without adapters."""
    if backbone_family(backbone) == "blip":
        from feddat.models import blip

        return blip.encode(backbone, batch["input_ids"], batch["attention_mask"], batch["pixel_values"])[1]
    return encode(backbone, batch["input_ids"], batch["attention_mask"], batch["pixel_values"])[1]


def adapter_contender(name: str, method: Method, fused: bool, args, device) -> Contender:
    """The method's own local step, on a Worker's model as in training (its precision and compilation too)."""
    local = LocalConfig(batch_size=args.batch_size, precision=args.precision, compile=args.compile)
    if fused:
        method = type(method)(FedDATConfig(fused=True))
    backbone = random_backbone(args.size, device, seed=args.seed, family=args.backbone)
    worker = Worker(method, backbone, args.reduction, local, device)
    head = AnswerHead(backbone.config.hidden_size, args.answers).to(device).train()
    opt = torch.optim.AdamW(method.param_groups(worker.model, head, local), betas=(0.9, 0.98), eps=1e-8,
                            weight_decay=local.weight_decay)
    method.begin_round(worker.model)
    trained = sum(p.numel() for g in opt.param_groups for p in g["params"])
    return Contender(name, lambda batch: method.train_step(worker.model, head, batch, opt, local), opt, trained)


def full_finetune_contender(args, device) -> Contender:
    """Every backbone parameter and the head trained with the task loss (the paper's full-finetuning control)."""
    backbone = random_backbone(args.size, device, seed=args.seed, family=args.backbone)
    for p in backbone.parameters():
        p.requires_grad_(True)
    if args.compile:
        compile_layers(backbone)
    head = AnswerHead(backbone.config.hidden_size, args.answers).to(device).train()
    opt = torch.optim.AdamW([{"params": list(backbone.parameters()), "lr": 1e-4},
                             {"params": list(head.parameters()), "lr": 1e-3}],
                            betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01)

    def step(batch: dict) -> dict:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            pooled = plain_pooled(backbone, batch)
        loss = task_loss(head(pooled.float()), batch["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.item()}

    trained = sum(p.numel() for g in opt.param_groups for p in g["params"])
    return Contender("full-finetune", step, opt, trained)


def build(args, device) -> list[Contender]:
    makers = {"fedavg-adapter": lambda: adapter_contender("fedavg-adapter", FedAvgAdapter(), False, args, device),
              "feddat": lambda: adapter_contender("feddat", FedDAT(), False, args, device),
              "feddat-fused": lambda: adapter_contender("feddat-fused", FedDAT(), True, args, device),
              "feddat-3fwd": lambda: adapter_contender("feddat-3fwd", ThreeForwardFedDAT(), False, args, device),
              "full-finetune": lambda: full_finetune_contender(args, device)}
    return [makers[m]() for m in args.modes]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(contenders: list[Contender], batches: list[dict], args, device) -> dict[str, dict[str, list[float]]]:
    """Seconds per sample of each contender in each round, by wall clock and by this process's CPU time;
    warm-up first, then rounds in rotating order."""
    for c in contenders:
        for i in range(args.warmup):
            c.step(batches[i % len(batches)])
    synchronize(device)
    seconds = {clock: {c.name: [] for c in contenders} for clock in ("wall", "cpu")}
    samples = args.steps * args.batch_size
    for r in range(args.repeats):
        k = r % len(contenders)
        for c in contenders[k:] + contenders[:k]:
            synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            for i in range(args.steps):
                c.step(batches[(r * args.steps + i) % len(batches)])
            synchronize(device)
            seconds["wall"][c.name].append((time.perf_counter() - wall) / samples)
            seconds["cpu"][c.name].append((time.process_time() - cpu) / samples)
    return seconds


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def profiled_peak_bytes(run: Callable[[], None]) -> int | None:
    """Peak of the bytes allocated by torch on the CPU while `run` runs, above what was allocated before."""
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch._C._profiler import _EventType
    except ImportError:
        return None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def measure_memory(c: Contender, batch: dict, device) -> dict:
    c.optimizer.zero_grad(set_to_none=True)
    gc.collect()

    def run():
        c.step(batch)

    out = {"optimizer_state_mib": state_bytes(c.optimizer) / 2**20}
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        synchronize(device)
        out["step_peak_mib"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        out["step_peak_source"] = "torch.cuda.max_memory_allocated"
        return out
    peak = profiled_peak_bytes(run)
    out["step_peak_mib"] = None if peak is None else peak / 2**20
    out["step_peak_source"] = "torch.profiler tensor allocations (CPU)"
    c.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if _reset_peak_rss():
        rss = _rss_kib("VmRSS")
        run()
        hwm = _rss_kib("VmHWM")
        out["rss_peak_growth_mib"] = None if rss is None or hwm is None else (hwm - rss) / 1024
    return out


def _quartiles(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [values[0], values[0]]
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


def summarise(seconds: dict[str, list[float]]) -> dict:
    """Per mode: samples/s (median round, fastest round); the step time over the reference's, taken within
    each round (median and quartiles over rounds) and as the ratio of the fastest rounds (noise only adds)."""
    modes = {}
    ref = seconds[REFERENCE]
    for name, s in seconds.items():
        ratios = [a / b for a, b in zip(s, ref)]
        modes[name] = {"samples_per_s": 1 / statistics.median(s), "samples_per_s_best": 1 / min(s),
                       "time_ratio_to_fedavg_adapter": statistics.median(ratios),
                       "time_ratio_quartiles": _quartiles(ratios), "time_ratio_fastest": min(s) / min(ref)}
    if "feddat" in seconds and "feddat-fused" in seconds:
        fused, unfused = seconds["feddat-fused"], seconds["feddat"]
        ratios = [a / b for a, b in zip(fused, unfused)]
        modes["feddat-fused"].update(time_ratio_to_feddat=statistics.median(ratios),
                                     time_ratio_to_feddat_quartiles=_quartiles(ratios),
                                     time_ratio_to_feddat_fastest=min(fused) / min(unfused))
    return modes


def markdown(result: dict) -> str:
    s, clock = result["settings"], result["clock"]
    modes, other = result["modes"][clock], result["modes"]["wall" if clock == "cpu" else "cpu"]
    names = {"cpu": "process CPU time", "wall": "wall clock"}
    lines = [f"Step cost, {s['size']} {s.get('backbone', 'vilt')} backbone, {s['device']}, batch {s['batch_size']}, threads {s['threads']}, "
             f"precision {s['precision']}, compile {s['compile']}; {s['repeats']} interleaved rounds of {s['steps']} step(s), "
             f"{s['warmup']} warm-up steps; load average {s['load_before'][0]:.2f} before, "
             f"{s['load_after'][0]:.2f} after, on {s['cpus']} CPUs. Times by {names[clock]}.", "",
             "| step | trained params | samples/s (median; fastest) | time / fedavg-adapter, median of rounds "
             f"(quartiles) | fastest / fastest | median by {names['wall' if clock == 'cpu' else 'cpu']} "
             "| step peak MiB | optimiser state MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in modes.items():
        mem = result["memory"].get(name, {})
        peak = mem.get("step_peak_mib")
        q = m["time_ratio_quartiles"]
        lines.append(f"| {name} | {result['trained_parameters'][name]:,} | {m['samples_per_s']:.1f}; "
                     f"{m['samples_per_s_best']:.1f} | {m['time_ratio_to_fedavg_adapter']:.2f} ({q[0]:.2f}-{q[1]:.2f}) "
                     f"| {m['time_ratio_fastest']:.2f} | {other[name]['time_ratio_to_fedavg_adapter']:.2f} "
                     f"| {'-' if peak is None else f'{peak:.1f}'} | {mem.get('optimizer_state_mib', 0):.1f} |")
    lines.append("")
    if "feddat" in modes:
        m = modes["feddat"]
        lines.append(f"FedDAT / FedAvg-adapter step time: **{m['time_ratio_to_fedavg_adapter']:.2f}** (median of "
                     f"rounds; {m['time_ratio_fastest']:.2f} between the fastest rounds).")
    if "feddat-3fwd" in modes:
        m = modes["feddat-3fwd"]
        lines.append(f"The authors' three-forward form / FedAvg-adapter: {m['time_ratio_to_fedavg_adapter']:.2f} "
                     f"({m['time_ratio_fastest']:.2f}).")
    fused = modes.get("feddat-fused", {})
    if "time_ratio_to_feddat" in fused:
        q = fused["time_ratio_to_feddat_quartiles"]
        lines.append(f"Fused / unfused FedDAT step time: **{fused['time_ratio_to_feddat']:.2f}** (quartiles "
                     f"{q[0]:.2f}-{q[1]:.2f}; {fused['time_ratio_to_feddat_fastest']:.2f} between the fastest rounds).")
    source = next(iter(result["memory"].values()), {}).get("step_peak_source", "")
    lines.append(f"Step peak: memory allocated during one step above what was allocated before it ({source}).")
    rss = {k: v["rss_peak_growth_mib"] for k, v in result["memory"].items() if v.get("rss_peak_growth_mib") is not None}
    if rss:
        lines.append("Peak resident set growth during one step (VmHWM, a lower bound: freed memory is kept by the "
                     "C allocator): " + ", ".join(f"{k} {v:.1f} MiB" for k, v in rss.items()) + ".")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    device = torch.device(args.device)
    if args.clock == "auto":
        args.clock = "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    load_before = os.getloadavg()
    started = time.time()
    contenders = build(args, device)
    batches = make_batches(backbone_shape(args), args.batch_size, args.answers, 4, device, args.seed)
    seconds = time_steps(contenders, batches, args, device)
    memory = {c.name: measure_memory(c, batches[0], device) for c in contenders}
    result = {
        "settings": {**vars(args), "threads": torch.get_num_threads(),
                     "cpus": os.cpu_count(), "load_before": list(load_before), "load_after": list(os.getloadavg()),
                     "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                     "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                     "wall_s": time.time() - started},
        "trained_parameters": {c.name: c.trained_parameters for c in contenders},
        "clock": args.clock,
        "seconds_per_sample": seconds,
        "modes": {clock: summarise(by_mode) for clock, by_mode in seconds.items()},
        "memory": memory,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_cost.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (out / "step_cost.md").write_text(table)
    print(table)
    print(f"wrote {out / 'step_cost.json'} and {out / 'step_cost.md'}")
    return result


if __name__ == "__main__":
    main()
