"""Generate (image, question, answer) records in bulk: the pretraining pool and client datasets share this."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from feddat.data.questions import ask
from feddat.data.world import patch_labels, render, sample_scene


@dataclass
class Records:
    """Images stored once; each question points at its image."""

    images: np.ndarray          # (n_images, 48, 48, 3) uint8
    patch_colors: np.ndarray    # (n_images, 16) int64, 0 = empty
    patch_shapes: np.ndarray    # (n_images, 16) int64
    image_index: np.ndarray     # (n_questions,) int64
    questions: list[str]
    answers: list[str]
    qtypes: list[str]
    shifted: list[bool]         # the question mentions a word whose meaning this client changed
    synonym: list[bool]         # the question uses a word absent from pretraining
    task: str = "vqa"           # vqa | entailment | pair | choice: what the client's head does (TASKS)
    image_index2: np.ndarray | None = None  # pair: the second image of each statement
    candidates: list[list[str]] | None = None  # choice: each question's candidate answers; its answer is one
    annotator_answers: list[list[str]] | None = None  # vqa: every annotator's answer, for soft VQA scores
    ids: list[str] = field(default_factory=list)  # source record ids (real datasets), for error messages

    def __len__(self) -> int:
        return len(self.questions)


# The kinds of client task, and how each is scored (docs/benchmarks.md, "Task").
TASKS = {
    "vqa": "answer classification over the client's answers; VQA score (soft) where annotators' answers exist",
    "entailment": "image + statement -> entailment / neutral / contradiction; accuracy",
    "pair": "two images + statement -> true / false; accuracy",
    "choice": "question + candidate answers -> the right candidate; accuracy",
}
ENTAILMENT_LABELS = ["contradiction", "entailment", "neutral"]
PAIR_LABELS = ["false", "true"]


@dataclass(frozen=True)
class HeadSpec:
    """What a client's head predicts: its task kind (TASKS) and its number of answers."""

    task: str
    n_answers: int


def generate(rng: np.random.Generator, n_questions: int, styles: list[str], qtypes: list[str],
             qtype_p: np.ndarray | None = None, questions_per_image: int = 1,
             color_p=None, shape_p=None, dialect=None, palette=None, synonym_p: float = 0.0,
             synonyms: tuple[str, ...] | None = None) -> Records:
    """`n_questions` records over fresh scenes; each image carries up to `questions_per_image` questions."""
    images, pcol, pshp, index, qs, ans, types, shifted, synonym = [], [], [], [], [], [], [], [], []
    while len(qs) < n_questions:
        scene = sample_scene(rng, color_p=color_p, shape_p=shape_p)
        style = styles[rng.integers(len(styles))]
        added = 0
        for _ in range(questions_per_image * 3):
            if added == questions_per_image or len(qs) == n_questions:
                break
            qtype = qtypes[rng.choice(len(qtypes), p=qtype_p)]
            qa = ask(scene, qtype, rng, dialect, synonym_p, synonyms)
            if qa is None:
                continue
            qs.append(qa[0])
            ans.append(qa[1])
            types.append(qtype)
            shifted.append("shifted" in qa.tags)
            synonym.append("synonym" in qa.tags)
            index.append(len(images))
            added += 1
        if added:
            images.append(render(scene, style, rng, palette))
            c, s = patch_labels(scene)
            pcol.append(c)
            pshp.append(s)
    return Records(np.stack(images), np.stack(pcol), np.stack(pshp), np.asarray(index, dtype=np.int64),
                   qs, ans, types, shifted, synonym)


def pixel_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, H, W, 3) -> float (n, 3, H, W) in [-1, 1], ViLT's normalisation (mean 0.5, std 0.5)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def tokenize(tokenizer, questions: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(questions, padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt", return_token_type_ids=False)
    return enc["input_ids"], enc["attention_mask"]
