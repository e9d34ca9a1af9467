"""The Task benchmark: four clients over the same visual world, each a different vision-language task.

- vqa: answer classification (the Domain benchmark's question types), ten simulated annotators per question
  and the VQA soft score (as VQAv2);
- entailment: image + statement -> entailment / neutral / contradiction (as SNLI-VE): "the red circle is big"
  is entailed when the image has a big red circle, contradicted when its red circle is small, neutral when the
  image has no red circle;
- pair: two images + statement -> true / false (as NLVR2): "both images have a red circle", "only one image has
  a red circle";
- choice: question + four candidate answers -> the right one (as VCR): "what color is the circle ?" with four
  colours to choose from.

Every client sees the same scenes in all five styles; what differs is the task, its head and its loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from feddat.data.pool import ENTAILMENT_LABELS, PAIR_LABELS, Records, generate
from feddat.data.questions import MAX_COUNT, QUADRANTS, ask
from feddat.data.records import MAX_WORDS, uses_new_word
from feddat.data.world import COLORS, SHAPES, SIZES, STYLES, Obj, Scene, patch_labels, render, sample_scene

ANNOTATORS = 10
ANSWER_SETS = {"color": list(COLORS), "shape": list(SHAPES), "exist": ["yes", "no"], "where": list(QUADRANTS),
               "size": list(SIZES), "count": [str(i) for i in range(MAX_COUNT + 1)]}
CHOICES = 4
CHOICE_QTYPES = ("color", "shape", "count")


def annotate(answer: str, qtype: str, rng: np.random.Generator, p_right: float) -> list[str]:
    """Ten annotators' answers: each the true answer with probability `p_right`, else another answer of the
    same question type (annotators confuse answers of the kind asked for)."""
    others = [a for a in ANSWER_SETS[qtype] if a != answer]
    return [answer if rng.random() < p_right else others[rng.integers(len(others))] for _ in range(ANNOTATORS)]


def consensus(answers: list[str]) -> str:
    """The most frequent answer (first seen among ties), as VQA's multiple_choice_answer."""
    counts: dict[str, int] = {}
    for a in answers:
        counts[a] = counts.get(a, 0) + 1
    return max(counts, key=counts.get)


def _name(color: str, shape: str) -> str:
    return f"{color} {shape}"


def _with_object(scene: Scene, color: str, shape: str, rng: np.random.Generator) -> Scene:
    """`scene` with a (color, shape) object, replacing one of its objects when it has none."""
    if any(o.color == color and o.shape == shape for o in scene.objects):
        return scene
    objs = list(scene.objects)
    i = int(rng.integers(len(objs)))
    old = objs[i]
    objs[i] = Obj(color, shape, SIZES[int(rng.integers(2))], old.row, old.col)
    return Scene(tuple(objs))


def _without_object(scene: Scene, color: str, shape: str) -> Scene | None:
    objs = tuple(o for o in scene.objects if not (o.color == color and o.shape == shape))
    return Scene(objs) if objs else None


def _draw(rng: np.random.Generator) -> Scene:
    return sample_scene(rng)


def _image(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    return render(scene, STYLES[rng.integers(len(STYLES))], rng)


def entailment_example(rng: np.random.Generator) -> tuple[Scene, str, str, str]:
    """(scene, statement, label, qtype) with the label drawn uniformly from the three."""
    label = ENTAILMENT_LABELS[rng.integers(3)]
    scene = _draw(rng)
    if label == "neutral":  # a statement about an object the image does not have: it neither holds nor fails
        present = {(o.color, o.shape) for o in scene.objects}
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        c, s = absent[rng.integers(len(absent))]
        size = SIZES[rng.integers(2)]
    else:
        o = scene.objects[rng.integers(len(scene.objects))]
        c, s = o.color, o.shape
        size = o.size if label == "entailment" else next(z for z in SIZES if z != o.size)
    return scene, f"the {_name(c, s)} is {size}", label, "size"


def pair_example(rng: np.random.Generator) -> tuple[Scene, Scene, str, str, str]:
    """(left scene, right scene, statement, true/false, qtype) with the truth drawn uniformly."""
    qtype = ("both", "only-one")[rng.integers(2)]
    truth = bool(rng.random() < 0.5)
    c, s = COLORS[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))]
    # how many of the two images have the object: "both" is true with 2 and false with 1 or 0; "only one" is
    # true with 1 and false with 0 or 2
    if qtype == "both":
        holders = 2 if truth else int(rng.integers(2))
    else:
        holders = 1 if truth else 2 * int(rng.integers(2))
    scenes = []
    for has in [True] * holders + [False] * (2 - holders):
        while True:
            scene = _draw(rng)
            scene = _with_object(scene, c, s, rng) if has else _without_object(scene, c, s)
            if scene is not None:
                break
        scenes.append(scene)
    if rng.random() < 0.5:
        scenes.reverse()
    text = (f"both images have a {_name(c, s)}" if qtype == "both" else f"only one image has a {_name(c, s)}")
    return scenes[0], scenes[1], text, PAIR_LABELS[int(truth)], qtype


def choice_example(rng: np.random.Generator) -> tuple[Scene, str, list[str], str, str] | None:
    """(scene, question, candidates, right candidate, qtype), or None when the scene cannot support the
    question drawn."""
    qtype = CHOICE_QTYPES[rng.integers(len(CHOICE_QTYPES))]
    scene = _draw(rng)
    qa = ask(scene, qtype, rng)
    if qa is None:
        return None
    question, answer = qa
    pool = [a for a in ANSWER_SETS[qtype] if a != answer]
    candidates = [answer] + [pool[i] for i in rng.choice(len(pool), size=CHOICES - 1, replace=False)]
    candidates = [candidates[i] for i in rng.permutation(CHOICES)]
    return scene, question, candidates, answer, qtype


def _records(images, scenes, index, questions, answers, qtypes, task, **extra) -> Records:
    pcol, pshp = zip(*(patch_labels(s) for s in scenes))
    return Records(np.stack(images), np.stack(pcol), np.stack(pshp), np.asarray(index, dtype=np.int64), questions,
                   answers, qtypes, [False] * len(questions), [uses_new_word(q) for q in questions], task=task,
                   **extra)


@dataclass(frozen=True)
class TaskClientSpec:
    """One client of the Task benchmark: its task kind (feddat.data.pool.TASKS)."""

    name: str
    task: str
    annotator_accuracy: float = 0.8  # vqa: the chance that an annotator gives the true answer

    def records(self, seed: int, index: int, sizes) -> dict[str, Records]:
        """Train/val/test records, deterministic in (seed, index, sizes)."""
        rng = np.random.default_rng([seed, index, 4])
        return {split: self._split(rng, getattr(sizes, split)) for split in ("train", "val", "test")}

    def _split(self, rng: np.random.Generator, n: int) -> Records:
        if self.task == "vqa":
            qtypes = list(ANSWER_SETS)
            r = generate(rng, n, list(STYLES), qtypes)
            r.annotator_answers = [annotate(a, q, rng, self.annotator_accuracy) for a, q in zip(r.answers, r.qtypes)]
            r.answers = [consensus(a) for a in r.annotator_answers]
            return r
        images, scenes, index, index2, qs, ans, types, cands = [], [], [], [], [], [], [], []
        while len(qs) < n:
            if self.task == "entailment":
                scene, text, label, qtype = entailment_example(rng)
                shown = [scene]
            elif self.task == "pair":
                left, right, text, label, qtype = pair_example(rng)
                shown = [left, right]
            elif self.task == "choice":
                ex = choice_example(rng)
                if ex is None:
                    continue
                scene, text, candidates, label, qtype = ex
                shown = [scene]
                cands.append(candidates)
                if len(text.split()) + max(len(c.split()) for c in candidates) > MAX_WORDS:
                    raise ValueError(f"question {text!r} with its candidates has more than {MAX_WORDS} words")
            else:
                raise ValueError(f"unknown task {self.task!r}")
            if len(text.split()) > MAX_WORDS:
                raise ValueError(f"statement {text!r} has more than {MAX_WORDS} words")
            index.append(len(images))
            for s in shown:
                scenes.append(s)
                images.append(_image(s, rng))
            if self.task == "pair":
                index2.append(len(images) - 1)
            qs.append(text)
            ans.append(label)
            types.append(qtype)
        extra = {}
        if self.task == "pair":
            extra["image_index2"] = np.asarray(index2, dtype=np.int64)
        if self.task == "choice":
            extra["candidates"] = cands
        return _records(images, scenes, index, qs, ans, types, self.task, **extra)


def task_clients() -> list[TaskClientSpec]:
    """Four clients, one task each, in the paper's order (VQA, visual reasoning over pairs, entailment) plus
    the authors' code's multiple choice."""
    return [TaskClientSpec("vqa", "vqa"), TaskClientSpec("pair", "pair"),
            TaskClientSpec("entailment", "entailment"), TaskClientSpec("choice", "choice")]
