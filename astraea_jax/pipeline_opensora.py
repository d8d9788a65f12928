"""Text to video with OpenSora v1.2: T5 encoding, RFLOW denoising (dense or ASTRAEA), VAE decoding.

Follows Open-Sora v1.2's inference (hpcaitech/Open-Sora, tag v1.2.0: scripts/inference.py with
configs/opensora-v1-2/inference/sample.py): each prompt gets the aesthetic-score suffix
(`" aesthetic score: 6.5."`) and DeepFloyd's caption cleaning, T5 v1.1-xxl encodes it to 300
tokens (hidden states + mask), the initial noise is drawn from the seed, every step runs STDiT3 on
the (caption, null caption) pair with classifier-free guidance (the null caption is STDiT3's learned
`y_embedding`; both halves use the prompt's text mask, as the reference does), RFLOW's Euler step
with the resolution- and length-dependent timestep shift advances the latents, and the VAE (temporal
then per-frame SDXL decoder) turns them into frames. With a `BudgetSchedule` the transformer is
ASTRAEA's position-wise accelerated STDiT3 forward (`astraea_jax.acceleration.opensora_astraea`).

`OpenSoraPipeline` has the duck-typed interface of `astraea_jax.pipeline.WanPipeline` that
`astraea_jax.generate` uses (`name`, `defaults`, `fps`, `default_prompt`, `latent_shape`,
`num_tokens`, `generate` returning a `GenerationResult`).

A converted OpenSora folder (`python -m checkpoints_convert opensora_t2v`):

  DIR/transformer/    STDiT3 (family "opensora")
  DIR/text_encoder/   T5 v1.1 encoder (family "t5")
  DIR/vae/            OpenSora VAE decoder (family "opensora_vae")
  DIR/tokenizer/      T5's tokenizer.json
  DIR/pipeline.json   {"family": "opensora", ...}: what tells this folder from a Wan one
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from astraea_jax.acceleration import AstraeaConfig, BudgetSchedule, opensora_astraea
from astraea_jax.acceleration.schedule import load_schedules
from astraea_jax.pipeline import (GenerationError, GenerationResult, check_request,
                                  check_peer_method, check_sampling_fields, computed_fraction,
                                  initial_noise, row_groups, to_frames)
from astraea_jax.parallel.row_groups import split_rows
from astraea_jax.sampling import rflow
from astraea_jax.sampling.loop import denoise

__all__ = [
    "OPENSORA_FAMILY",
    "OpenSoraGenerationConfig",
    "OpenSoraPipeline",
    "is_opensora_folder",
    "load_opensora_pipeline",
]

OPENSORA_FAMILY = "opensora"
PIPELINE_FILE = "pipeline.json"
COMPONENTS = ("transformer", "text_encoder", "vae", "tokenizer")


@dataclasses.dataclass(frozen=True)
class OpenSoraGenerationConfig:
  """One request; defaults are sample.py's (240p 9:16 = 240x426, 51 frames, 30 steps, cfg 7).

  The fields of `astraea_jax.pipeline.GenerationConfig` are all here, so `dataclasses.replace`
  with the same overrides works on either; OpenSora reads them as follows:
    height, width: pixel size of the request. The latents are `H // 8 x W // 8` (the reference
      floors), so the frames are `8 (H // 8) x 8 (W // 8)` (240x424 for the default).
    frames: video frames; any count (17 frames per 5 latent frames, the rest 4 per latent frame).
    steps, guidance, seed: as for Wan.
    shift: None uses RFLOW's resolution-dependent timestep transform as is; a number multiplies
      its ratio (the reference's `transform_scale`).
    negative_prompt: unused: OpenSora's unconditional branch is the learned null caption.
    sigma_schedule, solver: unused: RFLOW's Euler steps are the only sampler (any value of
      `GenerationConfig` is accepted so that the same command line works for both families).
    aes: aesthetic score appended to every prompt (None: no suffix).
    fps: the frame rate the model is conditioned on (and the written video's).
  """

  height: int = 240
  width: int = 426
  frames: int = 51
  steps: int = 30
  guidance: float = 7.0
  shift: float | None = None
  seed: int = 42
  negative_prompt: str = ""
  sigma_schedule: str = "diffusers"
  solver: str = "unipc"
  aes: float | None = rflow.DEFAULT_AES
  fps: int = 24

  def __post_init__(self):
    check_sampling_fields(self, positive=("fps",))


@functools.partial(jax.jit, static_argnums=0)
def _dense_forward(graphdef, state, latents, timestep, y, mask, fps, height, width):
  out = nnx.merge(graphdef, state)(latents, timestep, y, mask=mask, fps=fps, height=height,
                                   width=width)
  return out[:, :latents.shape[1]].astype(latents.dtype)  # drop STDiT3's pred_sigma half


class OpenSoraDenseStepModel:
  """Plain STDiT3 as a `denoise` step model: the velocity (first C channels), no cache."""

  def __init__(self, model, y: jax.Array, mask: jax.Array | None, *, fps, height, width):
    self._graphdef, self._state = nnx.split(model)
    self.y, self.mask = y, mask
    self.fps = jnp.asarray(fps, jnp.float32)
    self.height = jnp.asarray(height, jnp.float32)
    self.width = jnp.asarray(width, jnp.float32)

  def __call__(self, latents, timestep, carry, step_index):
    del step_index
    return _dense_forward(self._graphdef, self._state, latents, timestep, self.y, self.mask,
                          self.fps, self.height, self.width), carry


@dataclasses.dataclass
class OpenSoraPipeline:
  """OpenSora v1.2 text-to-video: STDiT3, T5 v1.1 encoder + tokenizer, OpenSora VAE.

  Attributes:
    name: shown in summaries.
    transformer: the `STDiT3`.
    text_encoder: the T5 encoder (`astraea_jax.models.t5`).
    tokenizer: a `UMT5Tokenizer` over T5's tokenizer.json.
    vae: the `OpenSoraVAE`.
    fps: frame rate of written videos (OpenSora's save_fps, 24).
    defaults: the request a bare `generate` makes.
    default_prompt: None (a prompt is required).
    text_length: T5 tokens (300).
    condition_dtype: dtype of the timestep-transform arithmetic ("bfloat16" as sample.py runs).
    prediction: "velocity" (RFLOW's `x_0 - noise`, added with dt > 0 by its scheduler).
    schedules: budget schedules searched for this model (the folder's `schedules/*.json`), which
      `generate --budget` runs where one has that mean and `--steps`.
  """

  name: str
  transformer: Any
  text_encoder: Any
  tokenizer: Any
  vae: Any
  fps: int = 24
  defaults: OpenSoraGenerationConfig = OpenSoraGenerationConfig()
  default_prompt: str | None = None
  text_length: int = 300
  condition_dtype: str = "bfloat16"
  prediction: str = "velocity"
  schedules: tuple[BudgetSchedule, ...] = ()

  @property
  def spatial_stride(self) -> int:
    return self.vae.config.spatial_compression

  @property
  def temporal_stride(self) -> int:
    return self.vae.config.temporal_compression

  def latent_shape(self, cfg) -> tuple[int, int, int, int]:
    """`(C, T, Y, X)` of the latents; GenerationError if the request is too small."""
    s = self.spatial_stride
    if cfg.height < s or cfg.width < s:
      raise GenerationError(f"size {cfg.width}x{cfg.height} is smaller than the VAE's {s}x{s} "
                            f"pixels per latent for {self.name}")
    t = self.vae.latent_frames(cfg.frames)
    return (self.transformer.config.in_channels, t, cfg.height // s, cfg.width // s)

  def num_tokens(self, cfg) -> int:
    _, t, y, x = self.latent_shape(cfg)
    pt, py, px = self.transformer.config.patch_size
    return -(-t // pt) * -(-y // py) * -(-x // px)

  def encode_text(self, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
    """Prompts (suffixes already added) -> `(y [B, 1, M, C_text], mask [B, M])`."""
    from astraea_jax.models import t5  # pylint: disable=import-outside-toplevel

    y, mask = t5.encode_prompts(self.text_encoder, self.tokenizer, prompts,
                                max_length=self.text_length)
    return y[:, None], mask

  def decode(self, latents: jax.Array, num_frames: int) -> jax.Array:
    """Latents `[B, C, T, Y, X]` -> video `[B, 3, F, H, W]` in about [-1, 1]."""
    from astraea_jax.models import opensora_vae  # pylint: disable=import-outside-toplevel

    return opensora_vae.decode_jit(self.vae, latents, num_frames)

  def generate(self, prompts: Sequence[str], cfg=None, *, schedule: BudgetSchedule | None = None,
               astraea: AstraeaConfig = AstraeaConfig(), progress: bool = True,
               noise: jax.Array | np.ndarray | None = None,
               devices: int | None = 1, method: Any = None) -> GenerationResult:
    """Generates one video per prompt (a batch), dense or with a token-budget schedule.

    `cfg`: an `OpenSoraGenerationConfig` (or a `GenerationConfig`-like object with the same
    fields; missing `aes` / `fps` take OpenSora's defaults). `noise` `[B, C, T, Y, X]` replaces the
    seeded initial latents. `devices`: the devices the batch rows are split over (CFG's cond
    and uncond halves, then prompts; `parallel.row_groups`); None: the most visible GPUs that
    split them evenly. `method`: the peer-method factories of `astraea_jax.pipeline.step_method`
    build Wan step models, so only None is accepted here.
    """
    cfg = self.defaults if cfg is None else cfg
    check_peer_method(self.name, method)
    prompts = check_request(prompts, cfg.steps, schedule)
    c, t, y, x = self.latent_shape(cfg)
    b = len(prompts)
    aes = getattr(cfg, "aes", rflow.DEFAULT_AES)
    fps = getattr(cfg, "fps", self.fps)
    use_cfg = cfg.guidance != 1.0

    start = time.perf_counter()
    texts = rflow.append_score_to_prompts(prompts, aes=aes)
    caption, text_mask = self.encode_text(texts)  # [B, 1, M, C], [B, M]
    caption = caption.astype(self.transformer.config.dtype)
    if use_cfg:
      null = self.transformer.null_caption(b).astype(caption.dtype)
      caption = jnp.concatenate([caption, null], axis=0)  # [2B, 1, M, C]: cond, uncond
    caption = jax.block_until_ready(caption)
    encode_seconds = time.perf_counter() - start

    model_fps = fps if cfg.frames > 1 else rflow.IMG_FPS
    rf_config = rflow.RFlowConfig(num_sampling_steps=cfg.steps, cfg_scale=float(cfg.guidance),
                                  transform_scale=1.0 if cfg.shift is None else float(cfg.shift))
    scheduler = rflow.RFlowScheduler(rf_config, height=float(cfg.height), width=float(cfg.width),
                                     num_frames=float(cfg.frames),
                                     condition_dtype=self.condition_dtype)
    state = scheduler.set_timesteps(cfg.steps)
    noise = initial_noise(noise, (b, c, t, y, x), cfg.seed)

    cond_args = dict(fps=float(model_fps), height=float(cfg.height), width=float(cfg.width))

    def make_step_model(model, y, mask):
      if schedule is None:
        return OpenSoraDenseStepModel(model, y, mask, **cond_args)
      return opensora_astraea.OpenSoraAstraeaStepModel(model, schedule, y, mask=mask,
                                                       config=astraea, **cond_args)

    rows = caption.shape[0]  # [cond; uncond] with guidance
    groups = row_groups(devices, rows)
    if groups == 1:
      step_model: Any = make_step_model(self.transformer, caption, text_mask)
    else:
      # STDiT3 tiles a mask of fewer rows over the captions: give every row its own.
      mask = (None if text_mask is None else
              jnp.tile(text_mask, (rows // text_mask.shape[0], 1)))  # [B', M]
      step_model = split_rows(self.transformer, make_step_model, (caption, mask), groups)
    latents, _, stats = denoise(step_model, noise, scheduler, state, guidance_scale=cfg.guidance,
                                progress=progress, prediction=self.prediction)

    start = time.perf_counter()
    video = jax.block_until_ready(self.decode(latents, cfg.frames))  # [B, 3, F, H, W]
    decode_seconds = time.perf_counter() - start
    frames = to_frames(video)  # [B, F, H, W, 3]
    records = getattr(step_model, "records", None)  # ASTRAEA's, not the dense model's
    return GenerationResult(frames, np.asarray(latents), stats, encode_seconds, decode_seconds,
                            self.num_tokens(cfg), schedule,
                            None if records is None else tuple(records),
                            self.transformer.config.depth,
                            computed_fraction=computed_fraction(step_model, noise.shape, cfg.steps))


# -- folders --------------------------------------------------------------------------------------


def _model_load_error():
  from astraea_jax.pipelines import ModelLoadError  # pylint: disable=import-outside-toplevel
  return ModelLoadError


def read_pipeline_file(path: str | os.PathLike) -> dict | None:
  """The folder's pipeline.json as a dict, or None if it has none (or it is not a JSON object)."""
  file = Path(path) / PIPELINE_FILE
  try:
    meta = json.loads(file.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError):
    return None
  return meta if isinstance(meta, dict) else None


def is_opensora_folder(path: str | os.PathLike) -> bool:
  """True if `path` is a folder whose pipeline.json says `"family": "opensora"` (the components
  themselves are checked by `load_opensora_pipeline`)."""
  if not Path(path).is_dir():
    return False
  meta = read_pipeline_file(path)
  return meta is not None and meta.get("family") == OPENSORA_FAMILY


def assemble(name: str, transformer, text_encoder, tokenizer, vae, *, text_length: int = 300,
             fps: int = 24) -> OpenSoraPipeline:
  """An `OpenSoraPipeline` around loaded components, after checking that they fit together."""
  error = _model_load_error()
  tcfg = transformer.config
  if text_encoder.config.d_model != tcfg.caption_channels:
    raise error(f"{name}: text encoder width {text_encoder.config.d_model} != transformer "
                f"caption_channels {tcfg.caption_channels}")
  if text_length != tcfg.model_max_length:
    raise error(f"{name}: text length {text_length} != transformer model_max_length "
                f"{tcfg.model_max_length}")
  if vae.config.latent_channels != tcfg.in_channels:
    raise error(f"{name}: VAE latent channels {vae.config.latent_channels} != transformer "
                f"in_channels {tcfg.in_channels}")
  return OpenSoraPipeline(name=name, transformer=transformer, text_encoder=text_encoder,
                          tokenizer=tokenizer, vae=vae, fps=fps, text_length=text_length,
                          defaults=dataclasses.replace(OpenSoraGenerationConfig(), fps=fps))


def load_opensora_pipeline(path: str | os.PathLike, *, text_dtype=jnp.float32,
                           vae_dtype: str = "float32") -> OpenSoraPipeline:
  """An OpenSora v1.2 pipeline from a converted folder (see the module doc).

  `text_dtype` is the compute (and parameter) dtype of T5 (OpenSora runs it in fp32); the
  transformer keeps its checkpoint's dtypes (bf16 from the default conversion); `vae_dtype` is the
  VAE's compute dtype. Raises `astraea_jax.pipelines.ModelLoadError` for anything missing.
  """
  from astraea_jax.models import opensora, opensora_vae, t5  # pylint: disable=import-outside-toplevel
  from astraea_jax.models.tokenizer import UMT5Tokenizer  # pylint: disable=import-outside-toplevel

  error = _model_load_error()
  root = Path(path)
  if not root.is_dir():
    raise error(f"model folder {str(root)!r} does not exist")
  meta = read_pipeline_file(root)
  if meta is None or meta.get("family") != OPENSORA_FAMILY:
    raise error(f"{str(root)!r} is not a converted OpenSora folder: its {PIPELINE_FILE} must say "
                f'"family": "{OPENSORA_FAMILY}" (write it with `python -m checkpoints_convert '
                "opensora_t2v`)")
  missing = [c for c in COMPONENTS if not (root / c).is_dir()]
  if missing:
    raise error(f"{str(root)!r} lacks {', '.join(missing)}")
  try:
    schedules = load_schedules(root / "schedules")
  except ValueError as e:
    raise error(str(e)) from None
  try:
    transformer = opensora.load_pretrained(str(root / "transformer"))
    text_encoder = t5.load_encoder(root / "text_encoder", dtype=text_dtype)
    vae = opensora_vae.load_checkpoint(root / "vae", dtype=vae_dtype)
    text_length = int(meta.get("text_length", transformer.config.model_max_length))
    tokenizer = UMT5Tokenizer(root / "tokenizer", max_length=text_length)
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise error(f"cannot load {str(root)!r}: {e}") from e
  pipe = assemble(root.name, transformer, text_encoder, tokenizer, vae,
                  text_length=text_length, fps=int(meta.get("fps", 24)))
  return dataclasses.replace(pipe, schedules=schedules)
