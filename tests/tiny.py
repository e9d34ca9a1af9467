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
