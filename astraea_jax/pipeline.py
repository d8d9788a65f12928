"""Text to video with a Wan-architecture model: text encoding, denoising (dense or ASTRAEA), decoding.

The pipeline follows Wan2.1's text-to-video loop (wan/text2video.py in Wan-Video/Wan2.1 and diffusers'
`WanPipeline`): prompts and the negative prompt are encoded once, the initial noise is drawn from the seed,
every step runs the transformer on the (cond, uncond) pair and mixes them with classifier-free guidance, the
flow-matching UniPC solver advances the latents, and the decoder turns the final latents into frames. With a
`BudgetSchedule`, the transformer is ASTRAEA's token-wise accelerated forward (arXiv 2506.05096): step t
computes `round(theta_t * N)` tokens per block and reuses the token cache for the rest. A `method`
factory plugs in any other step model (the peer methods of `astraea_jax.acceleration`: TeaCache,
EasyCache, PAB, uniform step skipping, alone or around ASTRAEA).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from astraea_jax.acceleration import AstraeaConfig, AstraeaStepModel, BudgetSchedule
from astraea_jax.acceleration.attention_broadcast import PABConfig, PABStepModel
from astraea_jax.acceleration.method_stats import StepRecord
from astraea_jax.acceleration.step_cache import (EasyCacheConfig, EasyCacheStepModel,
                                                 TeaCacheConfig, TeaCacheStepModel)
from astraea_jax.acceleration.step_skip import StepSkipConfig, StepSkipStepModel
from astraea_jax.models.wan import WanTransformer3DModel
from astraea_jax import parallel
from astraea_jax.sampling.loop import DenoiseStats, denoise
from astraea_jax.sampling.schedulers import FlowEulerConfig, FlowUniPCConfig, make_scheduler

# The English negative prompt of diffusers' Wan2.1 README.
WAN_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, "
    "static, overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra "
    "fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused "
    "fingers, still picture, messy background, three legs, many people in the background, walking "
    "backwards")


# method(transformer, context [B', M, text_dim], *, num_steps) -> a `denoise` step model.
StepMethod = Callable[..., Any]


class GenerationError(ValueError):
  """A generation request the model cannot take (size, frames, steps, budget)."""


def check_sampling_fields(cfg: Any, positive: Sequence[str] = ()) -> None:
  """The checks every family's generation config shares: sizes, steps and `positive` (e.g. fps)
  at least 1, a finite guidance >= 0, a positive shift or None."""
  for name in ("height", "width", "frames", "steps", *positive):
    if getattr(cfg, name) < 1:
      raise GenerationError(f"{name}={getattr(cfg, name)} must be positive")
  if not np.isfinite(cfg.guidance) or cfg.guidance < 0:
    raise GenerationError(f"guidance={cfg.guidance} must be a finite number >= 0")
  if cfg.shift is not None and not cfg.shift > 0:
    raise GenerationError(f"shift={cfg.shift} must be positive")


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  """One generation request. Defaults are Wan2.1-T2V-1.3B's (480p, 81 frames, 50 steps, guidance 5).

  Attributes:
    height, width: output size in pixels.
    frames: output frames (4k + 1 for Wan's VAE).
    steps: denoising steps.
    guidance: classifier-free guidance scale; 1 disables the unconditional branch.
    shift: flow shift of the sigma schedule; None uses the model's default.
    seed: seed of the initial noise.
    negative_prompt: the unconditional prompt.
    sigma_schedule: "diffusers" (diffusers' flow sigmas) or "wan" (the original repository's).
    solver: "unipc" (Wan's default, order 2) or "euler".
  """

  height: int = 480
  width: int = 832
  frames: int = 81
  steps: int = 50
  guidance: float = 5.0
  shift: float | None = None
  seed: int = 0
  negative_prompt: str = WAN_NEGATIVE_PROMPT
  sigma_schedule: Literal["diffusers", "wan"] = "diffusers"
  solver: Literal["unipc", "euler"] = "unipc"

  def __post_init__(self):
    check_sampling_fields(self)
    if self.sigma_schedule not in ("diffusers", "wan"):
      raise GenerationError(f"{self.sigma_schedule=} must be 'diffusers' or 'wan'")
    if self.solver not in ("unipc", "euler"):
      raise GenerationError(f"{self.solver=} must be 'unipc' or 'euler'")


def computed_fraction(step_model: Any, latents_shape: tuple[int, ...],
                      num_steps: int) -> float | None:
  """Mean over `num_steps` of the fraction of tokens `step_model` computes per block, with k as the
  model rounds it (OpenSora to even positions, a sequence-sharded Wan to the shard count); None for
  a model without a token budget. Step 0 is dense, so its k is the model's token count."""
  num_selected = getattr(step_model, "num_selected", None)
  if num_selected is None:
    return None
  ks = [num_selected(i, latents_shape) for i in range(num_steps)]
  return sum(ks) / (ks[0] * num_steps)


@dataclasses.dataclass(frozen=True)
class GenerationResult:
  """Frames `[B, F, H, W, 3]` uint8, the final latents `[B, C, T, Y, X]`, and timings."""

  frames: np.ndarray
  latents: np.ndarray
  denoise_stats: DenoiseStats
  encode_seconds: float
  decode_seconds: float
  num_tokens: int
  schedule: BudgetSchedule | None
  # What the step model computed per step (`method_stats.StepRecord`), when it keeps records.
  step_records: tuple[StepRecord, ...] | None = None
  num_layers: int = 0
  # Mean over the steps of the fraction of tokens computed per block, as the step model rounds k.
  computed_fraction: float | None = None

  @property
  def total_seconds(self) -> float:
    return self.encode_seconds + self.denoise_stats.total_seconds + self.decode_seconds


class DenseStepModel:
  """The plain transformer as a `denoise` step model (no token cache): the dense baseline."""

  def __init__(self, model: WanTransformer3DModel, context: jax.Array):
    self._graphdef, self._state = nnx.split(model)
    self.context = context
    self.num_layers = model.config.num_layers

  def __call__(self, latents, timestep, carry, step_index):
    del step_index
    return _dense_forward(self._graphdef, self._state, latents, timestep, self.context), carry


@functools.partial(jax.jit, static_argnums=0)
def _dense_forward(graphdef, state, latents, timestep, context):
  # jax.jit over the split state, not nnx.jit: the latter returns the parameters and XLA copies them.
  return nnx.merge(graphdef, state)(latents, timestep, context)


PeerConfig = TeaCacheConfig | EasyCacheConfig | PABConfig | StepSkipConfig


def check_request(prompts: Sequence[str], steps: int, schedule: BudgetSchedule | None) -> list[str]:
  """The prompts as a list, after the checks every pipeline makes on a request."""
  prompts = list(prompts)
  if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
    raise GenerationError("every prompt must be a non-empty string")
  if schedule is not None and len(schedule) != steps:
    raise GenerationError(f"the schedule has {len(schedule)} steps, the request {steps}")
  return prompts


def check_peer_method(name: str, method: Any) -> None:
  """Pipelines whose step models are not Wan's take no peer method."""
  if method is not None:
    raise GenerationError(f"{name}: the peer methods (--method) support Wan models only")


def row_groups(devices: int | None, rows: int) -> int:
  """How many of this host's devices the `rows` batch rows of a request are split over
  (`parallel.row_groups`): `devices` None: the most visible GPUs that split them evenly (1 on
  CPU); else exactly `devices` (GenerationError where they do not split the rows)."""
  from astraea_jax.parallel.row_groups import fitting_row_groups  # pylint: disable=import-outside-toplevel
  from astraea_jax.parallel.sharded import default_num_devices  # pylint: disable=import-outside-toplevel

  visible = default_num_devices() if devices is None else len(jax.local_devices())
  try:
    return fitting_row_groups(devices, rows, visible)
  except ValueError as e:
    raise GenerationError(str(e)) from None


def initial_noise(noise: jax.Array | np.ndarray | None, shape: tuple[int, ...],
                  seed: int) -> jax.Array:
  """`noise` (checked against the request's latent `shape`), else drawn from `seed`; f32."""
  if noise is None:
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)
  if tuple(noise.shape) != tuple(shape):
    raise GenerationError(f"noise of shape {tuple(noise.shape)} does not fit the request's "
                          f"latents {tuple(shape)}")
  return jnp.asarray(noise, jnp.float32)


def to_frames(video: jax.Array) -> np.ndarray:
  """Decoded `[B, 3, F, H, W]` in [-1, 1] -> uint8 `[B, F, H, W, 3]`."""
  frames = np.asarray(jnp.round((jnp.clip(video, -1, 1) + 1) * 127.5).astype(jnp.uint8))
  return np.moveaxis(frames, 1, -1)


def step_method(config: PeerConfig, *, schedule: BudgetSchedule | None = None,
                astraea: AstraeaConfig = AstraeaConfig(), decisions=None) -> StepMethod:
  """The `WanPipeline.generate(method=...)` factory of a peer method, picked by its config type.

  EasyCache and uniform step skipping wrap another step model: ASTRAEA with `schedule` if given (the
  composition: reuse whole steps, token budgets on the computed ones), else the dense transformer.
  TeaCache and PAB own the forward, so they take no schedule. `decisions` (TeaCache, EasyCache)
  forces compute / reuse per step (see `TeaCacheStepModel`).
  """
  if schedule is not None and isinstance(config, (TeaCacheConfig, PABConfig)):
    raise GenerationError(f"{type(config).__name__} replaces the whole forward and does not combine "
                          "with a budget schedule")

  def inner(model, context):
    if schedule is None:
      return DenseStepModel(model, context)
    # The wrappers leave steps out, so a dense step cannot know which steps read its cache.
    return AstraeaStepModel(model, schedule, context, config=astraea, lookahead=False)

  def build(model, context, *, num_steps):
    if schedule is not None and len(schedule) != num_steps:
      raise GenerationError(f"the schedule has {len(schedule)} steps, the request {num_steps}")
    if isinstance(config, TeaCacheConfig):
      return TeaCacheStepModel(model, context, config, num_steps=num_steps, decisions=decisions)
    if isinstance(config, PABConfig):
      return PABStepModel(model, context, config, num_steps=num_steps)
    if isinstance(config, EasyCacheConfig):
      return EasyCacheStepModel(inner(model, context), config, num_steps=num_steps,
                                decisions=decisions)
    if isinstance(config, StepSkipConfig):
      return StepSkipStepModel(inner(model, context), config)
    raise TypeError(f"no step method for {type(config).__name__}")

  return build


@dataclasses.dataclass
class WanPipeline:
  """A Wan-architecture text-to-video model with its text encoder and decoder.

  Attributes:
    name: shown in summaries.
    transformer: the denoiser.
    encode_text: prompts -> `[B, M, text_dim]` conditioning (zero past each prompt's length).
    decode: latents `[B, C, T, Y, X]` -> video `[B, 3, F, H, W]` in [-1, 1].
    spatial_stride, temporal_stride: the decoder's compression (Wan VAE: 8 and 4; pixel space: 1, 1).
    default_shift: flow shift used when the request gives none.
    fps: frame rate of written videos.
    defaults: the request a bare `generate` makes of this model (size, frames, steps, guidance).
    default_prompt: the prompt of a bare `generate` (None: a prompt is required).
    prediction: what the transformer outputs, "velocity" (Wan2.1) or "x0"
      (`astraea_jax.models.prediction`).
    schedules: budget schedules searched for this model (`python -m astraea_jax.search`), which
      `generate --budget B` runs where one has mean B and the request's step count.
  """

  name: str
  transformer: WanTransformer3DModel
  encode_text: Callable[[Sequence[str]], jax.Array]
  decode: Callable[[jax.Array], jax.Array]
  spatial_stride: int
  temporal_stride: int
  default_shift: float
  fps: int = 16
  defaults: GenerationConfig = GenerationConfig()
  default_prompt: str | None = None
  prediction: str = "velocity"
  schedules: tuple[BudgetSchedule, ...] = ()

  def latent_shape(self, cfg: GenerationConfig) -> tuple[int, int, int, int]:
    """`(C, T, Y, X)` of the latents for a request; GenerationError if the model cannot take it."""
    pt, py, px = self.transformer.config.patch_size
    sy, sx = self.spatial_stride * py, self.spatial_stride * px
    if cfg.height % sy or cfg.width % sx:
      raise GenerationError(
          f"size {cfg.width}x{cfg.height} must be a multiple of {sx}x{sy} for {self.name}")
    ts = self.temporal_stride
    if (cfg.frames - 1) % ts:
      raise GenerationError(f"frames={cfg.frames} must be {ts}k+1 for {self.name}")
    t = (cfg.frames - 1) // ts + 1
    if t % pt:
      raise GenerationError(f"frames={cfg.frames} give {t} latent frames, not a multiple of {pt}")
    return (self.transformer.config.in_channels, t, cfg.height // self.spatial_stride,
            cfg.width // self.spatial_stride)

  def num_tokens(self, cfg: GenerationConfig) -> int:
    _, t, y, x = self.latent_shape(cfg)
    pt, py, px = self.transformer.config.patch_size
    return (t // pt) * (y // py) * (x // px)

  def generate(self, prompts: Sequence[str], cfg: GenerationConfig, *,
               schedule: BudgetSchedule | None = None,
               astraea: AstraeaConfig = AstraeaConfig(), progress: bool = True,
               noise: jax.Array | np.ndarray | None = None,
               devices: int | None = 1, method: StepMethod | None = None) -> GenerationResult:
    """Generates one video per prompt (a batch), dense or with a token-budget schedule.

    `method(transformer, context, num_steps=cfg.steps)`, if given, builds the step model instead
    (one device only; `schedule` is then only checked for length, the method owns its use).

    `noise` `[B, C, T, Y, X]` replaces the initial latents drawn from `cfg.seed` (e.g. to reproduce
    another implementation's run from the same starting point). `devices`: 1 runs on one device;
    n > 1 shards the tokens over n devices (`astraea_jax.parallel.sharded`: CFG halves and
    sequence shards, top-k per shard with k rounded to a multiple of the shard count); None takes
    the most visible devices that split the request evenly.
    """
    prompts = check_request(prompts, cfg.steps, schedule)
    c, t, y, x = self.latent_shape(cfg)
    b = len(prompts)
    use_cfg = cfg.guidance != 1.0
    try:
      mesh = parallel.mesh_for_request(devices, num_tokens=self.num_tokens(cfg),
                                       batch=2 * b if use_cfg else b, guidance=use_cfg)
    except ValueError as e:
      raise GenerationError(str(e)) from None

    start = time.perf_counter()
    context = self.encode_text(prompts)  # [B, M, text_dim]
    if cfg.guidance != 1.0:
      negative = self.encode_text([cfg.negative_prompt] * b)
      context = jnp.concatenate([context, negative], axis=0)  # [2B, M, text_dim]: cond, uncond
    context = jax.block_until_ready(context)
    encode_seconds = time.perf_counter() - start

    shift = self.default_shift if cfg.shift is None else cfg.shift
    sched_cfg = (FlowUniPCConfig if cfg.solver == "unipc" else FlowEulerConfig)(
        sigma_schedule=cfg.sigma_schedule, shift=shift)
    scheduler = make_scheduler(sched_cfg)
    state = scheduler.set_timesteps(cfg.steps)
    noise = initial_noise(noise, (b, c, t, y, x), cfg.seed)

    if method is not None:
      if mesh is not None:
        raise GenerationError("an acceleration method other than ASTRAEA runs on one device only: "
                              "use devices=1")
      step_model: Any = method(self.transformer, context, num_steps=cfg.steps)
    elif mesh is not None:
      step_model = (parallel.ShardedDenseStepModel(self.transformer, context, mesh)
                    if schedule is None else
                    parallel.ShardedAstraeaStepModel(self.transformer, schedule, context, mesh,
                                                     config=astraea))
    elif schedule is None:
      step_model = DenseStepModel(self.transformer, context)
    else:
      step_model = AstraeaStepModel(self.transformer, schedule, context, config=astraea)
    latents, _, stats = denoise(step_model, noise, scheduler, state, guidance_scale=cfg.guidance,
                                progress=progress, prediction=self.prediction)

    start = time.perf_counter()
    video = jax.block_until_ready(self.decode(latents))  # [B, 3, F, H, W]
    decode_seconds = time.perf_counter() - start
    frames = to_frames(video)  # [B, F, H, W, 3]
    records = getattr(step_model, "records", None)
    return GenerationResult(frames, np.asarray(latents), stats, encode_seconds, decode_seconds,
                            self.num_tokens(cfg), schedule,
                            None if records is None else tuple(records),
                            self.transformer.config.num_layers,
                            computed_fraction=computed_fraction(step_model, noise.shape, cfg.steps))
