"""RFLOW: the rectified-flow sampler of OpenSora v1.2, with its resolution-dependent timestep shift.

Ports `RFLOW` and `RFlowScheduler` of Open-Sora v1.2 (hpcaitech/Open-Sora, tag v1.2.0:
opensora/schedulers/rf/__init__.py and rectified_flow.py; rectified flow: Liu et al., "Flow
Straight and Fast", ICLR 2023, arXiv 2209.03003) with the settings of
configs/opensora-v1-2/inference/sample.py (30 steps, guidance 7.0, timestep transform on).

Conventions differ from `astraea_jax.sampling.schedulers` (Wan): the noisy sample is
`x_t = (1 - t/T) x_0 + (t/T) noise` with T = 1000 (`add_noise`), and the model predicts
`v = x_0 - noise`, so a step *adds* `v * dt` with `dt = (t_i - t_{i+1}) / T > 0`; the last step
integrates to t = 0 (`dt = t_last / T`). STDiT3 predicts 2 C channels (pred_sigma); only the first
C are the velocity.

Timesteps: the uniform grid `t_i = (1 - i/N) T`, i = 0 .. N-1, then (when enabled) shifted towards
the noise end by `t' = r t / (1 + (r - 1) t)` (t in [0, 1]) with
`r = sqrt(height * width / 512^2) * sqrt(num_frames // 17 * 5)` (the time factor is 1 for images)
times `transform_scale` (`timestep_transform`). `height`, `width` and `num_frames` are the pixel
size and frame count of the video; the reference computes `r` in the dtype of those tensors, which
is bf16 under sample.py (`dtype="bf16"`): 240p 9:16 then gives r = 2.421875 instead of 2.4187229.
`timestep_transform` does the same in the dtype it is given, on the host, rounding after every
operation like PyTorch.

`sample` reproduces `RFLOW.sample` (classifier-free guidance as one batch, conditional half first,
optional frame mask for image/video conditioning); `RFlowScheduler` exposes the same Euler steps
through the `FlowScheduler` protocol of `astraea_jax.sampling.loop.denoise`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from astraea_jax.sampling.schedulers import SchedulerState

__all__ = [
    "DEFAULT_AES",
    "IMG_FPS",
    "RFlowConfig",
    "RFlowScheduler",
    "add_noise",
    "append_score_to_prompts",
    "multi_resolution_info",
    "rflow_timesteps",
    "sample",
    "timestep_transform",
]

F32 = jnp.float32
# configs/opensora-v1-2/inference/sample.py: `aes = 6.5`.
DEFAULT_AES = 6.5
# The fps the reference feeds for single-frame (image) generation (opensora/datasets/datasets.py).
IMG_FPS = 120


@dataclasses.dataclass(frozen=True)
class RFlowConfig:
  """RFLOW settings; defaults are OpenSora v1.2's inference config (sample.py).

  Attributes:
    num_sampling_steps: N.
    num_timesteps: T, the timestep scale of the model (1000).
    cfg_scale: classifier-free guidance scale g in `uncond + g (cond - uncond)`.
    use_discrete_timesteps: round the uniform grid to integers before the transform.
    use_timestep_transform: apply the resolution / frame-count shift.
    transform_scale: extra factor on the shift ratio r (the reference's `scale`, 1.0).
    base_resolution: pixels at which the spatial factor is 1 (512^2).
    base_num_frames: frame factor at which the temporal factor is 1.
  """
  num_sampling_steps: int = 30
  num_timesteps: int = 1000
  cfg_scale: float = 7.0
  use_discrete_timesteps: bool = False
  use_timestep_transform: bool = True
  transform_scale: float = 1.0
  base_resolution: int = 512 * 512
  base_num_frames: int = 1

  def __post_init__(self):
    for name in ("num_sampling_steps", "num_timesteps", "base_resolution", "base_num_frames"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")
    for name in ("cfg_scale", "transform_scale"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number")
    if self.transform_scale <= 0:
      raise ValueError(f"transform_scale={self.transform_scale} must be positive")
    for name in ("use_discrete_timesteps", "use_timestep_transform"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{name}={getattr(self, name)!r} must be a bool")


def _host_float(x: Any, dtype: Any = None) -> np.ndarray:
  a = np.asarray(x)
  if dtype is not None:
    return a.astype(dtype)
  if a.dtype == ml_dtypes.bfloat16 or np.issubdtype(a.dtype, np.floating):
    return a
  return a.astype(np.float32)


def timestep_transform(t: Any, height: Any, width: Any, num_frames: Any, *,
                       num_timesteps: int = 1000, base_resolution: int = 512 * 512,
                       base_num_frames: int = 1, scale: float = 1.0) -> np.ndarray:
  """The reference's `timestep_transform`: `[B]` timesteps in [0, T] -> shifted, float32.

  `height`, `width`, `num_frames` (`[B]` or scalars, pixels and frames) set the ratio r in their
  own floating dtype (float32 if integer; pass `ml_dtypes.bfloat16` arrays to match sample.py's
  bf16 model arguments); only `num_frames[0] == 1` selects the image case, as in the reference.
  The shift itself runs in float32.
  """
  h = _host_float(height)
  dtype = h.dtype
  w = _host_float(width, dtype)
  f = np.atleast_1d(_host_float(num_frames, dtype))
  t = np.asarray(t, np.float32) / np.float32(num_timesteps)
  ratio_space = np.sqrt(((h * w) / np.asarray(base_resolution, dtype)).astype(dtype))
  frames = np.ones_like(f) if float(f.reshape(-1)[0]) == 1 else (f // 17 * 5).astype(dtype)
  ratio_time = np.sqrt((frames / np.asarray(base_num_frames, dtype)).astype(dtype))
  ratio = ((ratio_space * ratio_time).astype(dtype).astype(np.float32)
           * np.float32(scale)).astype(dtype)
  # The reference mixes the low-precision ratio with float32 t: every product below is float32.
  ratio_minus_1 = (ratio - np.asarray(1, dtype)).astype(dtype).astype(np.float32)
  new_t = ratio.astype(np.float32) * t / (np.float32(1) + ratio_minus_1 * t)
  return (new_t * np.float32(num_timesteps)).astype(np.float32)


def rflow_timesteps(config: RFlowConfig, batch: int, *, height: Any = None, width: Any = None,
                    num_frames: Any = None, num_steps: int | None = None) -> np.ndarray:
  """The timesteps the model receives at each step, `[N, B]` float32 (host).

  `height`, `width`, `num_frames` are needed only with `use_timestep_transform`.
  """
  n = config.num_sampling_steps if num_steps is None else num_steps
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"num_steps={n!r} must be a positive int")
  grid = [(1.0 - i / n) * config.num_timesteps for i in range(n)]
  if config.use_discrete_timesteps:
    grid = [float(int(round(t))) for t in grid]
  steps = np.broadcast_to(np.asarray(grid, np.float32)[:, None], (n, batch)).copy()
  if config.use_timestep_transform:
    if height is None or width is None or num_frames is None:
      raise ValueError("the timestep transform needs height, width and num_frames")
    steps = np.stack([
        timestep_transform(s, height, width, num_frames, num_timesteps=config.num_timesteps,
                           scale=config.transform_scale, base_resolution=config.base_resolution,
                           base_num_frames=config.base_num_frames) for s in steps])
  return np.broadcast_to(steps, (n, batch)).astype(np.float32)


def _step_dts(timesteps: np.ndarray, num_timesteps: int) -> np.ndarray:
  """`dt_i = (t_i - t_{i+1}) / T`, the last one `t_last / T`, float32 as the reference."""
  nxt = np.concatenate([timesteps[1:], np.zeros_like(timesteps[:1])], axis=0)
  return ((timesteps - nxt) / np.float32(num_timesteps)).astype(np.float32)


def add_noise(x0: jax.Array, noise: jax.Array, t: jax.Array, num_timesteps: int = 1000
              ) -> jax.Array:
  """`(1 - t/T) x0 + (t/T) noise` with per-sample t `[B]` (the reference's `add_noise`)."""
  keep = 1 - jnp.asarray(t, F32) / np.float32(num_timesteps)  # [B]
  keep = keep.reshape((-1,) + (1,) * (x0.ndim - 1))
  return keep * x0.astype(F32) + (1 - keep) * noise.astype(F32)


def multi_resolution_info(batch: int, image_size: tuple[int, int], num_frames: int,
                          fps: float, dtype: Any = np.float32) -> dict[str, np.ndarray]:
  """The model arguments `scripts/inference.py` builds ("STDiT2"/"OpenSora" multi-resolution info):
  `height`, `width`, `num_frames`, `ar` (height / width) and `fps` (IMG_FPS for one frame), each
  `[B]` in `dtype` (sample.py: bf16)."""
  h, w = image_size
  fps = fps if num_frames > 1 else IMG_FPS
  full = lambda v: np.full((batch,), v, np.float64).astype(dtype)  # noqa: E731
  return dict(height=full(h), width=full(w), num_frames=full(num_frames), ar=full(h / w),
              fps=full(fps))


def append_score_to_prompts(prompts: Sequence[str], *, aes: float | None = DEFAULT_AES,
                            flow: float | None = None, camera_motion: str | None = None
                            ) -> list[str]:
  """Appends `" aesthetic score: 6.5."` (and optionally `" motion score: F."`,
  `" camera motion: M."`) to each prompt that does not already state it, as the reference's
  inference script does before T5 encoding."""
  out = []
  for prompt in prompts:
    if aes is not None and "aesthetic score:" not in prompt:
      prompt = f"{prompt} aesthetic score: {aes:.1f}."
    if flow is not None and "motion score:" not in prompt:
      prompt = f"{prompt} motion score: {flow:.1f}."
    if camera_motion is not None and "camera motion:" not in prompt:
      prompt = f"{prompt} camera motion: {camera_motion}."
    out.append(prompt)
  return out


# model_fn(z_in [2B, C, T, Y, X], t_in [2B], *, y, mask, x_mask, fps, height, width)
#   -> [2B, C_out >= C, T, Y, X]; an `STDiT3` instance fits.
ModelFn = Callable[..., jax.Array]


def sample(model_fn: ModelFn, z: jax.Array, *, y: jax.Array, y_null: jax.Array,
           model_args: dict[str, Any], text_mask: jax.Array | None = None,
           mask: jax.Array | None = None, key: jax.Array | None = None,
           config: RFlowConfig = RFlowConfig(), guidance_scale: float | None = None,
           callback: Callable[[int, dict[str, jax.Array]], None] | None = None) -> jax.Array:
  """`RFLOW.sample`: N Euler steps with classifier-free guidance from the noise `z`.

  Args:
    model_fn: the denoiser (see `ModelFn`), called once per step on the doubled batch: rows
      [0, B) with the caption `y`, rows [B, 2B) with `y_null`.
    z: `[B, C, T, Y, X]` initial noise (and, with `mask`, the conditioning frames).
    y, y_null: `[B, 1, M, C_text]` caption features and the null caption (`STDiT3.null_caption`).
    model_args: `height`, `width`, `num_frames`, `fps` (`multi_resolution_info`); their dtype
      sets the precision of the timestep transform, as in the reference.
    text_mask: `[B, M]` caption mask (applies to both halves, as the reference repeats it).
    mask: `[B, T]` frame mask in [0, 1] (`apply_mask_strategy`): frames with value m are held at
      their `z` value while t > m T (0: always a condition frame; 1: generated). None: none.
    key: PRNG key for the noise the reference draws each step under `mask` (used only for
      fractional mask values); required with `mask`.
    config: sampler settings; `guidance_scale` overrides `config.cfg_scale`.
    callback: called as `callback(i, {"z_in", "t_in", "x_mask_in"})` before each model call.

  Returns:
    the final `[B, C, T, Y, X]` latents, float32.
  """
  g = config.cfg_scale if guidance_scale is None else guidance_scale
  b, c = z.shape[:2]
  timesteps = rflow_timesteps(config, b, height=model_args.get("height"),
                              width=model_args.get("width"),
                              num_frames=model_args.get("num_frames"))  # [N, B]
  dts = _step_dts(timesteps, config.num_timesteps)
  y_all = jnp.concatenate([y, y_null], axis=0)
  z = jnp.asarray(z, F32)
  fwd = {k: model_args[k] for k in ("fps", "height", "width") if k in model_args}
  if mask is not None:
    if key is None:
      raise ValueError("sample with a frame mask needs a PRNG key")
    mask = jnp.asarray(mask, F32)
    if mask.shape != (b, z.shape[2]):
      raise ValueError(f"mask must be [B={b}, T={z.shape[2]}], got shape {tuple(mask.shape)}")
    noise_added = mask == 1
  for i in range(timesteps.shape[0]):
    t = jnp.asarray(timesteps[i])  # [B]
    x_mask = None
    if mask is not None:
      mask_t = mask * np.float32(config.num_timesteps)
      x0 = z
      key, sub = jax.random.split(key)
      x_noise = add_noise(x0, jax.random.normal(sub, z.shape, F32), t, config.num_timesteps)
      upper = mask_t >= t[:, None]  # [B, T]: frames being generated at this t
      x_mask = jnp.concatenate([upper, upper], axis=0)
      add = upper & ~noise_added
      z = jnp.where(add[:, None, :, None, None], x_noise, x0)
      noise_added = upper
    z_in = jnp.concatenate([z, z], axis=0)
    t_in = jnp.concatenate([t, t], axis=0)
    if callback is not None:
      callback(i, {"z_in": z_in, "t_in": t_in, "x_mask_in": x_mask})
    pred = model_fn(z_in, t_in, y=y_all, mask=text_mask, x_mask=x_mask, **fwd)
    pred = jnp.asarray(pred, F32)[:, :c]
    cond, uncond = pred[:b], pred[b:]
    v = uncond + np.float32(g) * (cond - uncond)
    z = z + v * jnp.asarray(dts[i]).reshape(b, 1, 1, 1, 1)
    if mask is not None:
      z = jnp.where(upper[:, None, :, None, None], z, x0)
  return z


@dataclasses.dataclass(frozen=True)
class RFlowScheduler:
  """RFLOW's Euler steps as a `FlowScheduler` (`astraea_jax.sampling.loop.denoise`).

  The schedule depends on the video: `height`, `width` (pixels) and `num_frames`, in
  `condition_dtype` for the ratio (sample.py: "bfloat16"). `state.sigmas` are `t / T` with a final
  0; `step` adds `dt * v` for the velocity `v = x_0 - noise` (the first C channels of STDiT3's
  output, guided). The loop feeds every row the same timestep.
  """
  config: RFlowConfig = RFlowConfig()
  height: float = 240.0
  width: float = 426.0
  num_frames: float = 51.0
  condition_dtype: str = "bfloat16"

  def set_timesteps(self, num_steps: int | None = None) -> SchedulerState:
    dtype = np.dtype(ml_dtypes.bfloat16) if self.condition_dtype in ("bfloat16", "bf16") else (
        np.dtype(self.condition_dtype))
    ts = rflow_timesteps(self.config, 1, height=np.asarray([self.height], dtype),
                         width=np.asarray([self.width], dtype),
                         num_frames=np.asarray([self.num_frames], dtype),
                         num_steps=num_steps)[:, 0]  # [N]
    dt = _step_dts(ts, self.config.num_timesteps)
    sigmas = np.append(ts / np.float32(self.config.num_timesteps), np.float32(0)).astype(np.float32)
    return SchedulerState(jnp.asarray(sigmas), jnp.asarray(ts), {"dt": jnp.asarray(dt)},
                          history={})

  def init_history(self, state: SchedulerState, sample_: jax.Array) -> SchedulerState:
    del sample_
    return dataclasses.replace(state, history={})

  def step(self, state: SchedulerState, model_output: jax.Array, step_index: Any,
           sample_: jax.Array) -> tuple[jax.Array, SchedulerState]:
    """`x + dt[i] * v` in float32, returned in the sample's dtype."""
    if model_output.shape != sample_.shape:
      raise ValueError(f"model_output shape {tuple(model_output.shape)} does not match sample "
                       f"shape {tuple(sample_.shape)}")
    dt = state.coeffs["dt"][step_index]
    out = sample_.astype(F32) + dt * model_output.astype(F32)
    return out.astype(sample_.dtype), state
