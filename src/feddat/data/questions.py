"""Question templates over generated scenes, with optional per-client word meanings ("dialects")."""

from __future__ import annotations

import numpy as np

from feddat.data.world import COLORS, GRID, SHAPES, Scene

QTYPES = ("color", "shape", "exist", "where", "size", "count")
# The counting skill is kept out of pretraining: the backbone must lack it (testbed property b).
PRETRAIN_QTYPES = ("color", "shape", "exist", "where", "size")
MAX_COUNT = 7
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")

# Words absent from pretraining that every client uses now and then for a colour or shape: the shared
# vocabulary the federation can teach (testbed property b). Questions use them; answers never do.
SYNONYMS = {
    "crimson": "red", "lime": "green", "navy": "blue", "gold": "yellow", "violet": "purple", "teal": "cyan",
    "ball": "circle", "box": "square", "wedge": "triangle", "rhombus": "diamond", "plus": "cross",
}
_SURFACE = {}
for _syn, _word in SYNONYMS.items():
    _SURFACE.setdefault(_word, []).append(_syn)

WORDS = (
    "what color is the shape thing there a where size how many things are of ? s"
).split() + list(COLORS) + list(SHAPES) + list(SYNONYMS)


# Words of the Function benchmark's questions (cells, relations, logic, facts), absent from pretraining. A
# word-level backbone that lacks them gets them appended at load, at the norm of its trained words
# (`feddat.models.vocab.extend_word_vocabulary`), as pretraining does for the synonyms.
EXTRA_WORDS = ("in", "row", "column", "1", "2", "3", "4", "left", "above", "next", "to", "and", "or", "not",
               "used", "for", "made")
# Words of the Task benchmark's statements and candidate answers, appended at load in the same way.
TASK_WORDS = ("small", "big", "both", "images", "have", "only", "one", "image", "has", "0", "5", "6", "7")


def answer_vocabulary() -> list[str]:
    """Every answer any generated question can have, in a fixed order."""
    return (list(COLORS) + list(SHAPES) + ["yes", "no"] + list(QUADRANTS) + ["small", "big"]
            + [str(i) for i in range(MAX_COUNT + 1)])


def _quadrant(row: int, col: int) -> str:
    return QUADRANTS[(row >= GRID // 2) * 2 + (col >= GRID // 2)]


class Question(tuple):
    """(question, answer) plus tags: 'shifted' (a word with this client's own meaning), 'synonym'."""

    def __new__(cls, question: str, answer: str, tags: frozenset = frozenset()):
        obj = super().__new__(cls, (question, answer))
        obj.tags = tags
        return obj


def ask(scene: Scene, qtype: str, rng: np.random.Generator, dialect: dict[str, str] | None = None,
        synonym_p: float = 0.0, synonyms: tuple[str, ...] | None = None) -> Question | None:
    """One (question, answer) about `scene`, or None when the scene cannot support this type.

    `dialect` renames words for this client: a word's meaning changes in both questions and answers,
    so the remap must happen inside the model (a personal head cannot undo it for yes/no answers).
    `synonym_p`: the chance that a colour or shape the question mentions is said with a synonym, drawn from
    `synonyms` (default: all of `SYNONYMS`). Synonyms name the *true* colour or shape in every client (the
    shared vocabulary means the same everywhere); only the old words carry a client's dialect.
    """
    dialect = dialect or {}
    tags = set()

    def say(w: str) -> str:
        if synonym_p > 0:
            options = [o for o in _SURFACE.get(w, ()) if synonyms is None or o in synonyms]
            if options and rng.random() < synonym_p:
                tags.add("synonym")
                return options[rng.integers(len(options))]
        if w in dialect:
            tags.add("shifted")
        return dialect.get(w, w)

    result = _ask(scene, qtype, rng, dialect, say)
    if result is None:
        return None
    question, answer = result
    return Question(question, answer, frozenset(tags))


def _ask(scene: Scene, qtype: str, rng: np.random.Generator, dialect: dict[str, str], say):
    """(question, answer) or None; `say(word)` gives the surface form of a colour or shape in the question."""
    objs = scene.objects

    def done(q: str, a: str):
        return q, a

    if qtype == "color":
        unique = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
        if not unique:
            return None
        o = unique[rng.integers(len(unique))]
        return done(f"what color is the {say(o.shape)} ?", dialect.get(o.color, o.color))
    if qtype == "shape":
        unique = [o for o in objs if sum(p.color == o.color for p in objs) == 1]
        if not unique:
            return None
        o = unique[rng.integers(len(unique))]
        return done(f"what shape is the {say(o.color)} thing ?", dialect.get(o.shape, o.shape))
    if qtype == "exist":
        if rng.random() < 0.5:
            o = objs[rng.integers(len(objs))]
            return done(f"is there a {say(o.color)} {say(o.shape)} ?", "yes")
        present = {(o.color, o.shape) for o in objs}
        for _ in range(20):
            c, s = COLORS[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))]
            if (c, s) not in present:
                return done(f"is there a {say(c)} {say(s)} ?", "no")
        return None
    if qtype in ("where", "size"):
        o = objs[rng.integers(len(objs))]
        if qtype == "where":
            return done(f"where is the {say(o.color)} {say(o.shape)} ?", _quadrant(o.row, o.col))
        return done(f"what size is the {say(o.color)} {say(o.shape)} ?", o.size)
    if qtype == "count":
        kind = rng.integers(3)
        if kind == 0:
            return done("how many things are there ?", str(len(objs)))
        if kind == 1:
            c = COLORS[rng.integers(len(COLORS))]
            return done(f"how many {say(c)} things are there ?", str(sum(o.color == c for o in objs)))
        s = SHAPES[rng.integers(len(SHAPES))]
        return done(f"how many {say(s)} s are there ?", str(sum(o.shape == s for o in objs)))
    raise ValueError(f"unknown question type {qtype!r}; choose one of {', '.join(QTYPES)}")
