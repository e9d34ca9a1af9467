"""The Scene benchmark: six clients, one scene type each (shop, workplace, home, transport, sport, outdoors).

A scene type is what a client *sees*; what it is *asked* is the same everywhere. Each scene type has
- its own backdrop, textured in colours close to the object colours it holds (camouflage: shelves of coloured
  goods, tiles with screen glow, floral wallpaper, a yellow road marking, a pitch with team-coloured boards;
  outdoors' plain sky and grass are strewn with leaves in object colours instead);
- its own clutter: small marks in the scene's style and in object-like colours (goods, cables, petals,
  road studs, confetti, leaves), some drawn behind the objects and some over them (occluders). Clutter is
  never an object: it is at most 2 px thick, and objects are filled shapes of 7 or 11 px;
- its own viewing conditions: how much objects stand out of the backdrop (contrast), blur, sensor noise and
  how far objects sit off the centre of their cell;
- its own object vocabulary and co-occurrence statistics: 3 shapes x 4 colours of the world's 5 x 6, falling
  into three groups of objects that tend to appear together (a scene draws most objects from one group), and
  now and then a stray object from the whole world, so that a vocabulary prior learnt in one scene misleads.
The question templates are the Domain benchmark's (colour, shape, existence, quadrant, size: `ask` of
`feddat.data.questions`), equally likely and the same for every client. The scene types are harder than the
pretraining's five styles in different ways, so a frozen backbone with a new head falls well behind a model
whose encoder adapts to its scene (docs/benchmarks.md, "Scene").
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from feddat.data.pool import Records
from feddat.data.questions import ask
from feddat.data.records import generate_records
from feddat.data.world import CELL, COLORS, GRID, IMAGE_SIZE, RGB, SHAPES, SIZES, Obj, Scene, _draw

QTYPES = ("color", "shape", "exist", "where", "size")
GROUPS = 3
# Bumped whenever the generator's output changes for the same spec: it is part of every spec, so of the cache
# key (feddat.data.benchmarks._cache_key), and a cached Scene from an older generator is never read back.
GENERATOR = 2


def _shade(rgb, f: float) -> tuple[int, int, int]:
    """`rgb` scaled by `f`, clipped to 0-255."""
    return tuple(min(255, max(0, int(c * f))) for c in rgb)


def _background(kind: str) -> Image.Image:
    """The scene type's backdrop (48 x 48), drawn without randomness; clutter and noise are added per image.

    Every backdrop carries patches of the colours its scene's objects have (camouflage). A fresh copy each call.
    """
    return _backdrop(kind).copy()


@lru_cache(maxsize=None)
def _backdrop(kind: str) -> Image.Image:
    size = IMAGE_SIZE
    img = Image.new("RGB", (size, size))
    d = ImageDraw.Draw(img)
    if kind == "shop":  # shelves of coloured goods: beige, a dark plank under every row, packs along the planks
        d.rectangle((0, 0, size, size), fill=(226, 212, 182))
        goods = [RGB["yellow"], RGB["red"], RGB["purple"], RGB["green"]]
        for y in range(11, size, 12):
            d.line((0, y, size, y), fill=(120, 85, 50))
            for i, x in enumerate(range(1, size, 4)):
                d.rectangle((x, y - 2, x + 1, y - 1), fill=_shade(goods[(i + y) % 4], 0.85))
    elif kind == "workplace":  # grey floor tiles, blue-cyan screens' glow in the tile corners
        d.rectangle((0, 0, size, size), fill=(186, 190, 196))
        for v in range(0, size, 12):
            d.line((v, 0, v, size), fill=(150, 154, 160))
            d.line((0, v, size, v), fill=(150, 154, 160))
        for x in range(0, size, 12):
            for y in range(0, size, 12):
                d.rectangle((x + 1, y + 1, x + 2, y + 2), fill=RGB["cyan"] if (x + y) % 24 else RGB["blue"])
    elif kind == "home":  # striped wallpaper with a small floral print
        for x in range(0, size, 3):
            d.rectangle((x, 0, x + 2, size), fill=(240, 205, 205) if (x // 3) % 2 else (248, 230, 218))
        for x in range(0, size, 6):
            for y in range(3 * ((x // 6) % 2), size, 6):
                d.point((x, y), fill=RGB["purple"] if (x + y) % 4 else RGB["red"])
    elif kind == "transport":  # asphalt with a dashed yellow centre line and white edge lines
        d.rectangle((0, 0, size, size), fill=(72, 72, 78))
        for x in range(0, size, 8):
            d.line((x, 23, x + 3, 23), fill=_shade(RGB["yellow"], 0.95))
        d.line((0, 0, size, 0), fill=(235, 235, 235))
        d.line((0, size - 1, size, size - 1), fill=(235, 235, 235))
    elif kind == "sport":  # pale pitch with white lines and team-coloured advertising boards at the edges
        d.rectangle((0, 0, size, size), fill=(150, 190, 140))
        d.line((23, 0, 23, size), fill=(245, 245, 245))
        d.rectangle((1, 1, size - 2, size - 2), outline=(245, 245, 245))
        for i, x in enumerate(range(0, size, 6)):
            team = (RGB["red"], RGB["blue"], RGB["yellow"], RGB["purple"])[i % 4]
            d.line((x, 0, x + 4, 0), fill=team)
            d.line((x, size - 1, x + 4, size - 1), fill=team)
    elif kind == "outdoors":  # sky over grass
        d.rectangle((0, 0, size, size // 2), fill=(160, 205, 238))
        d.rectangle((0, size // 2, size, size), fill=(120, 165, 100))
    else:
        raise ValueError(f"unknown scene type {kind!r}")
    return img


# Clutter: what a scene type strews about, and the colours it comes in (the names of object colours: clutter is
# deliberately the colour of objects, only never object-shaped).
CLUTTER_KINDS = ("pack", "cable", "petal", "stud", "confetti", "leaf")


def _clutter(d: ImageDraw.ImageDraw, kind: str, rgb, u: np.ndarray) -> None:
    """One mark of clutter, placed and shaped by `u` (four uniform draws in [0, 1)): at most 2 px thick, so
    never an object of the world."""
    x, y = u[0] * IMAGE_SIZE, u[1] * IMAGE_SIZE
    angle = u[2] * np.pi
    if kind == "pack":          # a 2 x 3 pack, upright or lying
        w, h = (1, 2) if u[2] < 0.5 else (2, 1)
        d.rectangle((x, y, x + w, y + h), fill=rgb)
    elif kind == "cable":       # a thin line of 6-14 px in any direction
        n = 6 + 8 * u[3]
        d.line((x, y, x + n * np.cos(angle), y + n * np.sin(angle)), fill=rgb, width=1)
    elif kind == "petal":       # a 2 x 2 dot
        d.rectangle((x, y, x + 1, y + 1), fill=rgb)
    elif kind == "stud":        # a short horizontal dash, 4-6 px
        d.line((x, y, x + 3 + 2 * u[3], y), fill=rgb, width=1)
    elif kind == "confetti":    # a single pixel or a diagonal pair
        d.line((x, y, x + 1, y + 1), fill=rgb, width=1)
    elif kind == "leaf":        # a short stroke of 3-5 px, 2 px thick
        n = 3 + 2 * u[3]
        d.line((x, y, x + n * np.cos(angle), y + n * np.sin(angle)), fill=rgb, width=2)
    else:
        raise ValueError(f"unknown clutter kind {kind!r}; choose one of {', '.join(CLUTTER_KINDS)}")


@dataclass(frozen=True)
class SceneClientSpec:
    """One client of the Scene benchmark: its scene type (backdrop, clutter, viewing conditions), object
    vocabulary and grouping."""

    name: str
    shapes: tuple[str, ...]
    colors: tuple[str, ...]
    clutter: str = "petal"                      # which kind of mark the scene strews (CLUTTER_KINDS)
    clutter_colors: tuple[str, ...] = ()        # the object colours clutter comes in (default: the vocabulary's)
    clutter_n: tuple[int, int] = (8, 14)        # marks behind the objects per image (inclusive range)
    occluders: tuple[int, int] = (1, 3)         # marks drawn over the objects per image (inclusive range)
    contrast: float = 0.8    # an object's colour is this mix of its own and the backdrop's under it
    blur: float = 0.0        # Gaussian blur radius of the whole image (px)
    noise: float = 6.0       # std of the per-pixel noise
    jitter: float = 1.5      # objects sit up to this far (px) off their cell's centre, both ways
    group_p: float = 0.8     # chance that an object comes from the scene's group rather than the whole vocabulary
    stray_p: float = 0.08    # chance that an object comes from the whole world instead (not the vocabulary)
    n_min: int = 3
    n_max: int = 7
    generator: int = GENERATOR

    def vocabulary(self) -> list[tuple[str, str]]:
        """The (colour, shape) objects this scene type usually holds."""
        return [(c, s) for s in self.shapes for c in self.colors]

    def group_of(self, color: str, shape: str) -> int:
        """Objects co-occur by group: a Latin-square split of the vocabulary, so every group has every shape."""
        return (self.colors.index(color) + self.shapes.index(shape)) % GROUPS

    def sample(self, rng: np.random.Generator) -> Scene:
        vocab = self.vocabulary()
        world = [(c, s) for s in SHAPES for c in COLORS]
        group = int(rng.integers(GROUPS))
        members = [v for v in vocab if self.group_of(*v) == group]
        n = int(rng.integers(self.n_min, self.n_max + 1))
        cells = rng.choice(GRID * GRID, size=n, replace=False)
        chosen: list[tuple[str, str]] = []
        for _ in range(n):
            u = rng.random()
            source = world if u < self.stray_p else members if u < self.stray_p + self.group_p else vocab
            pool = [v for v in source if v not in chosen] or [v for v in vocab if v not in chosen]
            chosen.append(pool[rng.integers(len(pool))])
        return Scene(tuple(Obj(c, s, SIZES[int(rng.integers(2))], int(cell) // GRID, int(cell) % GRID)
                           for (c, s), cell in zip(chosen, cells)))

    def render(self, scene: Scene, rng: np.random.Generator) -> np.ndarray:
        """The scene drawn in this scene type's look; (48, 48, 3) uint8."""
        img = _background(self.name)
        draw = ImageDraw.Draw(img)
        palette = [RGB[c] for c in (self.clutter_colors or self.colors)]
        n_under = int(rng.integers(self.clutter_n[0], self.clutter_n[1] + 1))
        n_over = int(rng.integers(self.occluders[0], self.occluders[1] + 1))
        marks = rng.random((n_under + n_over, 6))  # colour, shade, then the four draws of `_clutter`

        def mark(u):
            rgb = _shade(palette[int(u[0] * len(palette))], 0.8 + 0.3 * u[1])
            _clutter(draw, self.clutter, rgb, u[2:])

        for u in marks[:n_under]:
            mark(u)
        # the mean colour of every cell before the objects: an object is mixed with what is under it
        under = np.asarray(img, dtype=np.float64).reshape(GRID, CELL, GRID, CELL, 3).mean(axis=(1, 3))
        for obj in scene.objects:
            mixed = self.contrast * np.asarray(RGB[obj.color]) + (1 - self.contrast) * under[obj.row, obj.col]
            rgb = tuple(int(v) for v in np.rint(mixed))
            dx, dy = rng.uniform(-self.jitter, self.jitter, size=2)
            _draw(draw, obj, rgb, outline_only=False, dx=float(dx), dy=float(dy))
        for u in marks[n_under:]:  # occluders: over the objects
            mark(u)
        if self.blur > 0:
            img = img.filter(ImageFilter.GaussianBlur(radius=self.blur))
        noise = rng.standard_normal((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32) * np.float32(self.noise)
        return np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)

    def records(self, seed: int, index: int, sizes) -> dict[str, Records]:
        """Train/val/test records, deterministic in (seed, index, sizes); question types equally likely."""
        rng = np.random.default_rng([seed, index, 2])

        def asker(scene, r):
            qtype = QTYPES[r.integers(len(QTYPES))]
            qa = ask(scene, qtype, r)
            return None if qa is None else (qa[0], qa[1], qtype)

        return {split: generate_records(rng, getattr(sizes, split), self.sample, asker, self.render)
                for split in ("train", "val", "test")}


def render_scene(scene: Scene, kind: str, rng: np.random.Generator) -> np.ndarray:
    """The scene drawn in the look of scene type `kind` (a client name of `scene_clients`); (48, 48, 3) uint8."""
    for spec in scene_clients():
        if spec.name == kind:
            return spec.render(scene, rng)
    _background(kind)  # raises for an unknown scene type
    raise ValueError(f"unknown scene type {kind!r}")


def scene_clients() -> list[SceneClientSpec]:
    """Six scene types; each holds 3 shapes x 4 colours, overlapping with some others', and each hides them in its
    own way: clutter in the vocabulary's colours, low contrast, blur or noise."""
    return [
        SceneClientSpec("shop", ("square", "diamond", "circle"), ("yellow", "red", "purple", "green"),
                        clutter="pack", clutter_n=(10, 16), contrast=0.8),
        SceneClientSpec("workplace", ("square", "triangle", "cross"), ("blue", "cyan", "yellow", "red"),
                        clutter="cable", clutter_n=(4, 7), occluders=(1, 2), contrast=0.7, blur=0.5),
        SceneClientSpec("home", ("circle", "square", "triangle"), ("red", "purple", "blue", "green"),
                        clutter="petal", clutter_n=(10, 16), contrast=0.6, noise=5.0),
        SceneClientSpec("transport", ("circle", "triangle", "diamond"), ("red", "yellow", "blue", "cyan"),
                        clutter="stud", clutter_n=(6, 10), contrast=0.65, noise=10.0),
        SceneClientSpec("sport", ("circle", "cross", "square"), ("red", "blue", "yellow", "purple"),
                        clutter="confetti", clutter_n=(16, 24), contrast=0.8, blur=0.4),
        SceneClientSpec("outdoors", ("triangle", "circle", "diamond"), ("red", "yellow", "purple", "blue"),
                        clutter="leaf", clutter_colors=("green", "yellow", "red"), clutter_n=(6, 10),
                        contrast=0.7, blur=0.5),
    ]
