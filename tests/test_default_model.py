"""The embedded default model generates what its prompts say (`astraea_jax.default_model`).

A numpy detector finds the object in each generated clip: the pixels far from the background (the
frame's median colour), their mean colour and their centroid per frame. For prompts with a known
colour and a straight motion on a plain background, the object's colour must be the named one and its
centroid must move the named way, for most of a set of seeds.
"""

import dataclasses

import numpy as np
import pytest

from astraea_jax.acceleration import BudgetSchedule
from astraea_jax.data import grammar
from astraea_jax.default_model import load_default_pipeline
from astraea_jax.metrics import psnr

CASES = [("red", "circle", "right", "gray"), ("blue", "square", "up", "white"),
         ("green", "triangle", "left", "black"), ("yellow", "circle", "down", "gray"),
         ("purple", "diamond", "right", "white"), ("orange", "square", "left", "gray")]
SEEDS = (0, 1)
AXIS = {"right": (1, +1), "left": (1, -1), "down": (0, +1), "up": (0, -1)}  # (y=0 / x=1, sign)
MIN_SHIFT = 3.0  # pixels between the mean centroids of the first and last quarter of the frames


def _prompt(colour, shape, motion, background):
  return (f"{grammar.object_phrase(colour, shape, motion)} on "
          f"{grammar.background_phrase(background, 'plain')}")


def detect(video: np.ndarray):
  """video `[F, H, W, 3]` uint8 -> (mean object colour [3] in [0, 1], centroids [F, 2] (y, x))."""
  v = video.astype(np.float32) / 255.0
  background = np.median(v.reshape(v.shape[0], -1, 3), axis=1)  # [F, 3]
  mask = np.abs(v - background[:, None, None, :]).sum(-1) > 0.35  # [F, H, W]
  colour = v[mask].mean(0) if mask.any() else np.full(3, np.nan)
  yy, xx = np.mgrid[:v.shape[1], :v.shape[2]]
  count = np.maximum(mask.sum((1, 2)), 1)
  centroids = np.stack([(mask * yy).sum((1, 2)) / count, (mask * xx).sum((1, 2)) / count], -1)
  return colour, np.where(mask.any((1, 2))[:, None], centroids, np.nan)


def nearest_colour(rgb: np.ndarray) -> str:
  names = list(grammar.COLOURS)
  table = np.asarray([grammar.COLOURS[n] for n in names])
  return names[int(np.argmin(np.square(table - rgb).sum(-1)))]


def moves(centroids: np.ndarray, motion: str) -> bool:
  axis, sign = AXIS[motion]
  q = max(1, len(centroids) // 4)
  shift = np.nanmean(centroids[-q:], 0) - np.nanmean(centroids[:q], 0)  # [2]
  along, across = sign * shift[axis], abs(shift[1 - axis])
  return bool(along >= MIN_SHIFT and along > across)


def test_detector_on_rendered_clips():
  # The detector itself, on the training renderer's clips with known answers.
  from astraea_jax.data import clips
  for seed in range(8):
    video, caption, desc = clips.make_clip(seed, clips.ClipConfig(max_objects=1))
    obj = desc.objects[0]
    if desc.background.kind != "plain" or obj.motion not in AXIS:
      continue
    frames = np.round((video + 1) * 127.5).astype(np.uint8)
    colour, centroids = detect(frames)
    assert nearest_colour(colour) == obj.colour, caption
    assert moves(centroids, obj.motion), caption


@pytest.fixture(scope="module")
def generated():
  pipe = load_default_pipeline()
  out = {}
  for seed in SEEDS:
    # One batch per seed: the batch's noise comes from the seed.
    cfg = dataclasses.replace(pipe.defaults, seed=seed)
    batch = [_prompt(*case) for case in CASES]
    out[seed] = pipe.generate(batch, cfg, progress=False).frames  # [B, F, H, W, 3]
  return pipe, out


def test_default_model_follows_colour_and_motion(generated):
  _, out = generated
  results = []
  for seed, frames in out.items():
    for (colour, _, motion, _), video in zip(CASES, frames):
      found, centroids = detect(video)
      results.append((seed, colour, motion, nearest_colour(found) == colour,
                      moves(centroids, motion)))
  colour_ok = sum(r[3] for r in results) / len(results)
  motion_ok = sum(r[3] and r[4] for r in results) / len(results)
  assert colour_ok >= 0.9, results
  # Measured with the shipped weights on a CPU: colour 12/12, colour and motion 11/12 (seeds 0-3:
  # 22/24). The weights before them, which had not learned "left" from "right", scored 6/12 (an
  # untrained model's blobs pass the motion check about one time in eight).
  assert motion_ok >= 0.75, results


def test_budget_keeps_quality(generated):
  pipe, out = generated
  cfg = dataclasses.replace(pipe.defaults, seed=SEEDS[0])
  fast = pipe.generate([_prompt(*case) for case in CASES], cfg, progress=False,
                       schedule=BudgetSchedule.uniform(cfg.steps, 0.5)).frames
  # Token reuse at half the budget stays close to the dense video (measured ~30 dB here).
  assert psnr(fast, out[SEEDS[0]]) > 22.0
