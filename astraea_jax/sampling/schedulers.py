"""Flow-matching samplers for Wan2.1: UniPC multistep (data prediction, B(h)) and flow Euler.

UniPC: Zhao et al., "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models", NeurIPS 2023 (arXiv 2302.04867). This ports diffusers'
`UniPCMultistepScheduler` as Wan2.1's diffusers pipeline configures it
(`prediction_type="flow_prediction"`, `use_flow_sigmas=True`, `predict_x0=True`,
`lower_order_final=True`), which is also the update of the original Wan2.1
`FlowUniPCMultistepScheduler` (wan/utils/fm_solvers_unipc.py in Wan-Video/Wan2.1).

Flow matching: `x_sigma = (1 - sigma) * x_0 + sigma * noise`; the model predicts the velocity
`v = noise - x_0`, so its data prediction is `x_0 = x - sigma * v`. In the half log-SNR
`lambda = log((1 - sigma) / sigma)`, one UniPC step from sigma_s to sigma_t
(h = lambda_t - lambda_s) is an exponential integrator on the data predictions m_i:

  predictor  x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) m_s - alpha_t B(h) sum_k rho_k D_k
  corrector  the same step redone once m_t is known, with one more difference term (UniC)

where D_k = (m_{s-k} - m_s) / r_k are scaled differences of earlier data predictions and
B(h) = -h (bh1) or e^-h - 1 (bh2). Every coefficient depends on the sigma schedule only, so
`set_timesteps` computes them on the host in float64 and `step` reduces to fixed linear
combinations of the sample, the previous corrected sample and the last `solver_order` data
predictions: it runs under `jax.jit`, `lax.scan` or `lax.fori_loop` with a traced step index.

Details that follow diffusers exactly: the order-2 predictor uses rho = 0.5 instead of solving for
it; the order ramps up over the first steps and down over the last ones (the final step, to
sigma = 0, is first order and returns the data prediction). One that does not: with bh1, diffusers
computes that final step as `-inf * 0` and returns NaN; this scheduler returns its limit, the data
prediction, as with bh2.

Sigma schedules (`sigma_schedule`), both shifted by `shift * s / (1 + (shift - 1) * s)`:
  "diffusers"  `linspace(1, 1/T, N+1)[:-1]`, the first value lowered by 1e-6 if it is 1 (diffusers)
  "wan"        `linspace(float32(1 - 1/T), 0, N+1)[:-1]` (original Wan repository)
with a final sigma of 0 appended. The model is fed the integer timestep `int(sigma * T)` (truncated,
as both references cast to int64), exposed as `state.timesteps[i]` in float32.

Flow Euler is the first-order step `x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v` on the same
schedules.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal, Protocol

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "EULER_PRESETS",
    "FlowEulerConfig",
    "FlowEulerScheduler",
    "FlowScheduler",
    "FlowUniPCConfig",
    "FlowUniPCScheduler",
    "SchedulerState",
    "UNIPC_PRESETS",
    "flow_sigmas",
    "make_scheduler",
]

SigmaSchedule = Literal["diffusers", "wan", "hunyuan"]
_SIGMA_SCHEDULES = ("diffusers", "wan", "hunyuan")
_SOLVER_TYPES = ("bh1", "bh2")
_MAX_ORDER = 3


def flow_sigmas(num_steps: int, *, sigma_schedule: SigmaSchedule = "diffusers", shift: float = 1.0,
                num_train_timesteps: int = 1000) -> tuple[np.ndarray, np.ndarray]:
  """The sigma schedule of `num_steps` flow-matching steps and the model's timesteps.

  Returns `(sigmas, timesteps)`: sigmas `[N+1]` float32 (decreasing, the last one 0) and timesteps
  `[N]` int64, `int(sigma * num_train_timesteps)` taken in float64 before the float32 cast, exactly
  as diffusers' `UniPCMultistepScheduler.set_timesteps` (or Wan's) computes them. "hunyuan":
  `linspace(1, 0)` shifted in float32, timesteps `sigma * T` float32 unrounded (diffusers'
  `HunyuanVideoPipeline` with `FlowMatchEulerDiscreteScheduler`).
  """
  _check_schedule(sigma_schedule, shift, num_train_timesteps)
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
    raise TypeError(f"num_steps must be an int, got {type(num_steps).__name__}")
  if num_steps < 1:
    raise ValueError(f"{num_steps=} must be positive")
  t = num_train_timesteps
  if sigma_schedule == "hunyuan":
    # diffusers' HunyuanVideoPipeline: linspace(1, 0) sigmas given to FlowMatchEulerDiscreteScheduler,
    # which shifts them in float32 and feeds the model sigma * T unrounded.
    sigmas = np.linspace(1.0, 0.0, num_steps + 1)[:-1].astype(np.float32)
    sigmas = np.float32(shift) * sigmas / (1 + (np.float32(shift) - 1) * sigmas)
    return np.append(sigmas, 0.0).astype(np.float32), (sigmas * np.float32(t)).astype(np.float32)
  if sigma_schedule == "diffusers":
    sigmas = np.linspace(1.0, 1.0 / t, num_steps + 1)[:-1]
  else:
    # Wan builds its training sigmas in float32, so its sigma_max is float32(0.999) for T = 1000.
    sigma_max = float(np.float32(1.0 - 1.0 / t))
    sigmas = np.linspace(sigma_max, 0.0, num_steps + 1)[:-1]
  sigmas = shift * sigmas / (1.0 + (shift - 1.0) * sigmas)
  if sigma_schedule == "diffusers" and abs(sigmas[0] - 1.0) < 1e-6:
    # Keeps log(1 - sigma) finite in the first UniPC step (diffusers' own adjustment).
    sigmas[0] -= 1e-6
  timesteps = (sigmas * t).astype(np.int64)
  sigmas32 = np.append(sigmas, 0.0).astype(np.float32)
  if not (np.all(sigmas32[:-1] < 1) and np.all(np.diff(sigmas32) < 0)):
    raise ValueError(f"{shift=} with {num_steps=} gives float32 sigmas that are not strictly "
                     "decreasing below 1")
  return sigmas32, timesteps


def _check_schedule(sigma_schedule: str, shift: float, num_train_timesteps: int) -> None:
  if sigma_schedule not in _SIGMA_SCHEDULES:
    raise ValueError(f"{sigma_schedule=} must be one of {_SIGMA_SCHEDULES}")
  if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
    raise ValueError(f"{shift=} must be a positive finite number")
  if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int):
    raise TypeError(f"num_train_timesteps must be an int, got {type(num_train_timesteps).__name__}")
  if num_train_timesteps < 2:
    raise ValueError(f"{num_train_timesteps=} must be at least 2")


@dataclasses.dataclass(frozen=True)
class FlowUniPCConfig:
  """Flow-matching UniPC settings; defaults are Wan2.1-T2V-1.3B's diffusers scheduler config.

  Attributes:
    sigma_schedule: "diffusers" or "wan" (see the module docstring).
    shift: the flow shift s (diffusers' `flow_shift`, Wan's `sample_shift`).
    num_train_timesteps: T; the model's timestep is `int(sigma * T)`.
    solver_order: 1, 2 or 3; the effective order is one more thanks to the corrector.
    solver_type: "bh2" (B(h) = e^-h - 1, Wan's) or "bh1" (B(h) = -h).
    disable_corrector: step indices j whose result is not corrected (diffusers: the corrector that
      would run at the start of step j + 1 is skipped).
  """

  sigma_schedule: SigmaSchedule = "diffusers"
  shift: float = 3.0
  num_train_timesteps: int = 1000
  solver_order: int = 2
  solver_type: Literal["bh1", "bh2"] = "bh2"
  disable_corrector: tuple[int, ...] = ()

  def __post_init__(self):
    _check_schedule(self.sigma_schedule, self.shift, self.num_train_timesteps)
    object.__setattr__(self, "shift", float(self.shift))
    if (isinstance(self.solver_order, bool) or not isinstance(self.solver_order, int)
        or not 1 <= self.solver_order <= _MAX_ORDER):
      raise ValueError(f"solver_order={self.solver_order!r} must be an int in [1, {_MAX_ORDER}]")
    if self.solver_type not in _SOLVER_TYPES:
      raise ValueError(f"solver_type={self.solver_type!r} must be one of {_SOLVER_TYPES}")
    steps = tuple(self.disable_corrector)
    if any(isinstance(j, bool) or not isinstance(j, (int, np.integer)) or j < 0 for j in steps):
      raise ValueError(f"disable_corrector={self.disable_corrector!r} must hold step indices >= 0")
    object.__setattr__(self, "disable_corrector", tuple(sorted({int(j) for j in steps})))

  @classmethod
  def preset(cls, name: str, **overrides: Any) -> FlowUniPCConfig:
    """A named preset (see `UNIPC_PRESETS`) with optional field overrides."""
    try:
      base = UNIPC_PRESETS[name]
    except KeyError:
      raise ValueError(
          f"unknown UniPC preset {name!r}; choose from {sorted(UNIPC_PRESETS)}") from None
    return dataclasses.replace(base, **overrides)


UNIPC_PRESETS: dict[str, FlowUniPCConfig] = {
    # Wan-AI/Wan2.1-T2V-1.3B-Diffusers and 480p generation (scheduler_config.json: flow_shift 3.0).
    "wan2.1-480p": FlowUniPCConfig(sigma_schedule="diffusers", shift=3.0),
    # 720p generation with the 14B model (diffusers' documented flow_shift 5.0).
    "wan2.1-720p": FlowUniPCConfig(sigma_schedule="diffusers", shift=5.0),
    # The original Wan2.1 repository's sampler (generate.py: sample_shift 5.0 for text-to-video).
    "wan2.1-original": FlowUniPCConfig(sigma_schedule="wan", shift=5.0),
    # Tests: the Wan settings at a small step count are already cheap; kept for uniformity.
    "tiny": FlowUniPCConfig(sigma_schedule="diffusers", shift=3.0),
}


@dataclasses.dataclass(frozen=True)
class FlowEulerConfig:
  """Flow Euler settings: the sigma schedule only (see `FlowUniPCConfig` for the fields)."""

  sigma_schedule: SigmaSchedule = "diffusers"
  shift: float = 3.0
  num_train_timesteps: int = 1000

  def __post_init__(self):
    _check_schedule(self.sigma_schedule, self.shift, self.num_train_timesteps)
    object.__setattr__(self, "shift", float(self.shift))

  @classmethod
  def preset(cls, name: str, **overrides: Any) -> FlowEulerConfig:
    """A named preset (see `EULER_PRESETS`) with optional field overrides."""
    try:
      base = EULER_PRESETS[name]
    except KeyError:
      raise ValueError(
          f"unknown Euler preset {name!r}; choose from {sorted(EULER_PRESETS)}") from None
    return dataclasses.replace(base, **overrides)


EULER_PRESETS: dict[str, FlowEulerConfig] = {
    "wan2.1-480p": FlowEulerConfig(sigma_schedule="diffusers", shift=3.0),
    "wan2.1-720p": FlowEulerConfig(sigma_schedule="diffusers", shift=5.0),
    "wan2.1-original": FlowEulerConfig(sigma_schedule="wan", shift=5.0),
    "tiny": FlowEulerConfig(sigma_schedule="diffusers", shift=3.0),
    # HunyuanVideo (diffusers' pipeline and the original sample_video.py: flow shift 7).
    "hunyuan-video": FlowEulerConfig(sigma_schedule="hunyuan", shift=7.0),
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SchedulerState:
  """Everything `step` needs: the schedule, its per-step coefficients and the multistep history.

  Attributes:
    sigmas: `[N+1]` float32, sigmas[N] = 0; step i goes from sigmas[i] to sigmas[i+1].
    timesteps: `[N]` float32 (integer values), the timestep the model is fed at step i.
    coeffs: per-step coefficient tables of the solver, each with a leading `[N]` axis.
    history: the solver's carried arrays (UniPC: the previous corrected sample and data
      predictions); None until `init_history` or the first `step`.
  """

  sigmas: jax.Array
  timesteps: jax.Array
  coeffs: Mapping[str, jax.Array]
  history: Mapping[str, jax.Array] | None = None

  @property
  def num_steps(self) -> int:
    return self.timesteps.shape[0]


class FlowScheduler(Protocol):
  """What the denoising loop needs from a scheduler."""

  def set_timesteps(self, num_steps: int) -> SchedulerState: ...

  def init_history(self, state: SchedulerState, sample: jax.Array) -> SchedulerState: ...

  def step(self, state: SchedulerState, model_output: jax.Array, step_index: Any,
           sample: jax.Array) -> tuple[jax.Array, SchedulerState]: ...


def _compute_dtype(dtype) -> jnp.dtype:
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"samples must be floating point, got {dtype}")
  # Half-precision latents are stepped in float32, like diffusers' float32 sigma arithmetic.
  return jnp.dtype(jnp.float64) if dtype == jnp.float64 else jnp.dtype(jnp.float32)


def _check_step_args(state: SchedulerState, model_output: jax.Array, step_index: Any,
                     sample: jax.Array) -> None:
  if model_output.shape != sample.shape:
    raise ValueError(f"model_output shape {tuple(model_output.shape)} does not match sample shape "
                     f"{tuple(sample.shape)}")
  if not jnp.issubdtype(model_output.dtype, jnp.floating):
    raise TypeError(f"model_output must be floating point, got {model_output.dtype}")
  if isinstance(step_index, (int, np.integer)) and not isinstance(step_index, bool):
    if not 0 <= step_index < state.num_steps:
      raise IndexError(f"{step_index=} is outside [0, {state.num_steps})")
  elif jnp.ndim(step_index) != 0 or not jnp.issubdtype(jnp.result_type(step_index), jnp.integer):
    raise TypeError(f"step_index must be an integer scalar, got {step_index!r}")


def _schedule_arrays(sigmas: np.ndarray, timesteps: np.ndarray) -> tuple[jax.Array, jax.Array]:
  return jnp.asarray(sigmas, jnp.float32), jnp.asarray(timesteps, jnp.float32)


@dataclasses.dataclass(frozen=True)
class FlowEulerScheduler:
  """First-order flow-matching sampler: `x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v_i`."""

  config: FlowEulerConfig = FlowEulerConfig()

  def set_timesteps(self, num_steps: int) -> SchedulerState:
    sigmas, timesteps = flow_sigmas(num_steps, sigma_schedule=self.config.sigma_schedule,
                                    shift=self.config.shift,
                                    num_train_timesteps=self.config.num_train_timesteps)
    dt = np.diff(sigmas.astype(np.float64))  # exact: two float32 values differ exactly in float64
    sig, ts = _schedule_arrays(sigmas, timesteps)
    return SchedulerState(sig, ts, {"dt": jnp.asarray(dt, jnp.float32)}, history={})

  def init_history(self, state: SchedulerState, sample: jax.Array) -> SchedulerState:
    del sample
    return dataclasses.replace(state, history={})

  def step(self, state: SchedulerState, model_output: jax.Array, step_index: Any,
           sample: jax.Array) -> tuple[jax.Array, SchedulerState]:
    """One Euler step from sigmas[step_index] to sigmas[step_index + 1]; returns (x_next, state)."""
    _check_step_args(state, model_output, step_index, sample)
    dtype = _compute_dtype(sample.dtype)
    dt = state.coeffs["dt"][step_index].astype(dtype)
    prev = sample.astype(dtype) + dt * model_output.astype(dtype)
    return prev.astype(sample.dtype), state


def _lambdas(sigmas: np.ndarray) -> np.ndarray:
  """Half log-SNR `log(1 - sigma) - log(sigma)` in float64; +inf at sigma = 0."""
  sig = sigmas.astype(np.float64)
  with np.errstate(divide="ignore"):
    return np.log1p(-sig) - np.log(sig)


def _bh_terms(h: float, rks: list[float], order: int, solver_type: str):
  """(h*phi_1, B(h), R, b) of the UniPC linear system for one step of the given order.

  h = +inf (the step to sigma = 0) gives the limits h*phi_1 = -1, B(h) = -1 (bh2) or -inf (bh1).
  """
  hh = -h  # data prediction integrates in -lambda
  h_phi_1 = math.expm1(hh)
  b_h = hh if solver_type == "bh1" else h_phi_1
  r = np.array(rks + [1.0], np.float64)
  rows, b = [], []
  h_phi_k = h_phi_1 / hh - 1.0
  factorial = 1
  for n in range(1, order + 1):
    rows.append(r ** (n - 1))
    b.append(h_phi_k * factorial / b_h)
    factorial *= n + 1
    h_phi_k = h_phi_k / hh - 1.0 / factorial
  return h_phi_1, b_h, np.stack(rows), np.array(b, np.float64)


def _unipc_tables(sigmas32: np.ndarray, order: int, solver_type: str,
                  disable_corrector: tuple[int, ...]) -> dict[str, np.ndarray]:
  """Per-step coefficients of the corrector and predictor as linear combinations (float64).

  Step i with sample x (uncorrected), data prediction m_i, previous corrected sample x_prev and
  history m_{i-1} .. m_{i-order}:
    x_c    = c_sample[i] x + c_prev[i] x_prev + sum_j c_x0[i, j] m_{i-j}      (j = 0 .. order)
    x_next = p_sample[i] x_c + sum_j p_x0[i, j] m_{i-j}                        (j = 0 .. order-1)
  """
  n = sigmas32.shape[0] - 1
  sig = sigmas32.astype(np.float64)
  alpha = 1.0 - sig  # exact in float64 for float32 sigmas
  lam = _lambdas(sig)
  p_order = [min(order, n - i, i + 1) for i in range(n)]  # warm-up and lower_order_final
  c_sample = np.zeros(n)
  c_prev = np.zeros(n)
  c_x0 = np.zeros((n, order + 1))
  p_sample = np.zeros(n)
  p_x0 = np.zeros((n, order))
  for i in range(n):
    # Corrector (UniC) of the previous step's prediction, with that step's order.
    if i == 0 or (i - 1) in disable_corrector:
      c_sample[i] = 1.0
    else:
      p = p_order[i - 1]
      h = lam[i] - lam[i - 1]
      rks = [(lam[i - 1 - k] - lam[i - 1]) / h for k in range(1, p)]
      h_phi_1, b_h, rmat, b = _bh_terms(h, rks, p, solver_type)
      rhos = np.array([0.5]) if p == 1 else np.linalg.solve(rmat, b)
      a = alpha[i]
      c_prev[i] = sig[i] / sig[i - 1]
      c_x0[i, 0] = -a * b_h * rhos[-1]
      c_x0[i, 1] = -a * h_phi_1 + a * b_h * rhos[-1]
      for k in range(1, p):
        c_x0[i, 1] += a * b_h * rhos[k - 1] / rks[k - 1]
        c_x0[i, 1 + k] = -a * b_h * rhos[k - 1] / rks[k - 1]
    # Predictor (UniP) from sigma_i to sigma_{i+1}.
    p = p_order[i]
    h = lam[i + 1] - lam[i]
    rks = [(lam[i - k] - lam[i]) / h for k in range(1, p)]
    h_phi_1, b_h, rmat, b = _bh_terms(h, rks, p, solver_type)
    if p == 1:
      rhos = np.zeros(0)
    elif p == 2:
      rhos = np.array([0.5])  # diffusers' simplified order-2 predictor
    else:
      rhos = np.linalg.solve(rmat[:-1, :-1], b[:-1])
    a = alpha[i + 1]
    p_sample[i] = sig[i + 1] / sig[i]
    p_x0[i, 0] = -a * h_phi_1
    for k in range(1, p):
      p_x0[i, 0] += a * b_h * rhos[k - 1] / rks[k - 1]
      p_x0[i, k] = -a * b_h * rhos[k - 1] / rks[k - 1]
  tables = dict(c_sample=c_sample, c_prev=c_prev, c_x0=c_x0, p_sample=p_sample, p_x0=p_x0)
  for name, table in tables.items():
    if not np.all(np.isfinite(table)):
      raise ValueError(f"UniPC coefficients {name} are not finite for this sigma schedule")
  return tables


@dataclasses.dataclass(frozen=True)
class FlowUniPCScheduler:
  """Flow-matching UniPC multistep sampler (data prediction, B(h), lower order at the end).

  Pure functional: `state = set_timesteps(n)`, then for i in range(n) feed the model
  `state.timesteps[i]` and call `sample, state = step(state, model_output, i, sample)`. The history
  lives in `state.history` (`prev_sample` [*S] and `x0` [order, *S], newest first, in float32 or
  float64). Call `init_history(state, sample)` first to give the state a fixed structure for
  `lax.scan` / `lax.fori_loop`; a Python loop may skip it.
  """

  config: FlowUniPCConfig = FlowUniPCConfig()

  def set_timesteps(self, num_steps: int) -> SchedulerState:
    sigmas, timesteps = flow_sigmas(num_steps, sigma_schedule=self.config.sigma_schedule,
                                    shift=self.config.shift,
                                    num_train_timesteps=self.config.num_train_timesteps)
    tables = _unipc_tables(sigmas, self.config.solver_order, self.config.solver_type,
                           self.config.disable_corrector)
    sig, ts = _schedule_arrays(sigmas, timesteps)
    coeffs = {k: jnp.asarray(v, jnp.float32) for k, v in tables.items()}
    return SchedulerState(sig, ts, coeffs, history=None)

  def init_history(self, state: SchedulerState, sample: jax.Array) -> SchedulerState:
    """A zero history shaped like `sample` (its values are never used before being written)."""
    dtype = _compute_dtype(sample.dtype)
    history = {
        "prev_sample": jnp.zeros(sample.shape, dtype),
        "x0": jnp.zeros((self.config.solver_order, *sample.shape), dtype),
    }
    return dataclasses.replace(state, history=history)

  def step(self, state: SchedulerState, model_output: jax.Array, step_index: Any,
           sample: jax.Array) -> tuple[jax.Array, SchedulerState]:
    """Corrects `sample` with the new model output, then predicts the next sample.

    Args:
      state: from `set_timesteps` (and earlier `step`s of this run, in order).
      model_output: the velocity predicted at `sample` and `state.timesteps[step_index]`.
      step_index: i in [0, N), a Python int or a traced integer scalar.
      sample: x_i, any float dtype; half precision is stepped in float32.

    Returns:
      (x_{i+1} in sample's dtype, the state with the updated history).
    """
    _check_step_args(state, model_output, step_index, sample)
    if state.history is None:
      state = self.init_history(state, sample)
    dtype = _compute_dtype(sample.dtype)
    prev_sample, history_x0 = state.history["prev_sample"], state.history["x0"]
    order = self.config.solver_order
    if prev_sample.shape != sample.shape or history_x0.shape != (order, *sample.shape):
      raise ValueError(f"scheduler history holds shape {tuple(prev_sample.shape)}, the sample "
                       f"{tuple(sample.shape)}: call init_history with this sample")
    c = {k: v[step_index].astype(dtype) for k, v in state.coeffs.items()}
    x = sample.astype(dtype)
    x0 = x - state.sigmas[step_index].astype(dtype) * model_output.astype(dtype)
    prev_sample = prev_sample.astype(dtype)
    history_x0 = history_x0.astype(dtype)

    corrected = c["c_sample"] * x + c["c_prev"] * prev_sample + c["c_x0"][0] * x0
    for j in range(order):
      corrected = corrected + c["c_x0"][j + 1] * history_x0[j]
    x_next = c["p_sample"] * corrected + c["p_x0"][0] * x0
    for j in range(order - 1):
      x_next = x_next + c["p_x0"][j + 1] * history_x0[j]

    history = {"prev_sample": corrected,
               "x0": jnp.concatenate([x0[None], history_x0[:-1]], axis=0)}
    return x_next.astype(sample.dtype), dataclasses.replace(state, history=history)


def make_scheduler(config: FlowUniPCConfig | FlowEulerConfig) -> FlowScheduler:
  """The scheduler for a config: `FlowUniPCScheduler` or `FlowEulerScheduler`."""
  if isinstance(config, FlowUniPCConfig):
    return FlowUniPCScheduler(config)
  if isinstance(config, FlowEulerConfig):
    return FlowEulerScheduler(config)
  raise TypeError(f"expected a FlowUniPCConfig or FlowEulerConfig, got {type(config).__name__}")

