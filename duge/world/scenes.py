"""Procedural scenes of the built-in world, with exact ground-truth labels and captions.

A scene is one object of one colour in one style (texture) on a grey background of varying
lightness and gradient. Rendering is deterministic per seed and anti-aliased by 4x supersampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .vocabulary import COLOURS, COLOUR_RGB, GENERIC_WORD, OBJECTS, STYLES, concept_by_name

IMAGE_SIZE = 32
SUPERSAMPLE = 4

# Caption templates over three slots. An empty slot (a colour left unnamed) collapses.
CAPTION_TEMPLATES = (
    "a {style} {colour} {object}",
    "{style} {colour} {object}",
    "a picture of a {style} {colour} {object}",
    "an image of a {colour} {style} {object}",
    "a {colour} {object} that is {style}",
    "the {object} is {colour} and {style}",
)

# How often captions leave a kind unnamed (generic word instead) during training.
GENERIC_RATE = 0.15


@dataclass(frozen=True)
class Scene:
    object: str  # canonical names
    colour: str
    style: str
    caption: str
    image: np.ndarray  # [32, 32, 3] uint8


def format_caption(template: str, object_word: str, colour_word: str, style_word: str) -> str:
    """Fill a caption template; empty slots and the connectives they leave are dropped."""
    if not colour_word:
        template = template.replace(" {colour} and", "").replace("is {colour} and {style}", "is {style}")
    text = template.format(object=object_word, colour=colour_word, style=style_word)
    return " ".join(text.split())


# ---------------------------------------------------------------- shape masks
# Each mask function takes coordinates u, v in units of the object's radius (centre 0, v down)
# and returns a boolean mask.


def _polygon(u, v, vertices):
    """Inside test for a convex or star-shaped polygon given as [(x, y), ...] (even-odd rule)."""
    inside = np.zeros(u.shape, dtype=bool)
    n = len(vertices)
    for i in range(n):
        x1, y1 = vertices[i]
        x2, y2 = vertices[(i + 1) % n]
        crosses = (y1 > v) != (y2 > v)
        x_at = (x2 - x1) * (v - y1) / (y2 - y1 + 1e-12) + x1
        inside ^= crosses & (u < x_at)
    return inside


def _regular_points(n, radius, phase):
    return [(radius * np.cos(phase + 2 * np.pi * i / n), radius * np.sin(phase + 2 * np.pi * i / n)) for i in range(n)]


def _star_points():
    outer = _regular_points(5, 1.05, -np.pi / 2)
    inner = _regular_points(5, 0.45, -np.pi / 2 + np.pi / 5)
    return [p for pair in zip(outer, inner) for p in pair]


_STAR = _star_points()
_TRIANGLE = [(0.0, -1.0), (1.0, 0.8), (-1.0, 0.8)]


def _heart(u, v):
    x, y = u * 1.15, -(v * 1.15 - 0.15)
    return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0


SHAPE_MASKS = {
    "circle": lambda u, v: u * u + v * v <= 1.0,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.85,
    "triangle": lambda u, v: _polygon(u, v, _TRIANGLE),
    "star": lambda u, v: _polygon(u, v, _STAR),
    "heart": _heart,
    "cross": lambda u, v: (np.maximum(np.abs(u), np.abs(v)) <= 0.95)
    & ((np.abs(u) <= 0.32) | (np.abs(v) <= 0.32)),
    "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 1.1,
    "crescent": lambda u, v: (u * u + v * v <= 1.0) & ((u - 0.5) ** 2 + (v + 0.15) ** 2 > 0.62),
}

# ---------------------------------------------------------------- textures
# Each returns a boolean "ink" mask on pixel coordinates x, y (in output pixels); ink is drawn
# in a dark shade of the object's colour. Periods are >= 6 px so they survive the 2x VAE.


def _stripes(x, y, phase):
    return ((x + y + phase) % 6.0) < 3.0


def _dots(x, y, phase):
    dx = (x + phase) % 6.0 - 3.0
    dy = (y + phase) % 6.0 - 3.0
    return dx * dx + dy * dy <= 1.7**2


def _checker(x, y, phase):
    return ((np.floor((x + phase) / 4.0) + np.floor((y + phase) / 4.0)) % 2) == 0


TEXTURES = {"striped": _stripes, "dotted": _dots, "checkered": _checker}
OUTLINE_WIDTH = 2.5  # output pixels


def _erode(mask: np.ndarray, radius_px: float) -> np.ndarray:
    """Binary erosion of a supersampled mask by a disc (radius in supersampled pixels)."""
    r = int(np.ceil(radius_px))
    out = mask.copy()
    padded = np.pad(mask, r, constant_values=False)
    h, w = mask.shape
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dx * dx + dy * dy <= radius_px * radius_px:
                out &= padded[r + dy : r + dy + h, r + dx : r + dx + w]
    return out


def render_scene(object_name: str, colour_name: str, style_name: str, rng: np.random.Generator) -> np.ndarray:
    """Render one scene; returns [IMAGE_SIZE, IMAGE_SIZE, 3] uint8. Layout and background come from `rng`."""
    n = IMAGE_SIZE * SUPERSAMPLE
    # Output-pixel coordinates of each supersample's centre.
    coords = (np.arange(n) + 0.5) / SUPERSAMPLE
    x, y = np.meshgrid(coords, coords)

    # Background: grey of random lightness with a soft linear gradient and a faint tint.
    level = rng.uniform(0.2, 0.8)
    angle = rng.uniform(0, 2 * np.pi)
    slope = rng.uniform(0.0, 0.2)
    ramp = ((x - IMAGE_SIZE / 2) * np.cos(angle) + (y - IMAGE_SIZE / 2) * np.sin(angle)) / IMAGE_SIZE
    grey = np.clip(level + slope * ramp, 0.05, 0.95)
    tint = rng.uniform(-0.03, 0.03, size=3)
    image = np.clip(grey[..., None] + tint, 0, 1)

    # Object: radius 10-13 px, centre within +-3 px of the middle, slight rotation.
    radius = rng.uniform(10.0, 13.0)
    cx = IMAGE_SIZE / 2 + rng.uniform(-3, 3)
    cy = IMAGE_SIZE / 2 + rng.uniform(-3, 3)
    theta = rng.uniform(-0.12, 0.12)
    du, dv = (x - cx) / radius, (y - cy) / radius
    u = du * np.cos(theta) + dv * np.sin(theta)
    v = -du * np.sin(theta) + dv * np.cos(theta)
    mask = SHAPE_MASKS[object_name](u, v)

    rgb = np.array(COLOUR_RGB[colour_name]) * rng.uniform(0.9, 1.0)
    ink_rgb = rgb * 0.3
    if style_name == "outlined":
        mask = mask & ~_erode(mask, OUTLINE_WIDTH * SUPERSAMPLE)
    image = np.where(mask[..., None], rgb, image)
    if style_name in TEXTURES:
        ink = TEXTURES[style_name](x, y, rng.uniform(0, 6)) & mask
        image = np.where(ink[..., None], ink_rgb, image)

    image = image.reshape(IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def random_caption(object_name: str, colour_name: str, style_name: str, rng: np.random.Generator,
                   generic_rate: float = GENERIC_RATE) -> str:
    """A caption for the labels: random template, random names, each kind left unnamed at `generic_rate`.

    An unnamed object is called "shape"; an unnamed colour or style is not mentioned.
    """
    words = []
    for concept in (concept_by_name(object_name), concept_by_name(colour_name), concept_by_name(style_name)):
        if rng.random() < generic_rate:
            words.append(GENERIC_WORD[concept.kind] if concept.kind == "object" else "")
        else:
            words.append(concept.names[rng.integers(len(concept.names))])
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    return format_caption(template, *words)


def sample_scene(rng: np.random.Generator, generic_rate: float = GENERIC_RATE) -> Scene:
    """Draw labels and a caption at random and render the scene."""
    obj = OBJECTS[rng.integers(len(OBJECTS))].name
    col = COLOURS[rng.integers(len(COLOURS))].name
    sty = STYLES[rng.integers(len(STYLES))].name
    caption = random_caption(obj, col, sty, rng, generic_rate)
    return Scene(obj, col, sty, caption, render_scene(obj, col, sty, rng))


def render_dataset(n: int, seed: int):
    """`n` scenes, deterministic in `seed`: (images [n, 32, 32, 3] uint8, list of Scene without image)."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    scenes = []
    for i in range(n):
        scene = sample_scene(rng)
        images[i] = scene.image
        scenes.append(Scene(scene.object, scene.colour, scene.style, scene.caption, np.empty(0)))
    return images, scenes
