"""Procedural video clips with captions: the training data of the project's small default model.

Each clip shows one or two coloured shapes (circle, square, triangle, diamond, star) that move left,
right, up or down, bounce, grow, shrink or rotate over a static background (plain, gradient,
checkered or striped): a static scene with small moving parts, the kind of video in which the
token-wise reuse of ASTRAEA (arXiv 2506.05096) should save the most.

Sampling is split in two so that training can render on the accelerator:

  sample_description(rng, config)  -> ClipDescription   host, per clip: scene and trajectories
  clip_params([descriptions])      -> ClipParams        host: fixed-size numeric arrays
  render(params, config, xp=np)    -> [B, T, Y, X, 3]   vectorised; `xp` = numpy or jax.numpy

`make_clip(seed)` and `sample_batch(seed, batch)` wrap the three for numpy use. Everything is a pure
function of the seed. A caption is a pure function of its description (`caption`); the grammar lives
in `astraea_jax.data.grammar`.

Shapes are star polygons in polar form: 2n vertices alternating between radius 1 and `inner`, so a
regular n-gon is the case `inner = cos(pi / n)` and a circle is a fine regular polygon. Their size
is the radius of the circle of equal area, so every shape covers about the same number of pixels.
Edges are antialiased over one pixel.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from astraea_jax.data import grammar

__all__ = [
    "ClipConfig",
    "ClipDescription",
    "ClipParams",
    "Background",
    "ObjectTrack",
    "caption",
    "clip_params",
    "make_clip",
    "render",
    "sample_batch",
    "sample_description",
    "sample_descriptions",
]


@dataclasses.dataclass(frozen=True)
class ClipConfig:
  """Clip size and scene statistics.

  Attributes:
    frames, height, width: T, Y, X of every clip (17 x 64 x 64 by default).
    max_objects: 1 or 2 objects per clip.
    p_two_objects: probability of a second object when `max_objects` is 2.
  """
  frames: int = 17
  height: int = 64
  width: int = 64
  max_objects: int = 2
  p_two_objects: float = 0.5

  def __post_init__(self):
    if self.frames < 2:
      raise ValueError(f"frames={self.frames} must be >= 2 (motion needs two frames)")
    if min(self.height, self.width) < 32:
      raise ValueError(f"height={self.height}, width={self.width} must both be >= 32")
    if self.max_objects not in (1, 2):
      raise ValueError(f"max_objects={self.max_objects} must be 1 or 2")
    if not 0.0 <= self.p_two_objects <= 1.0:
      raise ValueError(f"p_two_objects={self.p_two_objects} must lie in [0, 1]")


# shape -> (points n, inner radius of the 2n-gon, orientation offset in radians)
_GEOMETRY: dict[str, tuple[int, float, float]] = {
    "circle": (32, math.cos(math.pi / 32), 0.0),
    "square": (4, math.cos(math.pi / 4), math.pi / 4),  # vertices on the diagonals: sides level
    "triangle": (3, 0.5, -math.pi / 2),  # y grows downwards, so -pi/2 points up
    "diamond": (4, math.cos(math.pi / 4), 0.0),
    "star": (5, 0.45, -math.pi / 2),
}


def _vertex_radius(shape: str) -> float:
  """Outer vertex radius of `shape` when its area is that of the unit circle."""
  n, inner, _ = _GEOMETRY[shape]
  return math.sqrt(math.pi / (n * inner * math.sin(math.pi / n)))


@dataclasses.dataclass(frozen=True, eq=False)
class ObjectTrack:
  """One object and its trajectory.

  Attributes:
    shape, colour, motion: names from `astraea_jax.data.grammar`.
    center: `[T, 2]` float32, (y, x) pixel coordinates of the centroid in every frame (pixel i
      covers [i, i + 1), so the image centre of a 64-pixel axis is 32.0).
    radius: `[T]` float32, radius in pixels of the circle with the object's area.
    angle: `[T]` float32, rotation in radians (clockwise on screen).
  """
  shape: str
  colour: str
  motion: str
  center: np.ndarray
  radius: np.ndarray
  angle: np.ndarray

  @property
  def rgb(self) -> tuple[float, float, float]:
    return grammar.COLOURS[self.colour]

  @property
  def start_centroid(self) -> tuple[float, float]:
    return float(self.center[0, 0]), float(self.center[0, 1])

  @property
  def end_centroid(self) -> tuple[float, float]:
    return float(self.center[-1, 0]), float(self.center[-1, 1])

  @property
  def extent(self) -> float:
    """Largest distance in pixels from the centre to the object's edge over the clip."""
    return float(np.max(self.radius)) * _vertex_radius(self.shape)

  def phrase(self) -> str:
    return grammar.object_phrase(self.colour, self.shape, self.motion)

  def to_dict(self) -> dict[str, Any]:
    return {
        "shape": self.shape, "colour": self.colour, "rgb": list(self.rgb), "motion": self.motion,
        "start_centroid": list(self.start_centroid), "end_centroid": list(self.end_centroid),
        "center": self.center.tolist(), "radius": self.radius.tolist(),
        "angle": self.angle.tolist(),
    }


@dataclasses.dataclass(frozen=True)
class Background:
  """A static background: `colour + contrast * pattern`, the pattern in [-1, 1].

  Attributes:
    colour: name from `grammar.BACKGROUND_COLOURS`.
    kind: "plain", "gradient", "checkered" or "striped".
    direction: radians; direction of the gradient or across the stripes.
    period: pixels; checker square size, or stripe period.
    phase: (y, x) pattern offsets in pixels.
    contrast: pattern amplitude (0 for plain).
  """
  colour: str
  kind: str
  direction: float = 0.0
  period: float = 8.0
  phase: tuple[float, float] = (0.0, 0.0)
  contrast: float = 0.0

  @property
  def rgb(self) -> tuple[float, float, float]:
    return grammar.BACKGROUND_COLOURS[self.colour]

  def phrase(self) -> str:
    return grammar.background_phrase(self.colour, self.kind)


@dataclasses.dataclass(frozen=True, eq=False)
class ClipDescription:
  """Everything needed to render a clip, and to check a generated one against its caption."""
  objects: tuple[ObjectTrack, ...]
  background: Background
  frames: int
  height: int
  width: int

  @property
  def caption(self) -> str:
    return caption(self)

  def to_dict(self) -> dict[str, Any]:
    return {
        "caption": self.caption,
        "frames": self.frames, "height": self.height, "width": self.width,
        "background": dataclasses.asdict(self.background) | {"rgb": list(self.background.rgb)},
        "objects": [o.to_dict() for o in self.objects],
    }


def caption(description: ClipDescription) -> str:
  """"a red circle moving right and a blue square bouncing on a gray background"."""
  objects = " and ".join(o.phrase() for o in description.objects)
  return f"{objects} on {description.background.phrase()}"


# ----------------------------------------------------------------------------------------------
# Sampling scenes (host, per clip)

_BG_CONTRAST = {"plain": 0.0, "gradient": 0.15, "checkered": 0.07, "striped": 0.07}


def _sample_background(rng: np.random.Generator) -> Background:
  colours = tuple(grammar.BACKGROUND_COLOURS)
  colour = colours[rng.integers(len(colours))]
  kinds = tuple(grammar.BACKGROUND_KINDS)
  kind = kinds[rng.integers(len(kinds))]
  direction = float(rng.uniform(0.0, 2.0 * math.pi))
  period = float(rng.uniform(6.0, 12.0))
  phase = (float(rng.uniform(0.0, 12.0)), float(rng.uniform(0.0, 12.0)))
  return Background(colour=colour, kind=kind, direction=direction, period=period, phase=phase,
                    contrast=_BG_CONTRAST[kind])


def _sample_object(rng: np.random.Generator, config: ClipConfig, exclude_colours: Sequence[str],
                   avoid: ObjectTrack | None = None, tries: int = 16) -> ObjectTrack | None:
  """Draws an object, then up to `tries` placements that keep it clear of `avoid` (None if none)."""
  t_count, h, w = config.frames, config.height, config.width
  size = min(h, w)
  motion = grammar.MOTIONS[rng.integers(len(grammar.MOTIONS))]
  # A rotating circle looks still: rotation is only drawn with a shape that shows it.
  shapes = grammar.SHAPES[1:] if motion == "rotating" else grammar.SHAPES
  shape = shapes[rng.integers(len(shapes))]
  colours = [c for c in grammar.COLOURS if c not in exclude_colours]
  colour = colours[rng.integers(len(colours))]

  tau = np.linspace(0.0, 1.0, t_count)  # [T] clip time in [0, 1]
  r0 = rng.uniform(0.09, 0.14) * size
  radius = np.full(t_count, r0)
  angle = np.zeros(t_count)
  if motion == "growing":
    radius = r0 * (0.55 + 0.75 * tau)
  elif motion == "shrinking":
    radius = r0 * (1.3 - 0.75 * tau)
  elif motion == "rotating":
    turn = rng.uniform(0.5, 1.0) * math.pi * (1.0 if rng.random() < 0.5 else -1.0)
    angle = angle + turn * tau
  extent = float(np.max(radius)) * _vertex_radius(shape)
  margin = extent + 1.0  # keeps the object in frame
  # The path relative to its start, in (y, x); placement adds an offset drawn below.
  if motion in ("left", "right", "up", "down"):
    dist = rng.uniform(0.35, 0.55) * (w if motion in ("left", "right") else h)
    step = {"right": (0.0, 1.0), "left": (0.0, -1.0), "down": (1.0, 0.0), "up": (-1.0, 0.0)}[motion]
    path = dist * tau[:, None] * np.asarray(step)[None, :]  # [T, 2]
  elif motion == "bouncing":
    height = rng.uniform(0.25, 0.4) * h
    bounces = int(rng.integers(1, 3))
    path = np.zeros((t_count, 2))
    path[:, 0] = -height * np.abs(np.sin(math.pi * bounces * tau))
  else:  # growing, shrinking, rotating: in place
    path = np.zeros((t_count, 2))
  # [2] start positions that keep every frame's centre within [margin, size - margin]
  lo = margin - path.min(axis=0)
  hi = np.asarray([h, w], np.float64) - margin - path.max(axis=0)
  for _ in range(tries):
    start = rng.uniform(lo, np.maximum(lo, hi))  # [2]
    center = start[None, :] + path  # [T, 2]
    if avoid is not None:
      gap = np.sqrt(np.sum(np.square(center - avoid.center), axis=-1))  # [T]
      if np.any(gap < extent + avoid.extent + 2.0):
        continue
    return ObjectTrack(shape=shape, colour=colour, motion=motion,
                       center=center.astype(np.float32), radius=radius.astype(np.float32),
                       angle=angle.astype(np.float32))
  return None


def sample_description(rng: np.random.Generator | int, config: ClipConfig = ClipConfig()
                       ) -> ClipDescription:
  """Draws one scene. `rng` is a numpy Generator (advanced) or an int seed."""
  rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
  background = _sample_background(rng)
  objects = [_sample_object(rng, config, ())]
  if config.max_objects == 2 and rng.random() < config.p_two_objects:
    # Objects never touch, so neither hides the other; a crowded draw falls back to one object.
    for _ in range(4):
      other = _sample_object(rng, config, (objects[0].colour,), avoid=objects[0])
      if other is not None:
        objects.append(other)
        break
  return ClipDescription(objects=tuple(objects), background=background, frames=config.frames,
                         height=config.height, width=config.width)


def sample_descriptions(rng: np.random.Generator | int, batch: int,
                        config: ClipConfig = ClipConfig()) -> list[ClipDescription]:
  """`batch` scenes drawn one after the other from `rng` (a Generator or an int seed)."""
  if batch < 1:
    raise ValueError(f"{batch=} must be positive")
  rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
  return [sample_description(rng, config) for _ in range(batch)]


# ----------------------------------------------------------------------------------------------
# Rendering (vectorised over the batch; numpy or jax.numpy)


class ClipParams(NamedTuple):
  """Numeric form of a batch of descriptions (a pytree, so it can be passed to `jax.jit`).

  K is `max_objects`; an absent object has `present = 0`.
  """
  center: Any  # [B, K, T, 2] float32, (y, x)
  radius: Any  # [B, K, T] float32, vertex radius in pixels
  angle: Any  # [B, K, T] float32, including the shape's orientation offset
  points: Any  # [B, K] float32, n of the 2n-gon
  inner: Any  # [B, K] float32
  colour: Any  # [B, K, 3] float32
  present: Any  # [B, K] float32
  bg_colour: Any  # [B, 3] float32
  bg_kind: Any  # [B] int32, index into grammar.BACKGROUND_KINDS
  bg_direction: Any  # [B] float32
  bg_period: Any  # [B] float32
  bg_phase: Any  # [B, 2] float32
  bg_contrast: Any  # [B] float32


def clip_params(descriptions: Sequence[ClipDescription], max_objects: int = 2) -> ClipParams:
  """Stacks descriptions (all of one size) into `ClipParams` of numpy arrays."""
  if not descriptions:
    raise ValueError("no descriptions given")
  sizes = {(d.frames, d.height, d.width) for d in descriptions}
  if len(sizes) != 1:
    raise ValueError(f"descriptions of different clip sizes cannot share a batch: {sorted(sizes)}")
  b, k, t = len(descriptions), max_objects, descriptions[0].frames
  center = np.zeros((b, k, t, 2), np.float32)
  radius = np.zeros((b, k, t), np.float32)
  angle = np.zeros((b, k, t), np.float32)
  points = np.full((b, k), 4.0, np.float32)
  inner = np.ones((b, k), np.float32)
  colour = np.zeros((b, k, 3), np.float32)
  present = np.zeros((b, k), np.float32)
  kinds = list(grammar.BACKGROUND_KINDS)
  for i, d in enumerate(descriptions):
    if len(d.objects) > k:
      raise ValueError(f"a description has {len(d.objects)} objects, more than {max_objects=}")
    for j, o in enumerate(d.objects):
      n, inn, offset = _GEOMETRY[o.shape]
      center[i, j], angle[i, j] = o.center, o.angle + offset
      radius[i, j] = o.radius * _vertex_radius(o.shape)
      points[i, j], inner[i, j], colour[i, j], present[i, j] = n, inn, o.rgb, 1.0
  bgs = [d.background for d in descriptions]
  return ClipParams(
      center=center, radius=radius, angle=angle, points=points, inner=inner, colour=colour,
      present=present,
      bg_colour=np.asarray([g.rgb for g in bgs], np.float32),
      bg_kind=np.asarray([kinds.index(g.kind) for g in bgs], np.int32),
      bg_direction=np.asarray([g.direction for g in bgs], np.float32),
      bg_period=np.asarray([g.period for g in bgs], np.float32),
      bg_phase=np.asarray([g.phase for g in bgs], np.float32),
      bg_contrast=np.asarray([g.contrast for g in bgs], np.float32))


def _background(p: ClipParams, height: int, width: int, xp) -> Any:
  """`[B, Y, X, 3]` in [0, 1]."""
  f32 = np.float32
  yy = (xp.arange(height, dtype=f32) + f32(0.5))[None, :, None]  # [1, Y, 1] pixel centres
  xx = (xp.arange(width, dtype=f32) + f32(0.5))[None, None, :]  # [1, 1, X]
  cos_d = xp.cos(p.bg_direction)[:, None, None]  # [B, 1, 1]
  sin_d = xp.sin(p.bg_direction)[:, None, None]
  period = p.bg_period[:, None, None]
  along = (xx - f32(width / 2)) * cos_d + (yy - f32(height / 2)) * sin_d  # [B, Y, X]
  gradient = along / f32(max(height, width) / 2)
  two_pi = f32(2 * math.pi)
  stripes = xp.clip(f32(3.0) * xp.sin(two_pi * along / period + p.bg_phase[:, None, None, 0]),
                    f32(-1.0), f32(1.0))
  checks = xp.clip(f32(4.0) * xp.sin(f32(math.pi) * (yy + p.bg_phase[:, None, None, 0]) / period)
                   * xp.sin(f32(math.pi) * (xx + p.bg_phase[:, None, None, 1]) / period),
                   f32(-1.0), f32(1.0))
  kind = p.bg_kind[:, None, None]
  zero = xp.zeros_like(gradient)
  pattern = xp.where(kind == 1, gradient, xp.where(kind == 2, checks,
                                                   xp.where(kind == 3, stripes, zero)))
  value = p.bg_colour[:, None, None, :] + (p.bg_contrast[:, None, None] * pattern)[..., None]
  return xp.clip(value, f32(0.0), f32(1.0))


def render(params: ClipParams, frames: int, height: int, width: int, xp=np) -> Any:
  """Renders `ClipParams` to videos `[B, T, Y, X, 3]` float32 in [-1, 1].

  `xp` is `numpy` or `jax.numpy` (then the function can be jitted with static sizes); both give the
  same pixels up to float rounding.
  """
  f32 = np.float32
  video = _background(params, height, width, xp)[:, None]  # [B, 1, Y, X, 3]
  yy = (xp.arange(height, dtype=f32) + f32(0.5))[None, None, :, None]  # [1, 1, Y, 1]
  xx = (xp.arange(width, dtype=f32) + f32(0.5))[None, None, None, :]  # [1, 1, 1, X]
  for k in range(params.present.shape[1]):
    dy = yy - params.center[:, k, :, 0, None, None]  # [B, T, Y, 1]
    dx = xx - params.center[:, k, :, 1, None, None]  # [B, T, 1, X]
    r = xp.sqrt(dy * dy + dx * dx)  # [B, T, Y, X]
    n = params.points[:, k, None, None, None]  # [B, 1, 1, 1]
    half = f32(math.pi) / n  # half the angle between two outer vertices
    theta = xp.arctan2(dy, dx) - params.angle[:, k, :, None, None]
    period = f32(2.0) * half
    wrapped = theta - xp.floor(theta / period) * period  # theta mod period; np.mod is much slower
    folded = half - xp.abs(wrapped - half)  # [0, half]: 0 at a vertex
    inner = params.inner[:, k, None, None, None]
    # Distance from the centre to the edge joining a vertex (radius 1) and the next inner corner.
    edge = inner * xp.sin(half) / (xp.sin(folded) + inner * xp.sin(half - folded))
    edge = edge * params.radius[:, k, :, None, None]
    alpha = xp.clip(edge - r + f32(0.5), f32(0.0), f32(1.0))
    alpha = (alpha * params.present[:, k, None, None, None])[..., None]  # [B, T, Y, X, 1]
    video = video + alpha * (params.colour[:, k, None, None, None, :] - video)
  video = xp.broadcast_to(video, (video.shape[0], frames, height, width, 3))
  return f32(2.0) * video - f32(1.0)


def make_clip(seed: int | np.random.Generator, config: ClipConfig = ClipConfig()
              ) -> tuple[np.ndarray, str, ClipDescription]:
  """One clip: `(video [T, Y, X, 3] float32 in [-1, 1], caption, description)`."""
  description = sample_description(seed, config)
  params = clip_params([description], config.max_objects)
  video = render(params, config.frames, config.height, config.width)[0]
  return np.ascontiguousarray(video), description.caption, description


def sample_batch(rng: np.random.Generator | int, batch: int, config: ClipConfig = ClipConfig()
                 ) -> tuple[np.ndarray, list[str]]:
  """`(videos [B, T, Y, X, 3] float32 in [-1, 1], captions)`, deterministic per seed."""
  descriptions = sample_descriptions(rng, batch, config)
  params = clip_params(descriptions, config.max_objects)
  videos = render(params, config.frames, config.height, config.width)
  return np.ascontiguousarray(videos), [d.caption for d in descriptions]
