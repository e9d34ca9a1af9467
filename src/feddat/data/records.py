"""Generate records from any scene sampler, question asker and renderer (the Function and Scene benchmarks)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from feddat.data.pool import Records
from feddat.data.questions import SYNONYMS, WORDS
from feddat.data.world import Scene, patch_labels

MAX_WORDS = 10  # the backbone's 12 text positions less [CLS] and [SEP]
# Words the embedded backbone saw in pretraining: the synonyms are in its vocabulary but never in its data.
PRETRAINED_WORDS = frozenset(WORDS) - frozenset(SYNONYMS)

Asker = Callable[[Scene, np.random.Generator], "tuple[str, str, str] | None"]


def uses_new_word(question: str) -> bool:
    """The question has a word the embedded backbone never saw in pretraining."""
    return any(w not in PRETRAINED_WORDS for w in question.split())


def generate_records(rng: np.random.Generator, n_questions: int, draw_scene: Callable[[np.random.Generator], Scene],
                     asker: Asker, draw_image: Callable[[Scene, np.random.Generator], np.ndarray]) -> Records:
    """`n_questions` records, one per fresh scene; `asker` gives (question, answer, qtype) or None when the
    scene cannot support its question (then it tries again on the same scene, then on a new one)."""
    images, pcol, pshp, index, qs, ans, types = [], [], [], [], [], [], []
    while len(qs) < n_questions:
        scene = draw_scene(rng)
        qa = None
        for _ in range(3):
            qa = asker(scene, rng)
            if qa is not None:
                break
        if qa is None:
            continue
        question, answer, qtype = qa
        if len(question.split()) > MAX_WORDS:
            raise ValueError(f"question {question!r} has more than {MAX_WORDS} words")
        qs.append(question)
        ans.append(answer)
        types.append(qtype)
        index.append(len(images))
        images.append(draw_image(scene, rng))
        c, s = patch_labels(scene)
        pcol.append(c)
        pshp.append(s)
    return Records(np.stack(images), np.stack(pcol), np.stack(pshp), np.asarray(index, dtype=np.int64),
                   qs, ans, types, [False] * len(qs), [uses_new_word(q) for q in qs])
