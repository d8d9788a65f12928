"""Training of the project's small text-to-video model on procedural clips.

`python -m astraea_jax.train`. The model (`astraea_jax.models.small_text_encoder.SmallVideoModel`: a
small text encoder and a pixel-space Wan2.1 transformer) learns rectified flow / flow matching with
Wan's conventions, so the project's flow-matching schedulers (`astraea_jax.sampling`, diffusers'
`prediction_type="flow_prediction"`) sample it as they sample Wan2.1:

  x_sigma = (1 - sigma) x0 + sigma noise,  timestep = 1000 sigma,  target v = noise - x0,

with sigma drawn logit-normally (Esser et al., "Scaling Rectified Flow Transformers", 2024) and then
shifted towards noise by `shift * s / (1 + (shift - 1) * s)`, the same shift the samplers apply. The
loss is on the velocity; a model whose transformer predicts the clean clip (`prediction="x0"`, the
"small" preset) reaches it through `output_to_velocity`, as sampling must too. Captions are dropped
(replaced by the empty prompt, the negative prompt of generation) with probability `text_dropout`,
for classifier-free guidance.

AdamW with linear warm-up and cosine decay, gradient clipping, bf16 compute on fp32 master weights,
and an EMA of the parameters, which is what gets exported for inference. The step is one `jax.jit`
over the split parameter state (not `nnx.jit`, which would copy the parameters) with the state
donated, data-parallel over the visible devices (the batch axis is sharded, parameters replicated).
Clips are described on the host (`astraea_jax.data.sample_descriptions`, in a background thread or
in `--data-workers` processes) and rendered on the device inside the step.

Everything is a function of `(seed, step)`: the batch of step i comes from `default_rng([seed, i])`,
the noise and sigmas from `fold_in(key(seed), i)`. A resumed run (`--resume`) therefore continues
exactly where an uninterrupted one would be. Orbax checkpoints (atomic) are written every
`--save-every` steps, at the end, and before `--time-limit` runs out; each call also exports the EMA
parameters to `OUT/model/` (`load_small_model` reads it).

  python -m astraea_jax.train --out outputs/small --steps 12000 --time-limit 540 --data-workers 4
  python -m astraea_jax.train --out outputs/small --resume --time-limit 540 --data-workers 4
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import functools
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from astraea_jax.data import clips
from astraea_jax.models.small_text_encoder import (PREDICTIONS, SmallVideoConfig, SmallVideoModel,
                                                   load_small_model, save_small_model)
from astraea_jax.models.word_tokenizer import WordTokenizer

__all__ = ["Batch", "TrainConfig", "TrainState", "Trainer", "flow_matching_loss", "host_batch",
           "main", "make_optimizer", "sample_sigmas"]

F32 = jnp.float32
CHECKPOINT_DIR = "checkpoints"
EXPORT_DIR = "model"
LOG_FILE = "train_log.jsonl"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Hyper-parameters of a training run (stored in every checkpoint).

  Attributes:
    preset: `SMALL_VIDEO_PRESETS` name of the model.
    steps: total optimizer steps (the cosine schedule ends there).
    batch_size: global batch (split over the devices).
    lr, warmup_steps, min_lr_ratio: peak learning rate, linear warm-up, final lr / peak.
    weight_decay: AdamW decay of the matrices and embeddings (not of norms, biases, tables).
    beta1, beta2, grad_clip: Adam moments and the global gradient-norm clip.
    ema_decay: EMA of the parameters (warmed up as min(decay, (1 + n) / (10 + n))).
    text_dropout: probability of training a clip with the empty prompt.
    logit_mean, logit_std, shift: sigma = shift'(sigmoid(N(logit_mean, logit_std))). A prompt's
      direction of motion matters only near sigma = 1: a 64x64 clip shows its moving object
      already at sigma ~0.95, and at the defaults 0.3% of samples lie above 0.98. The shipped model
      learned "left" from "right" only in a warm-started call at logit_mean 1.5, logit_std 1.2
      (14% above 0.98; benchmarks/results/train_small-*.json).
    prediction: overrides the preset's `SmallVideoConfig.prediction` ("velocity" or "x0"; None
      keeps it). The loss is on the velocity either way.
    attention: attention implementation while training ("xla" or "cudnn"; None: cuDNN on GPUs,
      XLA elsewhere). It must be differentiable, so not the forward-only Pallas kernel that
      inference picks on Hopper; exported models keep the preset's choice.
    max_objects: 1 or 2 objects per clip.
    seed: seeds the data, the noise and the initialisation.
    save_every: checkpoint interval in steps.
    devices: number of devices for data parallelism (0: all visible ones).
    overfit: train on the batch of step 0 at every step (a debugging aid).
  """
  preset: str = "small"
  steps: int = 12000
  batch_size: int = 128
  lr: float = 3e-4
  warmup_steps: int = 500
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.01
  beta1: float = 0.9
  beta2: float = 0.99
  grad_clip: float = 1.0
  ema_decay: float = 0.999
  text_dropout: float = 0.1
  logit_mean: float = 0.0
  logit_std: float = 1.0
  shift: float = 3.0
  prediction: str | None = None
  attention: str | None = None
  max_objects: int = 2
  seed: int = 0
  save_every: int = 1000
  devices: int = 0
  overfit: bool = False

  def __post_init__(self):
    SmallVideoConfig.preset(self.preset)  # ValueError for an unknown preset
    for name in ("steps", "batch_size", "save_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be positive")
    if self.warmup_steps < 0 or self.devices < 0:
      raise ValueError(f"warmup_steps={self.warmup_steps} and devices={self.devices} must be >= 0")
    if not self.lr > 0:
      raise ValueError(f"lr={self.lr} must be positive")
    for name in ("ema_decay", "text_dropout", "min_lr_ratio", "beta1", "beta2"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"{name}={getattr(self, name)} must lie in [0, 1]")
    if not (self.shift > 0 and self.logit_std > 0 and self.grad_clip > 0):
      raise ValueError(f"shift={self.shift}, logit_std={self.logit_std} and "
                       f"grad_clip={self.grad_clip} must be positive")
    if self.max_objects not in (1, 2):
      raise ValueError(f"max_objects={self.max_objects} must be 1 or 2")
    if self.attention not in (None, "xla", "cudnn"):
      raise ValueError(f"attention={self.attention!r} must be 'xla' or 'cudnn'")
    if self.prediction not in (None, *PREDICTIONS):
      raise ValueError(f"prediction={self.prediction!r} must be one of {PREDICTIONS}")

  @property
  def model_config(self) -> SmallVideoConfig:
    config = SmallVideoConfig.preset(self.preset)
    return config.replace(prediction=self.prediction) if self.prediction else config

  @property
  def clip_config(self) -> clips.ClipConfig:
    m = self.model_config
    return clips.ClipConfig(frames=m.frames, height=m.height, width=m.width,
                            max_objects=self.max_objects)


# Fields that may change when a run is resumed; the rest must match the checkpoint.
RESUMABLE_OVERRIDES = ("steps", "save_every", "devices", "attention")


class Batch(NamedTuple):
  """One host batch: the clips' render parameters and the caption tokens `[B, M]`."""
  clip: clips.ClipParams
  input_ids: np.ndarray
  attention_mask: np.ndarray


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint holds besides the config: step, parameters, Adam state, EMA."""
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any  # pure dict of fp32 parameters
  opt_state: Any
  ema: Any  # pure dict, same structure as params


def sample_sigmas(key: jax.Array, batch: int, *, logit_mean: float = 0.0, logit_std: float = 1.0,
                  shift: float = 1.0) -> jax.Array:
  """`[B]` flow-matching noise levels in (0, 1): shifted logit-normal samples."""
  s = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(key, (batch,), F32))
  return shift * s / (1.0 + (shift - 1.0) * s)


def host_batch(config: TrainConfig, step: int, tokenizer: WordTokenizer) -> Batch:
  """The batch of optimizer step `step` (a pure function of the seed and the step)."""
  data_step = 0 if config.overfit else step
  rng = np.random.default_rng([config.seed, data_step])
  clip_cfg = config.clip_config
  descriptions = clips.sample_descriptions(rng, config.batch_size, clip_cfg)
  captions = [d.caption for d in descriptions]
  drop = rng.random(config.batch_size) < config.text_dropout
  captions = ["" if d else c for c, d in zip(captions, drop)]
  ids, mask = tokenizer(captions, max_length=config.model_config.text.max_length)
  return Batch(clips.clip_params(descriptions, clip_cfg.max_objects), ids, mask)


def _decay_mask(params: Any) -> Any:
  # Weight decay for projection matrices and embedding tables only.
  def keep(path, _):
    name = str(getattr(path[-1], "key", path[-1]))
    return name in ("kernel", "embedding", "position_embedding")
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(config: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
  warmup = min(config.warmup_steps, config.steps)
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.lr, warmup_steps=warmup,
      decay_steps=max(config.steps, warmup + 1), end_value=config.lr * config.min_lr_ratio)
  tx = optax.chain(
      optax.clip_by_global_norm(config.grad_clip),
      optax.adamw(schedule, b1=config.beta1, b2=config.beta2, weight_decay=config.weight_decay,
                  mask=_decay_mask))
  return tx, schedule


def flow_matching_loss(predict: Callable[..., jax.Array], batch: Batch, key: jax.Array, *,
                       clip_shape: tuple[int, int, int], logit_mean: float = 0.0,
                       logit_std: float = 1.0, shift: float = 1.0) -> jax.Array:
  """Renders the batch's clips and returns the mean squared error of the predicted velocity.

  Args:
    predict: `(x_t [B, 3, T, Y, X], timestep [B], input_ids [B, M], attention_mask [B, M])` ->
      velocity `[B, 3, T, Y, X]` (e.g. a `SmallVideoModel`); the timestep is `1000 sigma`, as
      Wan's schedulers feed it.
    batch: clips and tokens of one batch.
    key: draws the noise and the sigmas.
    clip_shape: `(T, Y, X)` of the clips.
    logit_mean, logit_std, shift: the sigma distribution (`sample_sigmas`).
  """
  k_noise, k_sigma = jax.random.split(key)
  videos = clips.render(batch.clip, *clip_shape, xp=jnp)  # [B, T, Y, X, 3]
  x0 = jnp.moveaxis(videos, -1, 1)  # [B, 3, T, Y, X]
  noise = jax.random.normal(k_noise, x0.shape, F32)
  sigma = sample_sigmas(k_sigma, x0.shape[0], logit_mean=logit_mean, logit_std=logit_std,
                        shift=shift)  # [B]
  s = sigma[:, None, None, None, None]
  x_t = (1.0 - s) * x0 + s * noise
  pred = predict(x_t, 1000.0 * sigma, batch.input_ids, batch.attention_mask).astype(F32)
  return jnp.mean(jnp.square(pred - (noise - x0)))


@functools.lru_cache(maxsize=8)
def _init_function(config: TrainConfig, mesh: Mesh):
  """`(graphdef, init)`: `init()` builds the initial `TrainState`, replicated over `mesh`, in one
  compiled program (built eagerly, every initializer would compile on its own)."""
  model_config = config.model_config.replace(wan={"attention_impl": training_attention(config)})

  def build() -> SmallVideoModel:
    model = SmallVideoModel(model_config, rngs=nnx.Rngs(config.seed))
    model.zero_init_outputs()
    return model

  graphdef, _, rest = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ValueError("the model holds state other than parameters; the trainer cannot carry it")
  tx, _ = make_optimizer(config)

  def init() -> TrainState:
    params = nnx.to_pure_dict(nnx.state(build(), nnx.Param))
    with jax.numpy_dtype_promotion("standard"):
      opt_state = tx.init(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                      ema=jax.tree.map(jnp.copy, params))

  return graphdef, jax.jit(init, out_shardings=NamedSharding(mesh, P()))


@functools.lru_cache(maxsize=8)
def _step_functions(config: TrainConfig, graphdef: nnx.GraphDef, mesh: Mesh):
  """The jitted train step and loss of a run; cached, so runs of one config share compilations."""
  tx, schedule = make_optimizer(config)
  replicated = NamedSharding(mesh, P())
  m = config.model_config

  def loss_fn(params, batch: Batch, key: jax.Array) -> jax.Array:
    return flow_matching_loss(nnx.merge(graphdef, params), batch, key,
                              clip_shape=(m.frames, m.height, m.width),
                              logit_mean=config.logit_mean, logit_std=config.logit_std,
                              shift=config.shift)

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    key = jax.random.fold_in(jax.random.key(config.seed), state.step)
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, key)
    # optax mixes Python floats with its int32 step count, which strict dtype promotion rejects.
    with jax.numpy_dtype_promotion("standard"):
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      lr = schedule(state.step)
    params = optax.apply_updates(state.params, updates)
    n = state.step.astype(F32)
    decay = jnp.minimum(jnp.asarray(config.ema_decay, F32), (1.0 + n) / (10.0 + n))
    ema = jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), state.ema, params)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics

  step_fn = jax.jit(train_step, donate_argnums=0, out_shardings=(replicated, replicated))
  return step_fn, jax.jit(loss_fn)


_WORKER: dict[str, Any] = {}


def _worker_init(config: TrainConfig) -> None:
  # Data workers only run numpy; keep any jax use in them off the accelerator.
  os.environ["JAX_PLATFORMS"] = "cpu"
  _WORKER["config"] = config
  _WORKER["tokenizer"] = WordTokenizer.for_captions(max_length=config.model_config.text.max_length)


def _worker_batch(step: int) -> Batch:
  return host_batch(_WORKER["config"], step, _WORKER["tokenizer"])


class _Prefetcher:
  """Builds the host batches of steps `start, start + 1, ...` ahead of the training loop.

  With `workers = 0` one background thread builds them; otherwise a pool of that many processes
  (started with "spawn", so that they inherit no accelerator state) does. Each batch is a pure
  function of its step, so both give the same stream.
  """

  def __init__(self, config: TrainConfig, tokenizer: WordTokenizer, start: int, stop: int, *,
               workers: int = 0, depth: int = 4):
    self._next, self._stop_step = start, stop
    self._pending: collections.deque = collections.deque()
    if workers > 0:
      self._pool = concurrent.futures.ProcessPoolExecutor(
          workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
          initargs=(config,))
      self._submit = lambda step: self._pool.submit(_worker_batch, step)
      depth = max(depth, 2 * workers)
    else:
      self._pool = concurrent.futures.ThreadPoolExecutor(1)
      self._submit = lambda step: self._pool.submit(host_batch, config, step, tokenizer)
    self._depth = depth
    self._fill()

  def _fill(self) -> None:
    while len(self._pending) < self._depth and self._next < self._stop_step:
      self._pending.append((self._next, self._submit(self._next)))
      self._next += 1

  def get(self) -> tuple[int, Batch]:
    step, future = self._pending.popleft()
    self._fill()
    return step, future.result()

  def close(self) -> None:
    for _, future in self._pending:
      future.cancel()
    self._pool.shutdown(wait=True, cancel_futures=True)


def training_attention(config: TrainConfig) -> str:
  """The attention implementation of the training step (see `TrainConfig.attention`)."""
  if config.attention is not None:
    return config.attention
  return "cudnn" if jax.default_backend() == "gpu" else "xla"


def _data_mesh(config: TrainConfig) -> Mesh:
  """A 1D mesh ("data") over the first `config.devices` devices (all if 0)."""
  devices = jax.devices()
  n = config.devices or len(devices)
  if n > len(devices):
    raise ValueError(f"devices={n} but only {len(devices)} are visible")
  if config.batch_size % n:
    raise ValueError(f"batch_size={config.batch_size} must be a multiple of the {n} devices")
  return Mesh(np.asarray(devices[:n]), ("data",))


class Trainer:
  """A training run in `out_dir`: state, jitted step, checkpoints, export.

  Args:
    config: the run's hyper-parameters (with `resume`, checked against the checkpoint's).
    out_dir: the run folder (checkpoints/, model/, train_log.jsonl).
    resume: continue from the latest checkpoint in `out_dir` if there is one.
  """

  def __init__(self, config: TrainConfig, out_dir: str | os.PathLike, *, resume: bool = False,
               init_from: str | os.PathLike | None = None):
    _data_mesh(config)  # device and batch errors before anything is written
    self.out = Path(out_dir).absolute()
    self.out.mkdir(parents=True, exist_ok=True)
    self._manager = ocp.CheckpointManager(
        self.out / CHECKPOINT_DIR,
        options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False,
                                             create=True))
    latest = self._manager.latest_step()
    if latest is not None and not resume:
      raise FileExistsError(f"{str(self.out)!r} already holds checkpoints (step {latest}); pass "
                            f"--resume to continue, or choose another --out")
    if latest is not None:
      config = self._merge_stored_config(config, latest)
    self.config = config
    self.model_config = config.model_config
    self.tokenizer = WordTokenizer.for_captions(max_length=self.model_config.text.max_length)
    if self.tokenizer.vocab_size != self.model_config.text.vocab_size:
      raise ValueError(f"preset {config.preset!r} has a {self.model_config.text.vocab_size}-token "
                       f"text encoder; the caption tokenizer has {self.tokenizer.vocab_size}")

    self.mesh = _data_mesh(config)
    self._replicated = NamedSharding(self.mesh, P())
    self._sharded = NamedSharding(self.mesh, P("data"))

    self.graphdef, init = _init_function(config, self.mesh)
    self.state = init()
    if latest is not None:
      self._restore(latest)
    elif init_from is not None:
      self._warm_start(init_from)
    self._step_fn, self._loss_fn = _step_functions(config, self.graphdef, self.mesh)

  def _warm_start(self, path: str | os.PathLike) -> None:
    # Parameters and EMA from an exported model; fresh optimizer moments and schedule. This lets a
    # run continue on a new machine from the exported EMA weights (28 MB) instead of the resumable
    # checkpoint with its Adam state (~200 MB). A source without frame embeddings may start a run
    # that has them: they keep their zero initialisation, so the run starts from the source's
    # function.
    model, _ = load_small_model(path)
    target = self.model_config.replace(wan={"dtype": "float32", "param_dtype": "float32"},
                                       text={"dtype": "float32", "param_dtype": "float32"})
    source = model.config
    if source.wan.num_frame_embeddings == 0:
      source = source.replace(wan={"num_frame_embeddings": target.wan.num_frame_embeddings})
    if source.to_dict() != target.to_dict():
      raise ValueError(f"{str(path)!r} holds a model of another configuration than preset "
                       f"{self.config.preset!r}")
    source_params = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    params = traverse_util.unflatten_dict({
        path_: jax.device_put(jnp.asarray(source_params.get(path_, initial), initial.dtype),
                              initial.sharding)
        for path_, initial in traverse_util.flatten_dict(self.state.params).items()})
    ema = jax.tree.map(jnp.copy, params)
    self.state = self.state.replace(params=params, ema=ema)

  # -- configuration ---------------------------------------------------------------------------

  def _merge_stored_config(self, config: TrainConfig, step: int) -> TrainConfig:
    meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    stored = TrainConfig(**meta["train_config"])
    changed = {f.name for f in dataclasses.fields(TrainConfig)
               if getattr(config, f.name) != getattr(stored, f.name)}
    bad = sorted(changed - set(RESUMABLE_OVERRIDES))
    if bad:
      raise ValueError("--resume with settings that differ from the checkpoint's: "
                       + ", ".join(f"{k}={getattr(config, k)!r} (stored "
                                   f"{getattr(stored, k)!r})" for k in bad))
    if "steps" in changed:
      warnings.warn(f"steps changed from {stored.steps} to {config.steps}: the learning-rate "
                    f"schedule changes from here on", stacklevel=2)
    return config

  # -- the step --------------------------------------------------------------------------------

  @property
  def step(self) -> int:
    return int(self.state.step)

  def device_batch(self, batch: Batch) -> Batch:
    return jax.device_put(batch, self._sharded)

  def train_step(self, batch: Batch) -> dict[str, jax.Array]:
    """One optimizer step on a host batch; returns its metrics (device arrays)."""
    self.state, metrics = self._step_fn(self.state, self.device_batch(batch))
    return metrics

  def eval_loss(self, batch: Batch, *, seed: int = 0, ema: bool = False) -> float:
    """The flow-matching loss of the current (or EMA) parameters on `batch`, noise from `seed`."""
    params = self.state.ema if ema else self.state.params
    return float(self._loss_fn(params, self.device_batch(batch), jax.random.key(seed)))

  def batch(self, step: int) -> Batch:
    return host_batch(self.config, step, self.tokenizer)

  # -- checkpoints -----------------------------------------------------------------------------

  def _restore(self, step: int) -> None:
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    self.state = restored.state
    if self.step != step:
      raise ValueError(f"checkpoint {step} holds step {self.step}")

  def save(self) -> None:
    """Writes a checkpoint of the current step (atomically; a no-op if it exists)."""
    step = self.step
    if step in self._manager.all_steps():
      return
    meta = {"train_config": dataclasses.asdict(self.config),
            "model_config": self.model_config.to_dict(), "step": step}
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(self.state),
                                                     meta=ocp.args.JsonSave(meta)), force=True)
    self._manager.wait_until_finished()

  def export(self, path: str | os.PathLike | None = None, *, storage: str = "bfloat16") -> Path:
    """Writes the EMA parameters as an inference checkpoint (default `OUT/model`), replacing it."""
    final = Path(path) if path is not None else self.out / EXPORT_DIR
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
      shutil.rmtree(tmp)
    save_small_model(tmp, self.state.ema, self.model_config, self.tokenizer, storage=storage,
                     extra={"train_step": self.step,
                            "train_config": dataclasses.asdict(self.config),
                            "sample_shift": self.config.shift})
    if final.exists():
      shutil.rmtree(final)
    tmp.rename(final)
    return final

  def close(self) -> None:
    self._manager.close()

  # -- the loop --------------------------------------------------------------------------------

  def run(self, *, time_limit: float | None = None, stop_at: int | None = None,
          log_every: int = 50, progress: bool = True, started: float | None = None,
          export: bool = True, data_workers: int = 0) -> int:
    """Trains until `config.steps` (or `stop_at`), or until `time_limit` seconds after `started`
    would be exceeded; saves a checkpoint (and exports) at the end. Returns the step reached.

    `data_workers` processes build the host batches (0: one background thread).
    """
    started = time.monotonic() if started is None else started
    target = self.config.steps if stop_at is None else min(stop_at, self.config.steps)
    start = self.step
    if start >= target:
      return start
    prefetch = _Prefetcher(self.config, self.tokenizer, start, target, workers=data_workers)
    log = (self.out / LOG_FILE).open("a")
    bar = tqdm(total=target, initial=start, unit="step", disable=not progress, dynamic_ncols=True,
               desc="train")
    # Until a save is measured: a guess from the bytes of parameters, EMA and Adam moments.
    nbytes = sum(x.nbytes for x in jax.tree.leaves(self.state))
    save_seconds = 2.0 + nbytes / 100e6
    step_seconds: list[float] = []
    pending: list[tuple[int, dict]] = []
    in_flight = None
    try:
      while self.step < target:
        if time_limit is not None and len(step_seconds) > 1:
          # The first step's time is mostly compilation; the final save also exports the EMA.
          per_step = float(np.median(step_seconds[1:][-20:]))
          reserve = 2.0 * per_step + 2.0 * save_seconds + 5.0
          if time.monotonic() - started + reserve > time_limit:
            bar.write(f"time limit: stopping at step {self.step} of {self.config.steps}; "
                      f"continue with --resume")
            break
        tick = time.monotonic()
        data_step, batch = prefetch.get()
        if data_step != self.step:
          raise RuntimeError(f"data for step {data_step} arrived at step {self.step}")
        metrics = self.train_step(batch)
        pending.append((self.step, metrics))
        if self.step % log_every == 0 or self.step == target:
          rows = [(s, jax.device_get(m)) for s, m in pending]
          pending.clear()
          for s, m in rows:
            log.write(json.dumps({"step": s, **{k: float(v) for k, v in m.items()}}) + "\n")
          log.flush()
          last = rows[-1][1]
          if not math.isfinite(float(last["loss"])):
            raise FloatingPointError(f"loss is {float(last['loss'])} at step {self.step}")
          bar.set_postfix(loss=f"{float(np.mean([float(m['loss']) for _, m in rows])):.4f}",
                          lr=f"{float(last['lr']):.2e}")
        elif in_flight is not None:
          # One step stays queued behind the running one, so the device never waits for the host.
          jax.block_until_ready(in_flight)
        in_flight = metrics["loss"]
        step_seconds.append(time.monotonic() - tick)
        bar.update(1)
        if self.step % self.config.save_every == 0 and self.step < target:
          tick = time.monotonic()
          self.save()
          save_seconds = time.monotonic() - tick
    finally:
      bar.close()
      prefetch.close()
      for s, m in pending:
        log.write(json.dumps({"step": s, **{k: float(v) for k, v in jax.device_get(m).items()}})
                  + "\n")
      log.close()
    self.save()
    if export:
      self.export()
    return self.step


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
  defaults = TrainConfig()
  p = argparse.ArgumentParser(
      prog="python -m astraea_jax.train",
      description="Train the project's small text-to-video model on procedural clips.")
  p.add_argument("--out", required=True, help="run folder (checkpoints/, model/, train_log.jsonl)")
  p.add_argument("--resume", action="store_true",
                 help="continue from the latest checkpoint in --out (if any)")
  p.add_argument("--init-from", default=None, metavar="MODEL_DIR",
                 help="start a new run from an exported model's weights (fresh optimizer state)")
  p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                 help="save and exit before this many seconds have passed since start")
  p.add_argument("--log-every", type=int, default=50, help="steps between loss readouts")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument("--data-workers", type=int, default=0,
                 help="processes that build host batches (0: one background thread)")
  p.add_argument("--compile-cache", default=None,
                 help="persistent XLA compilation cache (default OUT/jax_cache; 'none': off)")
  flags = {
      "preset": str, "steps": int, "batch_size": int, "lr": float, "warmup_steps": int,
      "min_lr_ratio": float, "weight_decay": float, "beta1": float, "beta2": float,
      "grad_clip": float, "ema_decay": float, "text_dropout": float, "logit_mean": float,
      "logit_std": float, "shift": float, "prediction": str, "attention": str,
      "max_objects": int, "seed": int, "save_every": int, "devices": int,
  }
  helps = {"prediction": "velocity | x0 (default: the preset's)",
           "attention": "xla | cudnn (default: cudnn on GPUs, xla elsewhere)",
           "devices": "data-parallel devices (default 0: all)"}
  for name, kind in flags.items():
    # None marks "not given", so that --resume can tell a changed setting from a default.
    p.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                   help=helps.get(name, f"default {getattr(defaults, name)!r}"))
  p.add_argument("--overfit", action="store_true", default=None,
                 help="train on one fixed batch (debugging)")
  return p.parse_args(argv)


def _config_from_args(args: argparse.Namespace, out: Path) -> TrainConfig:
  given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
           if getattr(args, f.name, None) is not None}
  base = TrainConfig()
  if args.resume:
    # Settings not given on the command line come from the checkpoint, so `--resume` alone works.
    manager = ocp.CheckpointManager(out / CHECKPOINT_DIR,
                                    options=ocp.CheckpointManagerOptions(create=False))
    latest = manager.latest_step() if (out / CHECKPOINT_DIR).is_dir() else None
    if latest is not None:
      meta = manager.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
      base = TrainConfig(**meta["train_config"])
    manager.close()
  return dataclasses.replace(base, **given)


def main(argv: list[str] | None = None) -> int:
  started = time.monotonic()
  args = _parse_args(argv)
  out = Path(args.out)
  if args.log_every < 1 or args.data_workers < 0:
    print(f"error: --log-every={args.log_every} must be positive and --data-workers="
          f"{args.data_workers} >= 0", file=sys.stderr)
    return 2
  cache = args.compile_cache or str(out.absolute() / "jax_cache")
  if cache != "none":
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  try:
    config = _config_from_args(args, out)
    trainer = Trainer(config, out, resume=args.resume, init_from=args.init_from)
  except (ValueError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  n_params = sum(int(np.size(x)) for x in jax.tree.leaves(trainer.state.params))
  print(f"model {config.preset}: {n_params / 1e6:.1f}M parameters, "
        f"{trainer.model_config.num_tokens} tokens per clip; batch {config.batch_size} on "
        f"{trainer.mesh.size} device(s) ({jax.devices()[0].device_kind}); "
        f"step {trainer.step} of {config.steps}", flush=True)
  try:
    step = trainer.run(time_limit=args.time_limit, log_every=args.log_every,
                       progress=not args.no_progress, started=started,
                       data_workers=args.data_workers)
  finally:
    trainer.close()
  done = "done" if step >= config.steps else "paused (rerun with --resume)"
  print(f"step {step} of {config.steps}: {done}; EMA weights in {out / EXPORT_DIR}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
