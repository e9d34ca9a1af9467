"""Question templates over generated scenes, with optional per-client word meanings ("dialects")."""

from __future__ import annotations

import numpy as np

from feddat.data.world import COLORS, GRID, SHAPES, Scene

QTYPES = ("color", "shape", "exist", "where", "size", "count")
# The counting skill is kept out of pretraining: the backbone must lack it (testbed property b).
PRETRAIN_QTYPES = ("color", "shape", "exist", "where", "size")
MAX_COUNT = 7
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")

WORDS = (
    "what color is the shape thing there a where size how many things are of ? s"
).split() + list(COLORS) + list(SHAPES)


def answer_vocabulary() -> list[str]:
    """Every answer any generated question can have, in a fixed order."""
    return (list(COLORS) + list(SHAPES) + ["yes", "no"] + list(QUADRANTS) + ["small", "big"]
            + [str(i) for i in range(MAX_COUNT + 1)])


def _quadrant(row: int, col: int) -> str:
    return QUADRANTS[(row >= GRID // 2) * 2 + (col >= GRID // 2)]


def ask(scene: Scene, qtype: str, rng: np.random.Generator, dialect: dict[str, str] | None = None):
    """One (question, answer) about `scene`, or None when the scene cannot support this type.

    `dialect` renames words for this client: a word's meaning changes in both questions and answers,
    so the remap must happen inside the model (a personal head cannot undo it for yes/no answers).
    """
    objs = scene.objects
    say = (lambda w: dialect.get(w, w)) if dialect else (lambda w: w)
    if qtype == "color":
        unique = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
        if not unique:
            return None
        o = unique[rng.integers(len(unique))]
        return f"what color is the {say(o.shape)} ?", say(o.color)
    if qtype == "shape":
        unique = [o for o in objs if sum(p.color == o.color for p in objs) == 1]
        if not unique:
            return None
        o = unique[rng.integers(len(unique))]
        return f"what shape is the {say(o.color)} thing ?", say(o.shape)
    if qtype == "exist":
        if rng.random() < 0.5:
            o = objs[rng.integers(len(objs))]
            return f"is there a {say(o.color)} {say(o.shape)} ?", "yes"
        present = {(o.color, o.shape) for o in objs}
        for _ in range(20):
            c, s = COLORS[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))]
            if (c, s) not in present:
                return f"is there a {say(c)} {say(s)} ?", "no"
        return None
    if qtype in ("where", "size"):
        o = objs[rng.integers(len(objs))]
        if qtype == "where":
            return f"where is the {say(o.color)} {say(o.shape)} ?", _quadrant(o.row, o.col)
        return f"what size is the {say(o.color)} {say(o.shape)} ?", o.size
    if qtype == "count":
        kind = rng.integers(3)
        if kind == 0:
            return "how many things are there ?", str(len(objs))
        if kind == 1:
            c = COLORS[rng.integers(len(COLORS))]
            return f"how many {say(c)} things are there ?", str(sum(o.color == c for o in objs))
        s = SHAPES[rng.integers(len(SHAPES))]
        return f"how many {say(s)} s are there ?", str(sum(o.shape == s for o in objs))
    raise ValueError(f"unknown question type {qtype!r}; choose one of {', '.join(QTYPES)}")
