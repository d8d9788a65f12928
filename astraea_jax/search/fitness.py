"""Fitness of budget schedules for the search (ASTRAEA, arXiv 2506.05096, Sec. 4), a whole
population per device call.

The fitness of a schedule is the MSE between the final latents it produces and the dense run's final
latents, for the same prompt and initial noise, averaged over the calibration prompts. The dense
latents are computed once per search. Calibration sample j is `(prompt_j, seed + j)`: its noise
is what `WanPipeline.generate([prompt_j], cfg with seed + j)` draws, so a candidate's result here
equals generating with that schedule alone.

Evaluating candidates one by one would cost the whole search (950 schedules in the paper's setting)
a Python loop of separate sampling runs. Here a chunk of candidates runs as ONE denoising loop whose
batch rows are the (candidate, prompt) pairs, the conditional half first and the unconditional half
second, as `astraea_jax.sampling.loop.denoise` arranges classifier-free guidance:

  rows [0, R): cond of (c, p) at row c * P + p; rows [R, 2R): the uncond rows in the same order.

At each step `PopulationStepModel` groups the rows by their token budget k (the candidates' thetas
at that step: at most 11 distinct values on the 0.1 grid), gathers each group's latents, text
embeddings and token-cache rows, pads the group to a bucket size (the next power of two, at least
`min_bucket`, so compiled programs are bounded by the (k, bucket) pairs), runs the jitted ASTRAEA
forward with that static k, and scatters the outputs and cache rows back. Every row selects its own
tokens, so grouping does not change a row's result. The guidance and the scheduler then advance all
rows at once. Step 0 is dense for every row (the token cache starts there). A theta = 0 group is a
whole-step cache hit, as in `AstraeaStepModel`: no block runs, only the head on the rows' last cached
block output, so searched schedules with zeros get step-cache speed in the search as in `generate`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import threading
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from astraea_jax.acceleration.astraea import astraea_forward, jit_astraea_step
from astraea_jax.acceleration.config import AstraeaConfig
from astraea_jax.acceleration.schedule import BudgetSchedule
from astraea_jax.acceleration.token_cache import TokenCache
from astraea_jax.data.clips import caption, sample_description
from astraea_jax.pipeline import DenseStepModel, GenerationConfig, WanPipeline
from astraea_jax.sampling.loop import denoise
from astraea_jax.sampling.schedulers import FlowEulerConfig, FlowUniPCConfig, make_scheduler

__all__ = [
    "CALIBRATION_SEED",
    "HELD_OUT_SEED",
    "PopulationFitness",
    "PopulationStepModel",
    "calibration_prompts",
    "held_out_prompts",
]

# Calibration and held-out prompts come from disjoint streams of the caption grammar.
CALIBRATION_SEED = 20_506
HELD_OUT_SEED = 50_962


def _grammar_prompts(num: int, seed: int, exclude: Sequence[str]) -> list[str]:
  if num < 1:
    raise ValueError(f"{num=} must be positive")
  rng = np.random.default_rng(seed)
  seen = set(exclude)
  prompts: list[str] = []
  for _ in range(1000 * num):
    text = caption(sample_description(rng))
    if text not in seen:
      seen.add(text)
      prompts.append(text)
      if len(prompts) == num:
        return prompts
  raise ValueError(f"the caption grammar gave fewer than {num} distinct prompts")


def calibration_prompts(num: int = 4, *, seed: int = CALIBRATION_SEED) -> list[str]:
  """`num` distinct captions of the procedural-clip grammar (the paper calibrates on 4 prompts)."""
  return _grammar_prompts(num, seed, ())


def held_out_prompts(num: int, *, exclude: Sequence[str] = (), seed: int = HELD_OUT_SEED
                     ) -> list[str]:
  """`num` distinct captions from another stream, none in `exclude` (the calibration set)."""
  return _grammar_prompts(num, seed, exclude)


# -- the population step model --------------------------------------------------------------------


def _bucket(rows: int, min_bucket: int, total: int, multiple: int = 1) -> int:
  """Padded group size: the next power of two (at least `min_bucket`, at most `total`), rounded up
  to a multiple of `multiple` (the device count, so that a group splits evenly over the devices)."""
  size = min(max(min_bucket, 1 << (rows - 1).bit_length()), total)
  return min(-(-size // multiple) * multiple, -(-total // multiple) * multiple)


def data_mesh(num_devices: int) -> jax.sharding.Mesh | None:
  """A 1-D mesh ("data",) over `num_devices` devices; None for one device of one process.

  One process: the first `num_devices` of `jax.devices()`. Several processes (`jax.distributed`):
  `num_devices` must be a multiple of the process count, and the mesh takes the first
  `num_devices / processes` local devices of every process, so that every process holds rows.
  """
  devices = jax.devices()
  visible = len(devices)
  if not 1 <= num_devices <= visible:
    raise ValueError(f"--devices {num_devices} must lie in [1, {visible}] (the visible devices)")
  processes = jax.process_count()
  if processes == 1:
    if num_devices == 1:
      return None
    chosen = devices[:num_devices]
  else:
    per = num_devices // processes
    local = [[d for d in devices if d.process_index == p] for p in range(processes)]
    if num_devices % processes or any(len(ds) < per for ds in local):
      raise ValueError(f"--devices {num_devices} must be a multiple of the {processes} processes "
                       f"and at most {visible} (all devices), as many from every process")
    chosen = [d for ds in local for d in ds[:per]]
  return jax.make_mesh((num_devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=chosen)


@functools.lru_cache(maxsize=64)
def _reshard_fn(sharding):
  return jax.jit(lambda a: a, out_shardings=sharding)


def _put_global(a, sharding):
  """`a` placed on a sharding that spans several processes. Every process passes the same value:
  host values (numpy, or arrays of this process's devices) become a global array through
  `jax.make_array_from_callback`; an array already spanning the processes is resharded by jit."""
  if isinstance(a, jax.Array) and not a.is_fully_addressable:
    return a if a.sharding == sharding else _reshard_fn(sharding)(a)
  if isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(_put_global(jax.random.key_data(a), sharding),
                                    impl=jax.random.key_impl(a))
  host = np.asarray(a)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(a) -> np.ndarray:
  """The value of a (possibly multi-process) array as numpy, the same on every process."""
  if isinstance(a, jax.Array) and not a.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(a, tiled=True))
  return np.asarray(a)


class _Placement:
  """Where the population arrays live: batch rows split over a data mesh, the rest replicated.

  A mesh over several processes places every process's identical host values as global arrays
  (`_put_global`); one process uses `jax.device_put`."""

  def __init__(self, mesh: jax.sharding.Mesh | None):
    self.mesh = mesh
    self.size = 1 if mesh is None else mesh.size
    self.multi_process = mesh is not None and jax.process_count() > 1
    if mesh is not None:
      self.rows0 = NamedSharding(mesh, PartitionSpec("data"))  # [B, ...]
      self.rows1 = NamedSharding(mesh, PartitionSpec(None, "data"))  # [L, B, ...]
      self.replicated = NamedSharding(mesh, PartitionSpec())

  def _put(self, tree, sharding):
    if not self.multi_process:
      return jax.device_put(tree, sharding)
    return jax.tree.map(lambda a: _put_global(a, sharding), tree)

  def rows(self, a):
    return a if self.mesh is None else self._put(a, self.rows0)

  def replicate(self, tree):
    return tree if self.mesh is None else self._put(tree, self.replicated)

  def cache(self, cache: TokenCache) -> TokenCache:
    if self.mesh is None:
      return cache
    put = lambda a: self._put(a, self.rows1)  # noqa: E731
    proj = None if cache.proj is None else self._put(cache.proj, self.replicated)
    return cache.replace(out=put(cache.out), in_ref=put(cache.in_ref), lse=put(cache.lse),
                         skips=put(cache.skips), proj=proj)

  @property
  def key(self):
    return None if self.mesh is None else (self.rows0, self.rows1)


def _group_step(graphdef, state, latents, timestep, context, cache, out, rows, *, num_selected,
                config):
  """The ASTRAEA forward with budget k on the batch rows `rows` `[G]` only (padded with row B')."""
  model = nnx.merge(graphdef, state)

  # Padding rows index past the batch: gathered as the last row (clip), dropped when scattered.
  def take(a, axis):
    return jnp.take(a, rows, axis=axis, mode="clip")

  def put(full, part, axis):
    at = (slice(None),) * axis + (rows,)
    return full.at[at].set(part.astype(full.dtype), mode="drop")

  if num_selected == 0:
    # A pure cache step (theta = 0) reads only the last block's cached output of these rows and
    # bumps their skip counters: the same result as `astraea_forward` with k = 0 (no block runs),
    # without gathering and scattering the rows' whole [L, G, N, ...] cache.
    _, cond = model.embed(take(latents, 0), take(timestep, 0), take(context, 0))
    y = model.head(take(cache.out[-1], 0), cond)  # [G, C_out, T, Y, X]
    return put(out, y, 0), cache.replace(skips=cache.skips.at[:, rows].add(1, mode="drop"))
  part = cache.replace(out=take(cache.out, 1), in_ref=take(cache.in_ref, 1),
                       lse=take(cache.lse, 1), skips=take(cache.skips, 1))  # [L, G, N, ...]
  y, part = astraea_forward(model, take(latents, 0), take(timestep, 0), take(context, 0), part,
                            num_selected=num_selected, config=config)  # y [G, C_out, T, Y, X]
  cache = cache.replace(out=put(cache.out, part.out, 1), in_ref=put(cache.in_ref, part.in_ref, 1),
                        lse=put(cache.lse, part.lse, 1), skips=put(cache.skips, part.skips, 1))
  return put(out, y, 0), cache


# Ahead-of-time compiled group steps: (jitted fn, k, bucket, latents shape, context shape) -> program.
_COMPILED: dict[tuple, object] = {}
_COMPILED_LOCK = threading.Lock()


@functools.lru_cache(maxsize=32)
def _jit_group_step(graphdef, config: AstraeaConfig):
  # One jitted function per model and config, shared by every chunk and generation of a search.
  return jax.jit(functools.partial(_group_step, graphdef, config=config),
                 static_argnames=("num_selected",), donate_argnames=("cache", "out"))


class PopulationStepModel:
  """`denoise` step model for a batch in which every row has its own token budget per step.

  Args:
    model: the Wan transformer.
    row_ks: `[B', T_s]` int, k of every batch row (in the loop's order) at every step; step 0 must
      be N for every row.
    context: `[B', M, text_dim]` text embeddings of the rows.
    config: scoring and cache options.
    min_bucket: smallest padded group size.
    compile_workers: threads that compile the missing (k, bucket) programs before step 1 (None:
      one per CPU core; 0: compile each on first use instead).
    compiler_options: XLA options for those ahead-of-time compiles, e.g.
      `{"xla_gpu_autotune_level": 0}` (no GPU kernel autotuning: much faster compiles).
    mesh: a 1-D ("data",) mesh (see `data_mesh`) whose devices split the batch rows (latents,
      context, token cache; the parameters replicated); None: one device. B' and every group
      bucket must then be multiples of its size.

  `self.variants` collects the (k, bucket) pairs run, each one compiled program;
  `self.token_rows` and `self.padded_token_rows` sum k over the real and the padding rows of every
  group after step 0 (their ratio is the compute spent on padding).
  """

  def __init__(self, model, row_ks: np.ndarray, context: jax.Array, *,
               config: AstraeaConfig = AstraeaConfig(), min_bucket: int = 8,
               compile_workers: int | None = None, compiler_options: dict | None = None,
               mesh: jax.sharding.Mesh | None = None):
    self._place = _Placement(mesh)
    self._graphdef, self._state = nnx.split(model)
    self._state = self._place.replicate(self._state)
    if context.shape[0] % self._place.size:
      raise ValueError(f"{context.shape[0]} batch rows do not split over {self._place.size} "
                       "devices")
    self.row_ks = np.asarray(row_ks, np.int64)
    if self.row_ks.ndim != 2 or self.row_ks.shape[0] != context.shape[0]:
      raise ValueError(f"row_ks of shape {self.row_ks.shape} must be [B', T_s] with B' = "
                       f"{context.shape[0]} context rows")
    if min_bucket < 1:
      raise ValueError(f"{min_bucket=} must be positive")
    self.context = self._place.rows(context)
    self.config = config
    self.min_bucket = min_bucket
    self.variants: set[tuple[int, int]] = set()
    self.token_rows = 0
    self.padded_token_rows = 0
    self.compiled_ahead = 0
    self.compile_ahead_seconds = 0.0
    self.compiler_options = dict(compiler_options or {})
    self.compile_workers = (os.cpu_count() or 1) if compile_workers is None else compile_workers
    self._first = jit_astraea_step(self._graphdef, config=config)
    self._group = _jit_group_step(self._graphdef, config)
    self._out_dtype = None

  def _groups(self, step_index: int) -> list[tuple[int, np.ndarray, int]]:
    """(k, rows, bucket) of every row group at a step after the first."""
    ks = self.row_ks[:, step_index]
    batch = ks.shape[0]
    out = []
    for k in np.unique(ks):
      rows = np.flatnonzero(ks == k)
      out.append((int(k), rows, _bucket(rows.size, self.min_bucket, batch, self._place.size)))
    return out

  def _key(self, k: int, bucket: int, latents: jax.Array) -> tuple:
    return (self._group, k, bucket, latents.shape, latents.dtype.name, self.context.shape,
            tuple(sorted(self.compiler_options.items())), self._place.key)

  def _compile_ahead(self, latents, timestep, carry, out) -> None:
    """Compiles, in parallel threads, every (k, bucket) program this chunk needs and lacks."""
    pairs = {(k, bucket) for s in range(1, self.row_ks.shape[1]) for k, _, bucket in self._groups(s)}
    with _COMPILED_LOCK:
      missing = sorted(p for p in pairs if self._key(*p, latents) not in _COMPILED)
    if not missing or self.compile_workers < 1:
      return

    def compile_one(pair):
      k, bucket = pair
      idx = self._place.replicate(jnp.zeros((bucket,), jnp.int32))
      program = self._group.lower(self._state, latents, timestep, self.context, carry, out, idx,
                                  num_selected=k).compile(
                                      compiler_options=self.compiler_options or None)
      with _COMPILED_LOCK:
        _COMPILED[self._key(k, bucket, latents)] = program

    start = time.perf_counter()
    workers = min(self.compile_workers, len(missing))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      for f in [pool.submit(compile_one, p) for p in missing]:
        f.result()
    self.compiled_ahead += len(missing)
    self.compile_ahead_seconds += time.perf_counter() - start

  def __call__(self, latents: jax.Array, timestep: jax.Array, carry: TokenCache | None,
               step_index: int) -> tuple[jax.Array, TokenCache]:
    step_index = int(step_index)
    batch = latents.shape[0]
    if batch != self.row_ks.shape[0]:
      raise ValueError(f"latents batch {batch} does not match {self.row_ks.shape[0]} rows")
    ks = self.row_ks[:, step_index]  # [B']
    timestep = self._place.replicate(jnp.broadcast_to(jnp.asarray(timestep, jnp.float32),
                                                      (batch,)))
    latents = self._place.rows(latents)
    if carry is None:
      tokens = int(ks.max())
      if step_index != 0 or ks.min() != tokens:
        raise ValueError("the first step of a run must be dense for every row")
      out, carry = self._first(self._state, latents, timestep, self.context, None,
                               num_selected=tokens)
      self._out_dtype = out.dtype
      return self._place.rows(out), self._place.cache(carry)
    # Every program is called with the shardings it was compiled for (rows split, rest replicated).
    out = self._place.rows(jnp.zeros(latents.shape, self._out_dtype))
    carry = self._place.cache(carry)
    if step_index == 1:
      self._compile_ahead(latents, timestep, carry, out)
    for k, rows, bucket in self._groups(step_index):
      idx = np.full((bucket,), batch, np.int32)
      idx[:rows.size] = rows
      self.variants.add((k, bucket))
      self.token_rows += k * rows.size
      self.padded_token_rows += k * (bucket - rows.size)
      with _COMPILED_LOCK:
        program = _COMPILED.get(self._key(k, bucket, latents))
      idx = self._place.replicate(jnp.asarray(idx))
      if program is not None:
        out, carry = program(self._state, latents, timestep, self.context, carry, out, idx)
      else:
        out, carry = self._group(self._state, latents, timestep, self.context, carry, out, idx,
                                 num_selected=k)
      out, carry = self._place.rows(out), self._place.cache(carry)
    return out, carry


# -- population fitness ---------------------------------------------------------------------------


@jax.jit
def _mse_per_candidate(final: jax.Array, dense: jax.Array) -> jax.Array:
  """final `[C * P, ...]` (candidate-major), dense `[P, ...]` -> MSE averaged over P, `[C]`."""
  prompts = dense.shape[0]
  diff = final.reshape(-1, prompts, *final.shape[1:]).astype(jnp.float32) - dense.astype(
      jnp.float32)[None]
  return jnp.mean(jnp.square(diff).reshape(diff.shape[0], -1), axis=-1)


def make_flow_scheduler(pipeline: WanPipeline, cfg: GenerationConfig):
  """The scheduler and its state that `WanPipeline.generate` uses for `cfg`."""
  shift = pipeline.default_shift if cfg.shift is None else cfg.shift
  sched_cfg = (FlowUniPCConfig if cfg.solver == "unipc" else FlowEulerConfig)(
      sigma_schedule=cfg.sigma_schedule, shift=shift)
  scheduler = make_scheduler(sched_cfg)
  return scheduler, scheduler.set_timesteps(cfg.steps)


@dataclasses.dataclass
class PopulationFitness:
  """Fitness of whole populations of schedules on calibration prompts (see the module docstring).

  Call it with thetas `[C, T_s]` (any C); it returns the MSE per candidate `[C]` (numpy float64).
  Candidates run `chunk` at a time (the last chunk padded with cache-only schedules, which cost
  almost nothing), so every device call has the same batch shape.

  Attributes:
    pipeline: the text-to-video pipeline (its transformer, text encoder and prediction type).
    prompts: P calibration prompts.
    cfg: size, frames, steps, guidance, solver; `cfg.seed + j` seeds prompt j's noise.
    chunk: candidates per denoising run (the batch holds `chunk * P` rows, twice with guidance).
    astraea: token scoring and cache options.
    min_bucket: smallest padded row group (see `PopulationStepModel`): larger means fewer compiled
      programs but more padding rows computed.
    dense: `[P, C, T, Y, X]` dense final latents, e.g. from a resumed search; computed if None.
    compile_workers: threads compiling a chunk's missing programs ahead of its loop (None: one
      per CPU core; 0: compile on first use).
    compiler_options: XLA options of those compiles (see `PopulationStepModel`).
    devices: devices (the first of `jax.devices()`; with several processes, as many of every
      process's, see `data_mesh`) whose data mesh splits the batch rows; the runs are padded with
      cache-only candidates so that the rows split evenly. The dense runs stay on one device (of
      every process; process 0's result is broadcast). With several processes every process must
      call it with the same values, and every process gets the same fitness.
  """

  pipeline: WanPipeline
  prompts: Sequence[str]
  cfg: GenerationConfig
  chunk: int = 30
  astraea: AstraeaConfig = AstraeaConfig()
  min_bucket: int = 8
  dense: np.ndarray | None = None
  compile_workers: int | None = None
  compiler_options: dict | None = None
  devices: int = 1

  def __post_init__(self):
    self.prompts = list(self.prompts)
    if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
      raise ValueError("every calibration prompt must be a non-empty string")
    if self.chunk < 1:
      raise ValueError(f"{self.chunk=} must be positive")
    self._place = _Placement(data_mesh(self.devices))
    pipe, cfg = self.pipeline, self.cfg
    self.latent_shape = pipe.latent_shape(cfg)  # (C, T, Y, X); GenerationError if not allowed
    self.num_tokens = pipe.num_tokens(cfg)
    self.use_cfg = cfg.guidance != 1.0
    self.scheduler, self.scheduler_state = make_flow_scheduler(pipe, cfg)
    num = len(self.prompts)
    # Noise of calibration sample j as `generate([prompt_j], seed=cfg.seed + j)` draws it.
    self.noise = jnp.concatenate([
        jax.random.normal(jax.random.key(cfg.seed + j), (1, *self.latent_shape), jnp.float32)
        for j in range(num)])  # [P, C, T, Y, X]
    cond = pipe.encode_text(self.prompts)  # [P, M, text_dim]
    uncond = pipe.encode_text([cfg.negative_prompt] * num) if self.use_cfg else None
    self._cond, self._uncond = cond, uncond
    # Candidates per run, padded so that the rows (run x P; each CFG half) split over the devices.
    self._run = self.chunk
    while (self._run * num) % self._place.size:
      self._run += 1
    halves = [jnp.tile(cond, (self._run, 1, 1))]  # [R, M, text_dim], candidate-major
    if self.use_cfg:
      halves.append(jnp.tile(uncond, (self._run, 1, 1)))
    self._context = self._place.rows(jnp.concatenate(halves, axis=0))  # [B', M, text_dim]
    self._rows_noise = self._place.rows(
        jnp.tile(self.noise, (self._run, 1, 1, 1, 1)))  # [R, C, T, Y, X]
    if self.dense is None:
      self.dense = self._dense_latents()
    elif tuple(np.shape(self.dense)) != (num, *self.latent_shape):
      raise ValueError(f"cached dense latents of shape {np.shape(self.dense)} do not match "
                       f"{(num, *self.latent_shape)}")
    self._dense_dev = self._place.replicate(jnp.asarray(self.dense))
    self.variants: set[tuple[int, int]] = set()
    self.compiled_ahead = 0
    self.compile_ahead_seconds = 0.0
    self.candidates_evaluated = 0
    self.token_rows = 0
    self.padded_token_rows = 0

  def _dense_latents(self) -> np.ndarray:
    context = self._cond if not self.use_cfg else jnp.concatenate([self._cond, self._uncond])
    latents, _, _ = denoise(DenseStepModel(self.pipeline.transformer, context), self.noise,
                            self.scheduler, self.scheduler_state, guidance_scale=self.cfg.guidance,
                            progress=False, prediction=self.pipeline.prediction)
    if self._place.multi_process:
      # Every process ran the same dense loop on its own device; process 0's result is the
      # reference everywhere, so that every process computes bit-identical fitness values.
      return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(latents)))
    return np.asarray(latents)

  def row_ks(self, thetas: np.ndarray) -> np.ndarray:
    """Thetas `[C, T_s]` -> k of every batch row and step `[B', T_s]`, as `generate` computes k."""
    ks = np.array([[BudgetSchedule(tuple(row)).num_selected(s, self.num_tokens)
                    for s in range(len(row))] for row in thetas], np.int64)  # [C, T_s]
    rows = np.repeat(ks, len(self.prompts), axis=0)  # [R, T_s]
    return np.concatenate([rows, rows]) if self.use_cfg else rows

  def final_latents(self, thetas) -> np.ndarray:
    """Final latents `[C, P, C_in, T, Y, X]` of every candidate and calibration prompt."""
    return np.concatenate(list(self._chunks(thetas, lambda latents, n: to_host(
        latents).reshape(self._run, len(self.prompts), *self.latent_shape)[:n])))

  def __call__(self, thetas) -> np.ndarray:
    return np.concatenate(list(self._chunks(thetas, lambda latents, n: to_host(
        _mse_per_candidate(latents, self._dense_dev)).astype(np.float64)[:n])))

  def _chunks(self, thetas, reduce):
    thetas = np.asarray(thetas, np.float64)
    if thetas.ndim != 2 or thetas.shape[1] != self.cfg.steps:
      raise ValueError(f"thetas of shape {thetas.shape} must be [C, steps={self.cfg.steps}]")
    # Padding candidates are dense at step 0 (as every row) and pure cache steps after it.
    pad = np.zeros((self.cfg.steps,), np.float64)
    for start in range(0, thetas.shape[0], self.chunk):
      part = thetas[start:start + self.chunk]
      n = part.shape[0]
      if n < self._run:
        part = np.concatenate([part, np.broadcast_to(pad, (self._run - n, self.cfg.steps))])
      step_model = PopulationStepModel(self.pipeline.transformer, self.row_ks(part),
                                       self._context, config=self.astraea,
                                       min_bucket=self.min_bucket,
                                       compile_workers=self.compile_workers,
                                       compiler_options=self.compiler_options,
                                       mesh=self._place.mesh)
      latents, _, _ = denoise(step_model, self._rows_noise, self.scheduler, self.scheduler_state,
                              guidance_scale=self.cfg.guidance, progress=False,
                              prediction=self.pipeline.prediction)
      self.variants |= step_model.variants
      self.compiled_ahead += step_model.compiled_ahead
      self.compile_ahead_seconds += step_model.compile_ahead_seconds
      self.token_rows += step_model.token_rows
      self.padded_token_rows += step_model.padded_token_rows
      self.candidates_evaluated += n
      yield reduce(latents, n)
