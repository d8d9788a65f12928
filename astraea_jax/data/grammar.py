"""The closed caption grammar of the procedural clips, and its vocabulary.

A caption names one or two objects and the background:

  caption    := object ("and" object)? "on a" background
  object     := ("a" | "an") COLOUR SHAPE MOTION
  MOTION     := "moving left" | "moving right" | "moving up" | "moving down"
              | "bouncing" | "growing" | "shrinking" | "rotating"
  background := BG_COLOUR BG_KIND? "background"

e.g. "a red circle moving right and a blue square bouncing on a gray checkered background".
`VOCABULARY` is every word the grammar can produce; `astraea_jax.models.word_tokenizer` builds its
token table from it.
"""

from __future__ import annotations

__all__ = [
    "BACKGROUND_COLOURS",
    "BACKGROUND_KINDS",
    "COLOURS",
    "MOTIONS",
    "MOTION_PHRASES",
    "SHAPES",
    "VOCABULARY",
    "background_phrase",
    "object_phrase",
]

# Object colours (RGB in [0, 1]); all far from every background colour, so that a colour detector
# can find the objects.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.55, 0.15, 0.75),
    "orange": (1.00, 0.55, 0.05),
    "cyan": (0.10, 0.85, 0.90),
    "pink": (1.00, 0.45, 0.70),
}

# Backgrounds are desaturated, so objects stand out.
BACKGROUND_COLOURS: dict[str, tuple[float, float, float]] = {
    "gray": (0.50, 0.50, 0.50),
    "black": (0.08, 0.08, 0.08),
    "white": (0.92, 0.92, 0.92),
    "beige": (0.80, 0.74, 0.60),
}

# Kind -> the word the caption uses for it ("" for a plain background).
BACKGROUND_KINDS: dict[str, str] = {
    "plain": "",
    "gradient": "gradient",
    "checkered": "checkered",
    "striped": "striped",
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star")

MOTION_PHRASES: dict[str, str] = {
    "left": "moving left",
    "right": "moving right",
    "up": "moving up",
    "down": "moving down",
    "bouncing": "bouncing",
    "growing": "growing",
    "shrinking": "shrinking",
    "rotating": "rotating",
}
MOTIONS: tuple[str, ...] = tuple(MOTION_PHRASES)


def object_phrase(colour: str, shape: str, motion: str) -> str:
  """"a red circle moving right", "an orange star rotating"."""
  article = "an" if colour[0] in "aeiou" else "a"
  return f"{article} {colour} {shape} {MOTION_PHRASES[motion]}"


def background_phrase(colour: str, kind: str) -> str:
  """"a gray background", "a gray checkered background"."""
  word = BACKGROUND_KINDS[kind]
  return f"a {colour} {word} background" if word else f"a {colour} background"


def _vocabulary() -> tuple[str, ...]:
  words = {"a", "an", "and", "on", "background"}
  words.update(COLOURS)
  words.update(BACKGROUND_COLOURS)
  words.update(w for w in BACKGROUND_KINDS.values() if w)
  words.update(SHAPES)
  for phrase in MOTION_PHRASES.values():
    words.update(phrase.split())
  return tuple(sorted(words))


VOCABULARY: tuple[str, ...] = _vocabulary()
