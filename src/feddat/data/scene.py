"""The Scene benchmark: six clients, one scene type each (shop, workplace, home, transport, sport, outdoors).

A scene type has its own background drawn behind the objects, its own vocabulary of objects (three shapes
times four colours out of the world's 5 x 6) and its own co-occurrence statistics: the vocabulary falls into
three groups of objects that tend to appear together, and a scene draws most of its objects from one group.
The question templates are the Domain benchmark's (colour, shape, existence, quadrant, size), the same for
every client, so clients differ in what they see and what is usually there, not in what they are asked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from feddat.data.pool import Records
from feddat.data.questions import ask
from feddat.data.records import generate_records
from feddat.data.world import GRID, IMAGE_SIZE, RGB, SIZES, Obj, Scene, _draw

QTYPES = ("color", "shape", "exist", "where", "size")
GROUPS = 3


def _background(kind: str) -> Image.Image:
    """The scene type's backdrop (48 x 48), drawn without randomness; texture noise is added per image."""
    size = IMAGE_SIZE
    img = Image.new("RGB", (size, size))
    d = ImageDraw.Draw(img)
    if kind == "shop":  # shelves: beige with a dark plank under every row of cells
        d.rectangle((0, 0, size, size), fill=(226, 212, 182))
        for y in range(11, size, 12):
            d.line((0, y, size, y), fill=(120, 85, 50))
    elif kind == "workplace":  # grey floor tiles
        d.rectangle((0, 0, size, size), fill=(186, 190, 196))
        for v in range(0, size, 12):
            d.line((v, 0, v, size), fill=(150, 154, 160))
            d.line((0, v, size, v), fill=(150, 154, 160))
    elif kind == "home":  # striped wallpaper
        for x in range(0, size, 3):
            d.rectangle((x, 0, x + 2, size), fill=(240, 205, 205) if (x // 3) % 2 else (248, 230, 218))
    elif kind == "transport":  # asphalt with a dashed centre line
        d.rectangle((0, 0, size, size), fill=(72, 72, 78))
        for x in range(0, size, 8):
            d.line((x, 23, x + 3, 23), fill=(235, 235, 235))
    elif kind == "sport":  # pale pitch with white lines
        d.rectangle((0, 0, size, size), fill=(150, 190, 140))
        d.line((23, 0, 23, size), fill=(245, 245, 245))
        d.rectangle((1, 1, size - 2, size - 2), outline=(245, 245, 245))
    elif kind == "outdoors":  # sky over grass
        d.rectangle((0, 0, size, size // 2), fill=(160, 205, 238))
        d.rectangle((0, size // 2, size, size), fill=(120, 165, 100))
    else:
        raise ValueError(f"unknown scene type {kind!r}")
    return img


def render_scene(scene: Scene, kind: str, rng: np.random.Generator) -> np.ndarray:
    """The scene drawn over its type's background, with mild texture noise; (48, 48, 3) uint8."""
    img = _background(kind)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        _draw(draw, obj, RGB[obj.color], outline_only=False)
    arr = np.asarray(img, dtype=np.int16) + rng.normal(0, 5, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class SceneClientSpec:
    """One client of the Scene benchmark: its scene type (the background), object vocabulary and grouping."""

    name: str
    shapes: tuple[str, ...]
    colors: tuple[str, ...]
    group_p: float = 0.8   # chance that an object comes from the scene's group rather than the whole vocabulary
    n_min: int = 2
    n_max: int = 6

    def vocabulary(self) -> list[tuple[str, str]]:
        """The (colour, shape) objects this scene type holds."""
        return [(c, s) for s in self.shapes for c in self.colors]

    def group_of(self, color: str, shape: str) -> int:
        """Objects co-occur by group: a Latin-square split of the vocabulary, so every group has every shape."""
        return (self.colors.index(color) + self.shapes.index(shape)) % GROUPS

    def sample(self, rng: np.random.Generator) -> Scene:
        vocab = self.vocabulary()
        group = int(rng.integers(GROUPS))
        members = [v for v in vocab if self.group_of(*v) == group]
        n = int(rng.integers(self.n_min, self.n_max + 1))
        cells = rng.choice(GRID * GRID, size=n, replace=False)
        chosen: list[tuple[str, str]] = []
        for _ in range(n):
            pool = [v for v in (members if rng.random() < self.group_p else vocab) if v not in chosen]
            pool = pool or [v for v in vocab if v not in chosen]
            chosen.append(pool[rng.integers(len(pool))])
        return Scene(tuple(Obj(c, s, SIZES[int(rng.integers(2))], int(cell) // GRID, int(cell) % GRID)
                           for (c, s), cell in zip(chosen, cells)))

    def records(self, seed: int, index: int, sizes) -> dict[str, Records]:
        """Train/val/test records, deterministic in (seed, index, sizes); question types equally likely."""
        rng = np.random.default_rng([seed, index, 2])

        def asker(scene, r):
            qtype = QTYPES[r.integers(len(QTYPES))]
            qa = ask(scene, qtype, r)
            return None if qa is None else (qa[0], qa[1], qtype)

        return {split: generate_records(rng, getattr(sizes, split), self.sample, asker,
                                        lambda scene, r: render_scene(scene, self.name, r))
                for split in ("train", "val", "test")}


def scene_clients() -> list[SceneClientSpec]:
    """Six scene types; each holds 3 shapes x 4 colours, chosen to overlap with some others and to stand out
    against its own background."""
    return [
        SceneClientSpec("shop", ("square", "diamond", "circle"), ("yellow", "red", "purple", "green")),
        SceneClientSpec("workplace", ("square", "triangle", "cross"), ("blue", "cyan", "yellow", "red")),
        SceneClientSpec("home", ("circle", "square", "triangle"), ("red", "purple", "blue", "green")),
        SceneClientSpec("transport", ("circle", "triangle", "diamond"), ("red", "yellow", "blue", "cyan")),
        SceneClientSpec("sport", ("circle", "cross", "square"), ("red", "blue", "yellow", "purple")),
        SceneClientSpec("outdoors", ("triangle", "circle", "diamond"), ("red", "yellow", "purple", "blue")),
    ]
