"""Quality of an accelerated video against the dense one: PSNR and SSIM, as the paper reports (Table 1)."""

from __future__ import annotations

import numpy as np


def psnr(a: np.ndarray, b: np.ndarray, *, data_range: float = 255.0) -> float:
  """Peak signal-to-noise ratio in dB over the whole video (`inf` for identical inputs)."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"shape mismatch: {a.shape=} {b.shape=}")
  mse = np.mean((a - b) ** 2)
  return float("inf") if mse == 0 else float(10.0 * np.log10(data_range**2 / mse))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  x = np.arange(size, dtype=np.float64) - (size - 1) / 2
  g = np.exp(-(x**2) / (2 * sigma**2))
  return g / g.sum()


def _filter2d(img: np.ndarray, w: np.ndarray) -> np.ndarray:
  """Separable 'valid' filtering over the last two axes."""
  from numpy.lib.stride_tricks import sliding_window_view  # pylint: disable=import-outside-toplevel

  n = w.shape[0]
  rows = sliding_window_view(img, n, axis=-2) @ w
  return sliding_window_view(rows, n, axis=-2) @ w


def ssim(a: np.ndarray, b: np.ndarray, *, data_range: float = 255.0) -> float:
  """Mean SSIM (Wang et al. 2004; 11x11 Gaussian window, sigma 1.5) over frames and channels.

  Inputs are `[T, Y, X, C]`; frames smaller than the window use a window of the frame's size.
  """
  a = np.moveaxis(np.asarray(a, np.float64), -1, 1)  # [T, C, Y, X]
  b = np.moveaxis(np.asarray(b, np.float64), -1, 1)
  if a.shape != b.shape:
    raise ValueError(f"shape mismatch: {a.shape=} {b.shape=}")
  size = min(11, a.shape[-1], a.shape[-2])
  w = _gaussian_window(size, 1.5 * size / 11)
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  mu_a, mu_b = _filter2d(a, w), _filter2d(b, w)
  var_a = _filter2d(a * a, w) - mu_a**2
  var_b = _filter2d(b * b, w) - mu_b**2
  cov = _filter2d(a * b, w) - mu_a * mu_b
  s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
  return float(s.mean())
