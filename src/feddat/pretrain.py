"""Pretrain the embedded backbone: a small ViLT trained from scratch on the generated world (or, with
`backbone="blip"`, a small BLIP by the same recipe: the per-patch loss then reads the image encoder's output).

The pool covers every visual style and every question type except counting, which is kept out so that
the federated benchmark has a skill the backbone lacks. An auxiliary per-patch loss (colour and shape of
the object in each cell, and the cell's row and column) speeds up binding of words to image regions; without
the row and column targets, "where" questions stayed at chance for 3,000 steps while the others passed 94%.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from feddat.data.pool import generate, pixel_tensor, tokenize
from feddat.data.questions import PRETRAIN_QTYPES, WORDS, answer_vocabulary
from feddat.data.world import COLORS, GRID, SHAPES, STYLES
from feddat.errors import FedDATError
from feddat.models.backbone import backbone_family, build_word_tokenizer, check_family, encode, small_vilt_config
from feddat.models.blip import BlipBackbone, save_blip, small_blip_config
from feddat.models.checkpoints import write_checksums
from feddat.settings import setting


@dataclass
class PretrainConfig:
    steps: int = setting(6000, "optimiser steps")
    batch_size: int = setting(128, "questions per step")
    lr: float = setting(1e-3, "peak learning rate (AdamW)")
    weight_decay: float = setting(0.01, "AdamW weight decay")
    warmup: int = setting(1000, "warm-up steps before the linear decay")
    pool_images: int = setting(60000, "images of the generated world to pretrain on")
    questions_per_image: int = setting(4, "questions drawn per image")
    eval_questions: int = setting(5000, "held-out questions scored at each checkpoint")
    aux_weight: float = setting(0.5, "weight of the auxiliary per-patch loss (colour, shape, cell of each patch)")
    hidden: int = setting(128, "hidden size of the backbone")
    layers: int = setting(4, "transformer layers (each of BLIP's two encoders)")
    heads: int = setting(4, "attention heads (must divide hidden)")
    intermediate: int = setting(512, "feed-forward width")
    text_len: int = setting(12, "tokens per question")
    seed: int = setting(0, "fixes data and initialisation")
    checkpoint_every: int = setting(1000, "steps between checkpoints (the run resumes from the last)")
    threads: int = setting(0, "torch intra-op threads; 0 = torch's default")
    device: str = setting("cpu", "torch device")
    backbone: str = setting("vilt", "vilt, or blip: `layers` layers in each of its two encoders")

    def validate(self) -> None:
        for name in ("steps", "batch_size", "pool_images", "questions_per_image", "eval_questions", "hidden",
                     "layers", "heads", "intermediate", "text_len", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise FedDATError(f"pretrain {name} must be positive, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise FedDATError(f"pretrain hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        check_family(self.backbone)


class PretrainModel(nn.Module):
    def __init__(self, backbone, n_answers: int):
        super().__init__()
        self.backbone = backbone
        d = backbone.config.hidden_size
        self.answer_head = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, n_answers))
        self.color_head = nn.Linear(d, len(COLORS) + 1)
        self.shape_head = nn.Linear(d, len(SHAPES) + 1)
        self.cell_head = nn.Linear(d, 2 * GRID)  # row logits, then column logits

    def forward(self, input_ids, attention_mask, pixel_values):
        if backbone_family(self.backbone) == "blip":
            _, pooled, image = self.backbone(input_ids, attention_mask, pixel_values)
            patches = image[:, 1:]  # the image encoder's output after its [CLS]
        else:
            seq, pooled = encode(self.backbone, input_ids, attention_mask, pixel_values)
            patches = seq[:, input_ids.shape[1] + 1:]  # after the text tokens and the image [CLS]
        return self.answer_head(pooled), self.color_head(patches), self.shape_head(patches), self.cell_head(patches)


def reinit_unseen_words(backbone, tokenizer, seen: set[str], seed: int) -> list[str]:
    """Give words that never occurred in pretraining random embeddings at the norm of the trained ones.

    Such words keep their tiny initial embeddings otherwise (no gradient ever reaches them), which makes them
    nearly indistinguishable from one another once layer norm is applied: a later finetuning could not learn
    them. Returns the words re-drawn.
    """
    emb = backbone.get_input_embeddings().weight
    vocab = tokenizer.get_vocab()
    unseen = sorted(w for w in vocab if w not in seen and not w.startswith("["))
    trained = [vocab[w] for w in seen if w in vocab]
    target = emb.data[trained].norm(dim=1).mean()
    g = torch.Generator().manual_seed(seed)
    for w in unseen:
        v = torch.randn(emb.shape[1], generator=g)
        emb.data[vocab[w]] = v / v.norm() * target
    return unseen


def _fresh_backbone(cfg: PretrainConfig, vocab_size: int) -> nn.Module:
    """The randomly initialised backbone of the pretraining recipe: a small ViLT or a small BLIP."""
    if cfg.backbone == "blip":
        return BlipBackbone(small_blip_config(vocab_size, cfg.hidden, cfg.layers, cfg.heads, cfg.intermediate,
                                              cfg.text_len))
    from transformers import ViltModel

    backbone = ViltModel(small_vilt_config(vocab_size, cfg.hidden, cfg.layers, cfg.heads, cfg.intermediate,
                                           cfg.text_len))
    # ViltEmbeddings starts [CLS] and patch positions at zero; give them the usual small random start.
    nn.init.trunc_normal_(backbone.embeddings.cls_token, std=0.02)
    nn.init.trunc_normal_(backbone.embeddings.position_embeddings, std=0.2)
    return backbone


def _resumable(config: dict) -> dict:
    """The settings a checkpoint must share with the config that resumes it (threads and device may differ)."""
    config = {"backbone": "vilt", **config}  # checkpoints from before the BLIP option are ViLT ones
    return {k: v for k, v in config.items() if k not in ("threads", "device")}


_CELLS = (torch.arange(GRID * GRID) // GRID, torch.arange(GRID * GRID) % GRID)


def _pool(cfg: PretrainConfig, seed: int, n_questions: int, tokenizer, answers: list[str]):
    rng = np.random.default_rng(seed)
    rec = generate(rng, n_questions, list(STYLES), list(PRETRAIN_QTYPES), questions_per_image=cfg.questions_per_image)
    ids, mask = tokenize(tokenizer, rec.questions, cfg.text_len)
    lookup = {a: i for i, a in enumerate(answers)}
    return {
        "pixels": pixel_tensor(rec.images),
        "colors": torch.from_numpy(rec.patch_colors),
        "shapes": torch.from_numpy(rec.patch_shapes),
        "image_index": torch.from_numpy(rec.image_index),
        "input_ids": ids,
        "attention_mask": mask,
        "labels": torch.tensor([lookup[a] for a in rec.answers]),
        "qtypes": np.asarray(rec.qtypes),
        "questions": rec.questions,
    }


def _batch(pool, idx, device="cpu"):
    img = pool["image_index"][idx]
    return tuple(t.to(device) for t in (pool["input_ids"][idx], pool["attention_mask"][idx], pool["pixels"][img],
                                        pool["labels"][idx], pool["colors"][img], pool["shapes"][img]))


@torch.no_grad()
def evaluate(model: PretrainModel, pool, batch_size: int = 512) -> dict:
    model.eval()
    device = next(model.parameters()).device
    preds = []
    for start in range(0, len(pool["labels"]), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(pool["labels"])))
        ids, mask, px, *_ = _batch(pool, idx, device)
        preds.append(model(ids, mask, px)[0].argmax(-1).cpu())
    correct = (torch.cat(preds) == pool["labels"]).numpy()
    model.train()
    report = {"accuracy": float(correct.mean())}
    for q in PRETRAIN_QTYPES:
        sel = pool["qtypes"] == q
        report[f"accuracy_{q}"] = float(correct[sel].mean()) if sel.any() else float("nan")
    return report


def pretrain(cfg: PretrainConfig, out: Path, progress: bool = True) -> dict:
    """Train, checkpointing to `out/checkpoint.pt` (resumed if present); write a save_pretrained backbone."""
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    tokenizer = build_word_tokenizer(WORDS, cfg.text_len)
    answers = answer_vocabulary()
    backbone = _fresh_backbone(cfg, len(tokenizer))
    model = PretrainModel(backbone, len(answers)).to(cfg.device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embeddings" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embeddings" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))

    def lr_at(step):
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, elapsed, history = 0, 0.0, []
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False, map_location=cfg.device)
        if _resumable(state["config"]) != _resumable(asdict(cfg)):
            raise FedDATError(f"{ckpt} was written with another pretraining config; remove it or use the same "
                              "options to resume")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"].cpu())
        step, elapsed, history = state["step"], state["elapsed"], state["history"]

    t0 = time.time()
    train_pool = _pool(cfg, cfg.seed, cfg.pool_images * cfg.questions_per_image, tokenizer, answers)
    eval_pool = _pool(cfg, cfg.seed + 10_000, cfg.eval_questions, tokenizer, answers)
    elapsed += time.time() - t0
    ce = nn.CrossEntropyLoss()
    n = len(train_pool["labels"])
    bar = tqdm(total=cfg.steps, initial=step, desc="pretrain", disable=not progress, unit="step")
    model.train()
    t0 = time.time()
    losses: list[tuple[float, float]] = []  # (answer, patch) losses since the last evaluation
    while step < cfg.steps:
        idx = torch.randint(n, (cfg.batch_size,), generator=gen)
        ids, mask, px, y, col, shp = _batch(train_pool, idx, cfg.device)
        logits, col_logits, shp_logits, cell_logits = model(ids, mask, px)
        loss_answer = ce(logits, y)
        cell = cell_logits.flatten(0, 1)
        rows, cols = _CELLS[0].repeat(len(y)).to(y.device), _CELLS[1].repeat(len(y)).to(y.device)
        loss_patch = (ce(col_logits.flatten(0, 1), col.flatten()) + ce(shp_logits.flatten(0, 1), shp.flatten())
                      + ce(cell[:, :GRID], rows) + ce(cell[:, GRID:], cols))
        loss = loss_answer + cfg.aux_weight * loss_patch
        losses.append((loss_answer.item(), loss_patch.item()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss_answer.item():.3f}", patch=f"{loss_patch.item():.3f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            report = evaluate(model, eval_pool)
            elapsed_now = elapsed + time.time() - t0
            train = {"train_loss": float(np.mean([a for a, _ in losses])),
                     "train_patch_loss": float(np.mean([b for _, b in losses]))} if losses else {}
            losses = []
            history.append({"step": step, "seconds": round(elapsed_now, 1), **train, **report})
            bar.write(f"step {step}: eval accuracy {report['accuracy']:.4f} "
                      + " ".join(f"{q}={report['accuracy_' + q]:.3f}" for q in PRETRAIN_QTYPES))
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"config": asdict(cfg), "model": model.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "generator": gen.get_state(), "step": step,
                        "elapsed": elapsed_now, "history": history}, tmp)
            tmp.replace(ckpt)
    bar.close()
    final = evaluate(model, eval_pool)
    seen_words = {w for q in train_pool["questions"] for w in q.split()}
    redrawn = reinit_unseen_words(backbone, tokenizer, seen_words, cfg.seed)
    final_dir = out / "backbone"
    if final_dir.exists():
        shutil.rmtree(final_dir)
    if cfg.backbone == "blip":
        save_blip(backbone.to("cpu"), tokenizer, final_dir)
    else:
        backbone.to("cpu").save_pretrained(final_dir)
        tokenizer.save_pretrained(final_dir)
    info = {"config": asdict(cfg), "eval": final, "history": history, "torch_threads": torch.get_num_threads(),
            "words_unseen_in_pretraining": redrawn,
            "seconds": history[-1]["seconds"] if history else None}
    (final_dir / "pretrain_report.json").write_text(json.dumps(info, indent=2))
    write_checksums(final_dir)
    return info
