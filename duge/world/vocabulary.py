"""The concepts of the built-in world: every object, colour and style, with all its names.

Each concept has a canonical name (its first name) and at least one synonym; captions use all
of them, so that erasing a concept can be checked under another name. Each kind also has a
generic word that captions use part of the time (design doc §3), which is the default anchor
for erasing a concept of that kind.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("object", "colour", "style")


@dataclass(frozen=True)
class Concept:
    kind: str  # "object" | "colour" | "style"
    names: tuple[str, ...]  # canonical name first

    @property
    def name(self) -> str:
        return self.names[0]


OBJECTS = (
    Concept("object", ("circle", "disc")),
    Concept("object", ("square", "block")),
    Concept("object", ("triangle", "trigon")),
    Concept("object", ("star", "pentagram")),
    Concept("object", ("heart", "valentine")),
    Concept("object", ("cross", "plus")),
    Concept("object", ("diamond", "rhombus")),
    Concept("object", ("crescent", "moon")),
)

# RGB in [0, 1]; saturated hues that stand apart from the grey backgrounds.
COLOURS = (
    Concept("colour", ("red", "crimson")),
    Concept("colour", ("orange", "amber")),
    Concept("colour", ("yellow", "golden")),
    Concept("colour", ("green", "emerald")),
    Concept("colour", ("cyan", "turquoise")),
    Concept("colour", ("blue", "azure")),
    Concept("colour", ("purple", "violet")),
    Concept("colour", ("pink", "rose")),
)
COLOUR_RGB = {
    "red": (0.90, 0.10, 0.10),
    "orange": (1.00, 0.55, 0.05),
    "yellow": (0.95, 0.90, 0.10),
    "green": (0.10, 0.70, 0.15),
    "cyan": (0.10, 0.85, 0.90),
    "blue": (0.10, 0.25, 0.95),
    "purple": (0.55, 0.15, 0.80),
    "pink": (1.00, 0.45, 0.75),
}

STYLES = (
    Concept("style", ("plain", "solid")),
    Concept("style", ("striped", "banded")),
    Concept("style", ("dotted", "spotted")),
    Concept("style", ("checkered", "tiled")),
    Concept("style", ("outlined", "hollow")),
)

CONCEPTS: tuple[Concept, ...] = OBJECTS + COLOURS + STYLES
CONCEPTS_BY_KIND = {"object": OBJECTS, "colour": COLOURS, "style": STYLES}

# The word captions use for a kind left unnamed, i.e. the kind's default anchor.
# An object left unnamed is "shape"; a colour left unnamed is simply not mentioned;
# no texture is "plain".
GENERIC_WORD = {"object": "shape", "colour": "", "style": "plain"}

# Words captions use besides concept names.
FILLER_WORDS = ("a", "the", "picture", "of", "image", "is", "and", "with", "that", "in", "style", "shape")


def concept_by_name(word: str) -> Concept:
    """The concept one of whose names is `word` (case-insensitive); KeyError if none."""
    key = word.strip().lower()
    for concept in CONCEPTS:
        if key in concept.names:
            return concept
    raise KeyError(
        f"'{word}' is not a concept of the built-in world; known: "
        + ", ".join(c.name for c in CONCEPTS)
    )


def class_index(concept: Concept) -> int:
    """Index of `concept` among the concepts of its kind (the evaluator's class id)."""
    return CONCEPTS_BY_KIND[concept.kind].index(concept)
