"""Text to video with HunyuanVideo: Llama-3 + CLIP-L text encoding, flow Euler denoising (dense or
ASTRAEA), causal 3D VAE decoding.

Follows diffusers' `HunyuanVideoPipeline` (0.42.1) with its defaults, which are the original
`sample_video.py`'s (Kong et al., "HunyuanVideo", arXiv 2412.03603): each prompt is put into the
Llama-3 chat template, tokenized to `max_sequence_length + crop_start` tokens, the Llama decoder's
`hidden_states[-3]` are cropped to the prompt's tokens (`astraea_jax.models.llama_text` documents
the rule); CLIP-L's pooled output of the prompt (77 tokens) is the global text vector; the
transformer is guidance-distilled, so every step is one forward with the embedded guidance scale
(x 1000) instead of a cond/uncond pair; flow-matching Euler steps with shift 7 on `linspace(1, 0)`
sigmas; the latents, divided by the VAE's scaling factor, are decoded to frames. With a
`BudgetSchedule` the transformer is ASTRAEA's accelerated forward
(`astraea_jax.acceleration.hunyuan_astraea`): video tokens are selected, text tokens always computed.

`HunyuanPipeline` has the duck-typed interface of `astraea_jax.pipeline.WanPipeline` that
`astraea_jax.generate` uses (`name`, `defaults`, `fps`, `default_prompt`, `latent_shape`,
`num_tokens`, `generate` returning a `GenerationResult`). `checkpoints_convert.hunyuan_t2v` builds
one from a diffusers HunyuanVideo release folder in memory.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from astraea_jax.acceleration import AstraeaConfig, BudgetSchedule
from astraea_jax.acceleration.hunyuan_astraea import HunyuanAstraeaStepModel
from astraea_jax.models import clip_text, hunyuan_vae, llama_text
from astraea_jax.pipeline import (GenerationError, GenerationResult, check_request,
                                  check_peer_method, check_sampling_fields, computed_fraction,
                                  initial_noise, row_groups, to_frames)
from astraea_jax.parallel.row_groups import split_rows
from astraea_jax.parallel.sharded import default_num_devices
from astraea_jax.sampling.loop import denoise
from astraea_jax.sampling.schedulers import FlowEulerConfig, FlowEulerScheduler

__all__ = [
    "HunyuanGenerationConfig",
    "HunyuanPipeline",
    "PaddedTokenizer",
    "TextTemplate",
]

CLIP_MAX_LENGTH = 77


@dataclasses.dataclass(frozen=True)
class HunyuanGenerationConfig:
  """One request; defaults are HunyuanVideo's (720x1280, 129 frames, 50 steps, guidance 6, shift 7).

  The fields of `astraea_jax.pipeline.GenerationConfig` are all here, so `dataclasses.replace` with
  the same overrides works on either; HunyuanVideo reads them as follows:
    height, width: pixel size, multiples of the VAE's 8 x the transformer's 2 = 16.
    frames: 4 k + 1 (the causal VAE's first frame, then 4 per latent frame).
    guidance: the embedded (distilled) guidance scale; one forward per step, no negative prompt.
    shift: the flow shift of the sigma schedule (None: 7).
    negative_prompt, sigma_schedule, solver: unused (accepted so one command line serves every
      family).
  """

  height: int = 720
  width: int = 1280
  frames: int = 129
  steps: int = 50
  guidance: float = 6.0
  shift: float | None = None
  seed: int = 42
  negative_prompt: str = ""
  sigma_schedule: str = "hunyuan"
  solver: str = "euler"
  fps: int = 24

  def __post_init__(self):
    check_sampling_fields(self, positive=("fps",))


@dataclasses.dataclass(frozen=True)
class TextTemplate:
  """How prompts reach the Llama encoder: `template.format(prompt)`, tokenized to
  `max_sequence_length + crop_start`, `hidden_states[-(skip_layers + 1)]`, first `crop_start`
  positions dropped."""

  template: str = llama_text.HUNYUAN_PROMPT_TEMPLATE
  crop_start: int = llama_text.HUNYUAN_CROP_START
  max_sequence_length: int = llama_text.HUNYUAN_MAX_SEQUENCE_LENGTH
  skip_layers: int = llama_text.HUNYUAN_SKIP_LAYERS

  def __post_init__(self):
    if "{}" not in self.template:
      raise ValueError(f"{self.template=} must hold one '{{}}' for the prompt")
    if self.crop_start < 0 or self.max_sequence_length < 1 or self.skip_layers < 0:
      raise ValueError(f"bad template numbers: {self.crop_start=}, {self.max_sequence_length=}, "
                       f"{self.skip_layers=}")


class PaddedTokenizer:
  """A `tokenizer.json` (transformers' fast-tokenizer file) -> fixed-length `(ids, mask)` arrays.

  `build(folder) -> tokenizers.Tokenizer` replaces reading tokenizer.json (CLIP's tokenizer_2 may
  ship only vocab.json + merges.txt: `clip_tokenizer.build_clip_tokenizer`).

  Right padding to `max_length` with the folder's pad token (`tokenizer_config.json` /
  `special_tokens_map.json`, else the tokenizer.json's padding settings), truncation to
  `max_length`, special tokens added by the file's post-processor, as `tokenizer(...,
  padding="max_length", truncation=True)` does for the Llama-3 and CLIP tokenizers.
  """

  def __init__(self, folder: str | os.PathLike, *, max_length: int,
               build: Callable[[Path], Any] | None = None):
    import tokenizers  # pylint: disable=import-outside-toplevel

    folder = Path(folder)
    file = folder / "tokenizer.json"
    if build is not None:  # e.g. CLIP's BPE from vocab.json + merges.txt
      self._tokenizer = build(folder)
    elif not file.is_file():
      raise ValueError(f"{folder} has no tokenizer.json (save the tokenizer as a fast tokenizer)")
    else:
      try:
        self._tokenizer = tokenizers.Tokenizer.from_file(str(file))
      except Exception as e:  # the Rust side raises a bare Exception for malformed JSON
        raise ValueError(f"cannot read tokenizer {str(file)!r}: {e}") from e
    self.max_length = int(max_length)
    pad = _pad_token(folder)
    if pad is None and self._tokenizer.padding is not None:
      pad = self._tokenizer.padding.get("pad_token")
    pad_id = None if pad is None else self._tokenizer.token_to_id(pad)
    if pad_id is None:
      raise ValueError(f"tokenizer {str(file)!r} has no pad token")
    self.pad_token, self.pad_token_id = pad, pad_id

  def __call__(self, texts: Sequence[str], *, max_length: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """`input_ids [B, S]`, `attention_mask [B, S]` int32 (1 for real tokens)."""
    m = self.max_length if max_length is None else int(max_length)
    self._tokenizer.enable_truncation(max_length=m)
    self._tokenizer.enable_padding(length=m, pad_id=self.pad_token_id, pad_token=self.pad_token,
                                   direction="right")
    encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=True)
    ids = np.asarray([e.ids for e in encodings], np.int32)
    mask = np.asarray([e.attention_mask for e in encodings], np.int32)
    return ids, mask


def _pad_token(folder: Path) -> str | None:
  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    try:
      meta = json.loads((folder / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
      continue
    pad = meta.get("pad_token")
    if isinstance(pad, dict):
      pad = pad.get("content")
    if isinstance(pad, str):
      return pad
  return None


@functools.partial(jax.jit, static_argnums=0)
def _dense_step(graphdef, state, latents, timestep, text, text_mask, pooled, guidance):
  return nnx.merge(graphdef, state)(latents, timestep, text, text_mask, pooled, guidance)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _llama_hidden(graphdef, state, ids, mask, skip_layers):
  return nnx.merge(graphdef, state)(ids, mask, skip_layers=skip_layers)


class HunyuanDenseStepModel:
  """The plain transformer as a `denoise` step model (embedded guidance, no cache)."""

  def __init__(self, model, text, text_mask, pooled, guidance):
    self._graphdef, self._state = nnx.split(model)
    self.text, self.text_mask, self.pooled, self.guidance = text, text_mask, pooled, guidance

  def __call__(self, latents, timestep, carry, step_index):
    del step_index
    t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (latents.shape[0],))
    out = _dense_step(self._graphdef, self._state, latents, t, self.text, self.text_mask,
                      self.pooled, self.guidance)
    return out.astype(latents.dtype), carry


@dataclasses.dataclass
class HunyuanPipeline:
  """HunyuanVideo text-to-video: transformer, Llama-3 + CLIP-L text encoders, 3D VAE decoder.

  Attributes:
    name: shown in summaries.
    transformer: the `HunyuanVideoTransformer3DModel`.
    text_encoder, tokenizer: the Llama decoder (`llama_text.LlamaTextModel`) and its tokenizer.
    text_encoder_2, tokenizer_2: CLIP-L (`clip_text.CLIPTextModel`) and its tokenizer.
    vae: the `hunyuan_vae.HunyuanVAEDecoder`.
    template: the Llama prompt template and its crop.
    shift: the flow shift of the release's scheduler (7).
    vae_tiling: how the VAE decodes: frame-wise and in 256 px tiles by default (diffusers'
      `vae.decode` after `enable_tiling()`, as HunyuanVideo's model card runs it), so that a
      720p x 129-frame clip decodes in the memory of one tile.
    schedules: budget schedules searched for this model (the folder's `schedules/*.json`), which
      `generate --budget` runs where one has that mean and `--steps`.
  """

  name: str
  transformer: Any
  text_encoder: Any
  tokenizer: Any
  text_encoder_2: Any
  tokenizer_2: Any
  vae: Any
  template: TextTemplate = TextTemplate()
  shift: float = 7.0
  fps: int = 24
  defaults: HunyuanGenerationConfig = HunyuanGenerationConfig()
  default_prompt: str | None = None
  prediction: str = "velocity"
  vae_tiling: hunyuan_vae.VAETiling = hunyuan_vae.VAETiling(spatial=True)
  schedules: tuple[BudgetSchedule, ...] = ()

  def latent_shape(self, cfg) -> tuple[int, int, int, int]:
    """`(C, T, Y, X)` of the latents; GenerationError if the request does not fit the model."""
    s, ts = self.vae.config.spatial_compression_ratio, self.vae.config.temporal_compression_ratio
    pt, py, px = self.transformer.config.patch
    if cfg.height % (s * py) or cfg.width % (s * px):
      raise GenerationError(f"size {cfg.width}x{cfg.height} must be a multiple of {s * px}x"
                            f"{s * py} pixels for {self.name}")
    if (cfg.frames - 1) % (ts * pt):
      raise GenerationError(f"frames={cfg.frames} must be {ts * pt} k + 1 for {self.name}")
    return (self.transformer.config.in_channels, (cfg.frames - 1) // ts + 1, cfg.height // s,
            cfg.width // s)

  def num_tokens(self, cfg) -> int:
    _, t, y, x = self.latent_shape(cfg)
    pt, py, px = self.transformer.config.patch
    return (t // pt) * (y // py) * (x // px)

  def encode_text(self, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Prompts -> `(text [B, M, C_llm], text_mask [B, M] int32, pooled [B, C_clip])`."""
    tpl = self.template
    ids, mask = self.tokenizer([tpl.template.format(p) for p in prompts],
                               max_length=tpl.max_sequence_length + tpl.crop_start)
    graphdef, state = nnx.split(self.text_encoder)
    hidden = _llama_hidden(graphdef, state, jnp.asarray(ids), jnp.asarray(mask),
                           tpl.skip_layers)  # [B, S, C_llm]
    text = hidden[:, tpl.crop_start:].astype(self.transformer.config.dtype)
    text_mask = jnp.asarray(mask[:, tpl.crop_start:], jnp.int32)
    ids2, _ = self.tokenizer_2(list(prompts), max_length=CLIP_MAX_LENGTH)
    # diffusers calls CLIP without the attention mask (pooling still picks the end token).
    _, pooled = clip_text.encode_ids(self.text_encoder_2, ids2)
    return text, text_mask, pooled.astype(self.transformer.config.dtype)

  def decode(self, latents: jax.Array, *, progress: bool = False,
             devices: int | None = 1) -> jax.Array:
    """Latents `[B, C, T, Y, X]` -> video `[B, 3, F, H, W]` in about [-1, 1] (tiled as
    `vae_tiling` says; the tiles spread over `devices` of this host, None: every GPU)."""
    scaled = latents.astype(jnp.float32) / np.float32(self.vae.config.scaling_factor)
    count = default_num_devices() if devices is None else devices
    return hunyuan_vae.decode_tiled(self.vae, scaled, self.vae_tiling, progress=progress,
                                    devices=jax.local_devices()[:count])

  def generate(self, prompts: Sequence[str], cfg=None, *, schedule: BudgetSchedule | None = None,
               astraea: AstraeaConfig = AstraeaConfig(), progress: bool = True,
               noise: jax.Array | np.ndarray | None = None,
               devices: int | None = 1, method: Any = None) -> GenerationResult:
    """Generates one video per prompt (a batch), dense or with a token-budget schedule.

    `cfg`: a `HunyuanGenerationConfig` (or a `GenerationConfig`-like object with the same fields).
    `noise` `[B, C, T, Y, X]` replaces the seeded initial latents. `devices`: the devices the
    prompts are split over (`parallel.row_groups`; the guidance is embedded, so one row per
    prompt) and the VAE's tiles spread over; None: the most visible GPUs that split them evenly.
    `method`: only None (the peer methods build Wan step models).
    """
    cfg = self.defaults if cfg is None else cfg
    check_peer_method(self.name, method)
    prompts = check_request(prompts, cfg.steps, schedule)
    c, t, y, x = self.latent_shape(cfg)
    b = len(prompts)

    start = time.perf_counter()
    text, text_mask, pooled = jax.block_until_ready(self.encode_text(prompts))
    encode_seconds = time.perf_counter() - start

    shift = self.shift if cfg.shift is None else float(cfg.shift)
    scheduler = FlowEulerScheduler(FlowEulerConfig(sigma_schedule="hunyuan", shift=shift))
    state = scheduler.set_timesteps(cfg.steps)
    noise = initial_noise(noise, (b, c, t, y, x), cfg.seed)
    guidance = (jnp.full((b,), cfg.guidance * 1000.0, jnp.float32)
                if self.transformer.config.guidance_embeds else None)

    def make_step_model(model, text, text_mask, pooled, guidance):
      if schedule is None:
        return HunyuanDenseStepModel(model, text, text_mask, pooled, guidance)
      return HunyuanAstraeaStepModel(model, schedule, text, pooled, text_mask=text_mask,
                                     guidance=guidance, config=astraea)

    groups = row_groups(devices, b)  # one row per prompt: the guidance is embedded
    if groups == 1:
      step_model: Any = make_step_model(self.transformer, text, text_mask, pooled, guidance)
    else:
      step_model = split_rows(self.transformer, make_step_model,
                              (text, text_mask, pooled, guidance), groups)
    # The guidance is embedded: one forward per step, no cond/uncond pair.
    latents, _, stats = denoise(step_model, noise, scheduler, state, guidance_scale=1.0,
                                progress=progress, prediction=self.prediction)

    start = time.perf_counter()
    video = jax.block_until_ready(
        self.decode(latents, progress=progress, devices=devices))  # [B, 3, F, H, W]
    decode_seconds = time.perf_counter() - start
    frames = to_frames(video)  # [B, F, H, W, 3]
    records = getattr(step_model, "records", None)  # ASTRAEA's, not the dense model's
    return GenerationResult(frames, np.asarray(latents), stats, encode_seconds, decode_seconds,
                            self.num_tokens(cfg), schedule,
                            None if records is None else tuple(records),
                            (self.transformer.config.num_layers
                             + self.transformer.config.num_single_layers),
                            computed_fraction=computed_fraction(step_model, noise.shape, cfg.steps))

