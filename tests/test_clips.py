"""Procedural clips (astraea_jax.data): determinism, captions, and motion visible in the pixels."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from astraea_jax.data import clips, grammar

CFG = clips.ClipConfig()


def _parse(caption: str):
  """Caption -> ([(colour, shape, motion)], (bg colour, bg kind)), by the grammar, independently of
  the code that wrote it."""
  motions = {v: k for k, v in grammar.MOTION_PHRASES.items()}
  kinds = {v: k for k, v in grammar.BACKGROUND_KINDS.items()}
  head, bg = caption.rsplit(" on a ", 1)
  bg_words = bg.split()
  assert bg_words[-1] == "background"
  bg_colour, bg_kind = bg_words[0], kinds[" ".join(bg_words[1:-1])]
  objects = []
  for part in head.split(" and "):
    m = re.fullmatch(r"(a|an) (\w+) (\w+) (.+)", part)
    assert m, part
    article, colour, shape, motion = m.groups()
    assert article == ("an" if colour[0] in "aeiou" else "a")
    objects.append((colour, shape, motions[motion]))
  return objects, (bg_colour, bg_kind)


def _detect(video: np.ndarray, rgb) -> tuple[np.ndarray, np.ndarray]:
  """Per-frame centroid (y, x) and area (pixels) of the pixels close to colour `rgb`."""
  frames = (video + 1.0) / 2.0  # [T, Y, X, 3] in [0, 1]
  dist = np.linalg.norm(frames - np.asarray(rgb, np.float32), axis=-1)  # [T, Y, X]
  mask = dist < 0.25
  area = mask.sum(axis=(1, 2)).astype(np.float64)
  ys, xs = np.mgrid[0:video.shape[1], 0:video.shape[2]] + 0.5
  cy = (mask * ys).sum(axis=(1, 2)) / np.maximum(area, 1)
  cx = (mask * xs).sum(axis=(1, 2)) / np.maximum(area, 1)
  return np.stack([cy, cx], axis=-1), area


def test_clip_shape_range_and_determinism():
  video, caption, desc = clips.make_clip(7)
  assert video.shape == (17, 64, 64, 3) and video.dtype == np.float32
  assert video.min() >= -1.0 and video.max() <= 1.0
  video2, caption2, _ = clips.make_clip(7)
  np.testing.assert_array_equal(video, video2)
  assert caption == caption2 == desc.caption
  video3, caption3, _ = clips.make_clip(8)
  assert caption3 != caption or not np.array_equal(video, video3)

  videos, captions = clips.sample_batch(3, 4)
  videos2, captions2 = clips.sample_batch(np.random.default_rng(3), 4)
  assert videos.shape == (4, 17, 64, 64, 3)
  np.testing.assert_array_equal(videos, videos2)
  assert captions == captions2
  assert len(set(captions)) > 1


def test_captions_follow_descriptions_and_vocabulary():
  descriptions = clips.sample_descriptions(0, 200)
  counts = {1: 0, 2: 0}
  for d in descriptions:
    objects, (bg_colour, bg_kind) = _parse(d.caption)
    assert objects == [(o.colour, o.shape, o.motion) for o in d.objects]
    assert (bg_colour, bg_kind) == (d.background.colour, d.background.kind)
    assert set(d.caption.split()) <= set(grammar.VOCABULARY)
    assert d.caption == clips.caption(d)
    counts[len(d.objects)] += 1
    if len(d.objects) == 2:
      assert d.objects[0].colour != d.objects[1].colour
    for o in d.objects:
      assert o.center.shape == (17, 2) and o.radius.shape == (17,)
      assert o.extent <= o.center.min() and o.center.max() <= 64 - o.extent  # stays in frame
      assert not (o.motion == "rotating" and o.shape == "circle")
  assert counts[1] > 40 and counts[2] > 40
  motions = {o.motion for d in descriptions for o in d.objects}
  assert motions == set(grammar.MOTIONS)
  record = descriptions[0].to_dict()
  assert record["caption"] == descriptions[0].caption
  assert record["objects"][0]["start_centroid"] == list(descriptions[0].objects[0].start_centroid)


@pytest.mark.parametrize("seed", range(6))
def test_motion_is_visible_in_the_frames(seed):
  """A colour detector finds each object where its description says, moving the stated way."""
  rng = np.random.default_rng(seed)
  for _ in range(6):
    video, _, desc = clips.make_clip(rng)
    for o in desc.objects:
      centroid, area = _detect(video, o.rgb)
      assert area.min() > 10, (desc.caption, area)
      np.testing.assert_allclose(centroid[0], o.start_centroid, atol=1.0, err_msg=desc.caption)
      np.testing.assert_allclose(centroid[-1], o.end_centroid, atol=1.0, err_msg=desc.caption)
      dy, dx = centroid[-1] - centroid[0]
      if o.motion == "right":
        assert dx > 10 and abs(dy) < 1
      elif o.motion == "left":
        assert dx < -10 and abs(dy) < 1
      elif o.motion == "down":
        assert dy > 10 and abs(dx) < 1
      elif o.motion == "up":
        assert dy < -10 and abs(dx) < 1
      elif o.motion == "bouncing":
        assert centroid[:, 0].min() < centroid[0, 0] - 8  # rises above where it starts
      elif o.motion == "growing":
        assert area[-1] > 2.5 * area[0]
      elif o.motion == "shrinking":
        assert area[0] > 2.5 * area[-1]
      elif o.motion == "rotating":
        assert np.abs(centroid - centroid[0]).max() < 1.0
        frames = (video + 1) / 2
        near = np.linalg.norm(frames - np.asarray(o.rgb, np.float32), axis=-1) < 0.25
        assert (near[0] != near[-1]).sum() > 4  # the outline turned


def test_background_is_static_away_from_objects():
  video, _, desc = clips.make_clip(11)
  ys, xs = np.mgrid[0:64, 0:64] + 0.5
  far = np.ones((64, 64), bool)
  for o in desc.objects:
    d = np.sqrt((ys[None] - o.center[:, 0, None, None]) ** 2
                + (xs[None] - o.center[:, 1, None, None]) ** 2)  # [T, Y, X]
    far &= (d > o.extent + 1.5).all(axis=0)
  assert far.mean() > 0.3
  np.testing.assert_array_equal(video[:, far], np.broadcast_to(video[0, far], video[:, far].shape))


def test_numpy_and_jax_render_agree():
  descriptions = clips.sample_descriptions(5, 6)
  params = clips.clip_params(descriptions)
  ref = clips.render(params, 17, 64, 64)
  got = jax.jit(lambda p: clips.render(p, 17, 64, 64, xp=jnp))(params)
  np.testing.assert_allclose(np.asarray(got), ref, atol=2e-4)


def test_other_sizes_and_one_object():
  cfg = clips.ClipConfig(frames=9, height=48, width=80, max_objects=1)
  videos, captions = clips.sample_batch(1, 5, cfg)
  assert videos.shape == (5, 9, 48, 80, 3)
  assert all(" and " not in c for c in captions)


def test_bad_input():
  with pytest.raises(ValueError, match="frames"):
    clips.ClipConfig(frames=1)
  with pytest.raises(ValueError, match="max_objects"):
    clips.ClipConfig(max_objects=3)
  with pytest.raises(ValueError, match="batch"):
    clips.sample_batch(0, 0)
  a = clips.sample_description(0)
  b = clips.sample_description(0, clips.ClipConfig(frames=9))
  with pytest.raises(ValueError, match="different clip sizes"):
    clips.clip_params([a, b])
  two = next(d for d in clips.sample_descriptions(0, 50) if len(d.objects) == 2)
  with pytest.raises(ValueError, match="max_objects"):
    clips.clip_params([two], max_objects=1)
