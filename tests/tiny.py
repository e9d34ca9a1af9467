"""Small helpers shared by the tests that drive a method's local step on the tiny backbone."""

from __future__ import annotations

import torch

QUESTIONS = ("what color is the circle ?", "is there a red square ?")


def tiny_batch(tokenizer, n=6, seed=0, questions=QUESTIONS):
    """A batch of n questions (cycling through `questions`) over random 48x48 images, with labels in 0..3."""
    g = torch.Generator().manual_seed(seed)
    enc = tokenizer(list(questions) * (n // len(questions)), padding="max_length", max_length=12,
                    return_tensors="pt", return_token_type_ids=False)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "pixel_values": torch.rand(n, 3, 48, 48, generator=g) * 2 - 1,
            "labels": torch.randint(0, 4, (n,), generator=g)}


def randomise_adapters(model, seed=0):
    """Every adapter's parameters drawn at random (adapters start as the identity, which hides their effect)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for slot in model.slots:
            for adapter in slot.adapters.values():
                for p in adapter.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def run_numbers(results: dict) -> tuple:
    """What a run computed (not how long it took): per-round losses, scores and update norms, and the final
    scores per client and view."""
    return ([r["train"] for r in results["rounds"]], [r.get("test") for r in results["rounds"]],
            [r.get("update_norms") for r in results["rounds"]], results["final"]["clients"],
            results["final"]["views"], results["final"]["avg_score_se"])


def close(a: dict, b: dict, tol: float = 1e-6) -> bool:
    """The same keys, and values within `tol` of each other."""
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= tol for k in a)
