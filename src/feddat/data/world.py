"""The generated visual world: scenes of simple objects on a 4x4 grid, drawn with PIL in several styles.

Objects sit in grid cells that coincide with the backbone's image patches (48 px image, 12 px cells),
so a small transformer can bind words to patches after minutes of CPU pretraining rather than hours.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

IMAGE_SIZE = 48
GRID = 4
CELL = IMAGE_SIZE // GRID

COLORS = ("red", "green", "blue", "yellow", "purple", "cyan")
RGB = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 225),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "cyan": (40, 205, 215),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = ("small", "big")
STYLES = ("clipart", "textured", "night", "sketch", "blurry")


@dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    size: str
    row: int
    col: int


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]


def sample_scene(
    rng: np.random.Generator,
    n_min: int = 2,
    n_max: int = 7,
    color_p: np.ndarray | None = None,
    shape_p: np.ndarray | None = None,
) -> Scene:
    """A scene with distinct (colour, shape) pairs in distinct cells; priors let clients differ."""
    n = int(rng.integers(n_min, n_max + 1))
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    used: set[tuple[str, str]] = set()
    objects = []
    for cell in cells:
        while True:
            color = COLORS[rng.choice(len(COLORS), p=color_p)]
            shape = SHAPES[rng.choice(len(SHAPES), p=shape_p)]
            if (color, shape) not in used:
                break
        used.add((color, shape))
        size = SIZES[int(rng.integers(2))]
        objects.append(Obj(color, shape, size, int(cell) // GRID, int(cell) % GRID))
    return Scene(tuple(objects))


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "cross":
        w = r / 2.5
        return [
            (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
            (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
            (cx - r, cy - w), (cx - w, cy - w),
        ]
    raise ValueError(shape)


def _draw(draw: ImageDraw.ImageDraw, obj: Obj, rgb, outline_only: bool, dx: float = 0.0, dy: float = 0.0):
    r = 5.0 if obj.size == "big" else 3.0
    cx = obj.col * CELL + CELL / 2 - 0.5 + dx
    cy = obj.row * CELL + CELL / 2 - 0.5 + dy
    fill = None if outline_only else rgb
    width = 2 if outline_only else 1
    box = (cx - r, cy - r, cx + r, cy + r)
    if obj.shape == "circle":
        draw.ellipse(box, fill=fill, outline=rgb, width=width)
    elif obj.shape == "square":
        draw.rectangle(box, fill=fill, outline=rgb, width=width)
    else:
        draw.polygon(_shape_points(obj.shape, cx, cy, r), fill=fill, outline=rgb, width=width)


def render(scene: Scene, style: str, rng: np.random.Generator, palette: dict[str, tuple] | None = None) -> np.ndarray:
    """Draw a scene as a (48, 48, 3) uint8 array; `palette` overrides the colour of a colour name."""
    palette = palette or RGB
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose one of {', '.join(STYLES)}")
    background = {"clipart": (250, 250, 250), "textured": (128, 128, 128), "night": (18, 18, 30),
                  "sketch": (236, 226, 200), "blurry": (200, 200, 200)}[style]
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        rgb = palette[obj.color]
        if style == "night":
            rgb = tuple(int(0.65 * c) for c in rgb)
        jitter = rng.uniform(-2, 2, size=2) if style == "blurry" else (0.0, 0.0)
        _draw(draw, obj, rgb, outline_only=style == "sketch", dx=jitter[0], dy=jitter[1])
    if style == "blurry":
        img = img.filter(ImageFilter.GaussianBlur(radius=0.8))
    arr = np.asarray(img, dtype=np.int16)
    if style == "textured":
        noise = rng.normal(0, 18, size=arr.shape)
        arr = arr + noise
    elif style == "night":
        arr = arr + rng.normal(0, 6, size=arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


def patch_labels(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell colour and shape index (0 = empty cell), used as an auxiliary pretraining target."""
    colors = np.zeros(GRID * GRID, dtype=np.int64)
    shapes = np.zeros(GRID * GRID, dtype=np.int64)
    for obj in scene.objects:
        cell = obj.row * GRID + obj.col
        colors[cell] = COLORS.index(obj.color) + 1
        shapes[cell] = SHAPES.index(obj.shape) + 1
    return colors, shapes
