"""The Function benchmark: five clients over the same visual world, each asking one kind of question.

Every client sees the same scenes (uniform colours and shapes, all five rendering styles); what differs is the
*function* its questions exercise: recognising the object in a cell, recognising an object's attributes,
reasoning about spatial relations, combining facts with and/or/not, and looking answers up in a fixed fact
table about objects (`USES`, `MATERIALS`). The clients' label spaces barely overlap, so this is a task shift,
not a covariate shift.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from feddat.data.pool import Records
from feddat.data.questions import ask
from feddat.data.records import generate_records
from feddat.data.world import COLORS, SHAPES, STYLES, Obj, Scene, render, sample_scene

# The fact table of the knowledge client: what an object of a shape is used for, what one of a colour is made
# of. The answers are never in the image: a model must learn the table from its training data.
USES = {"circle": "rolling", "square": "storing", "triangle": "warning", "diamond": "trading", "cross": "healing"}
MATERIALS = {"red": "clay", "green": "wood", "blue": "glass", "yellow": "straw", "purple": "silk", "cyan": "ice"}

FUNCTIONS = {
    "recognition": ("shape-at", "color-at", "object-at"),
    "attribute": ("color", "size"),
    "relation": ("left", "above", "next"),
    "logic": ("and", "or", "not"),
    "knowledge": ("use", "material"),
}


def _cell(o: Obj) -> str:
    return f"row {o.row + 1} column {o.col + 1}"


def _name(o: Obj) -> str:
    return f"{o.color} {o.shape}"


def holds(relation: str, a: Obj, b: Obj) -> bool:
    """Whether `a` is left of / above / next to `b` (next: the cells touch, diagonals included)."""
    if relation == "left":
        return a.col < b.col
    if relation == "above":
        return a.row < b.row
    if relation == "next":
        return max(abs(a.row - b.row), abs(a.col - b.col)) == 1
    raise ValueError(f"unknown relation {relation!r}")


_RELATION_WORDS = {"left": "left of", "above": "above", "next": "next to"}


def _present(scene: Scene, term: tuple[str, str]) -> bool:
    kind, value = term
    return any((o.color if kind == "color" else o.shape) == value for o in scene.objects)


def _say(term: tuple[str, str]) -> str:
    return f"{term[1]} thing" if term[0] == "color" else term[1]


def logic_answer(op: str, a: bool, b: bool) -> bool:
    return {"and": a and b, "or": a or b, "not": a and not b}[op]


def ask_function(scene: Scene, qtype: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """(question, answer) of one question type of `FUNCTIONS`, or None when the scene cannot support it."""
    objs = scene.objects
    if qtype in FUNCTIONS["recognition"]:
        o = objs[rng.integers(len(objs))]
        if qtype == "shape-at":
            return f"what shape is in {_cell(o)} ?", o.shape
        if qtype == "color-at":
            return f"what color is in {_cell(o)} ?", o.color
        return f"what is in {_cell(o)} ?", _name(o)
    if qtype in FUNCTIONS["attribute"]:
        qa = ask(scene, qtype, rng)
        return None if qa is None else (qa[0], qa[1])
    if qtype in FUNCTIONS["relation"]:
        want = bool(rng.random() < 0.5)  # balanced yes/no: a model cannot win on the prior
        pairs = [(a, b) for a in objs for b in objs if a is not b and holds(qtype, a, b) == want]
        if not pairs:
            return None
        a, b = pairs[rng.integers(len(pairs))]
        return f"is the {_name(a)} {_RELATION_WORDS[qtype]} the {_name(b)} ?", "yes" if want else "no"
    if qtype in FUNCTIONS["logic"]:
        want = bool(rng.random() < 0.5)
        joiner = {"and": "and a", "or": "or a", "not": "and not a"}[qtype]
        for _ in range(30):
            a, b = (("color", COLORS[rng.integers(len(COLORS))]) if rng.random() < 0.5
                    else ("shape", SHAPES[rng.integers(len(SHAPES))]) for _ in range(2))
            question = f"is there a {_say(a)} {joiner} {_say(b)} ?"
            if a == b or len(question.split()) > 10:
                continue
            if logic_answer(qtype, _present(scene, a), _present(scene, b)) == want:
                return question, "yes" if want else "no"
        return None
    if qtype == "use":
        unique = [o for o in objs if sum(p.color == o.color for p in objs) == 1]
        if not unique:
            return None
        o = unique[rng.integers(len(unique))]
        return f"what is the {o.color} thing used for ?", USES[o.shape]
    if qtype == "material":
        unique = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
        if not unique:
            return None
        o = unique[rng.integers(len(unique))]
        return f"what is the {o.shape} made of ?", MATERIALS[o.color]
    raise ValueError(f"unknown question type {qtype!r}")


@dataclass(frozen=True)
class FunctionClientSpec:
    """One client of the Function benchmark: a question function and the mix of its question types."""

    name: str
    qtype_weights: dict[str, float]
    styles: tuple[str, ...] = STYLES

    def records(self, seed: int, index: int, sizes) -> dict[str, Records]:
        """Train/val/test records, deterministic in (seed, index, sizes)."""
        rng = np.random.default_rng([seed, index, 1])
        qtypes = list(self.qtype_weights)
        w = np.asarray([self.qtype_weights[q] for q in qtypes], dtype=float)
        w = w / w.sum()

        def asker(scene, r):
            qtype = qtypes[r.choice(len(qtypes), p=w)]
            qa = ask_function(scene, qtype, r)
            return None if qa is None else (qa[0], qa[1], qtype)

        def draw_image(scene, r):
            return render(scene, self.styles[r.integers(len(self.styles))], r)

        return {split: generate_records(rng, getattr(sizes, split), sample_scene, asker, draw_image)
                for split in ("train", "val", "test")}


def function_clients() -> list[FunctionClientSpec]:
    """Five clients, one question function each, equal weights over the function's question types."""
    return [FunctionClientSpec(name, {q: 1.0 for q in qtypes}) for name, qtypes in FUNCTIONS.items()]
