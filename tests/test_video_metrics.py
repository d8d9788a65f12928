import os
import stat

import numpy as np
import pytest

from astraea_jax import metrics, video


def _frames(seed, shape=(5, 32, 48, 3)):
  rng = np.random.default_rng(seed)
  # Smooth content (what video codecs are built for), not white noise.
  t, y, x, _ = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
  base = 0.5 + 0.4 * np.sin(6 * x + 4 * y + 3 * t + rng.random())
  return np.round(255 * np.clip(base + 0.02 * rng.standard_normal(shape), 0, 1)).astype(np.uint8)


def test_mp4_round_trip_is_playable(tmp_path):
  frames = _frames(0)
  path = video.write_video(tmp_path / "clip.mp4", frames, fps=8)
  back = video.read_video(path)
  assert back.shape == frames.shape
  assert metrics.psnr(frames, back) > 30.0
  assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]  # no temporary left behind


def test_gif_preview(tmp_path):
  frames = _frames(1)
  video.write_video(tmp_path / "clip.gif", frames, fps=8)
  assert (tmp_path / "clip.gif").stat().st_size > 0


def test_unwritable_output_leaves_nothing(tmp_path):
  with pytest.raises(video.OutputError, match="does not exist"):
    video.write_video(tmp_path / "missing" / "clip.mp4", _frames(2))
  ro = tmp_path / "ro"
  ro.mkdir()
  ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
  if os.access(ro, os.W_OK):  # running as root: permissions do not bind
    pytest.skip("permissions are not enforced for this user")
  with pytest.raises(video.OutputError, match="not writable"):
    video.write_video(ro / "clip.mp4", _frames(2))


def test_failed_encode_removes_temporary(tmp_path):
  with pytest.raises(ValueError):
    video.write_video(tmp_path / "clip.mp4", np.zeros((2, 8, 8, 3), np.float32))
  assert list(tmp_path.iterdir()) == []


def test_to_uint8_frames_layouts():
  v = np.linspace(-1, 1, 3 * 2 * 4 * 5).reshape(3, 2, 4, 5)  # [C, T, Y, X]
  f = video.to_uint8_frames(v)
  assert f.shape == (2, 4, 5, 3) and f.dtype == np.uint8
  assert f.min() == 0 and f.max() == 255


def test_psnr_and_ssim():
  a = _frames(3).astype(np.float64)
  noise = np.random.default_rng(4).standard_normal(a.shape)
  assert metrics.psnr(a, a) == float("inf")
  assert metrics.ssim(a, a) == pytest.approx(1.0)
  # PSNR of additive Gaussian noise of std s is 20 log10(255 / s).
  assert metrics.psnr(a, a + 4.0 * noise) == pytest.approx(20 * np.log10(255 / 4.0), abs=0.1)
  s_small, s_big = metrics.ssim(a, a + 2 * noise), metrics.ssim(a, a + 20 * noise)
  assert 1.0 > s_small > s_big > 0.0
