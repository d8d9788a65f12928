"""Parity goldens for the flow-matching UniPC scheduler (astraea_jax/sampling/schedulers.py).

Run from the repository root with the reference environment:
  .venv-ref/bin/python tests/goldens/make_unipc_goldens.py

The reference is diffusers' `UniPCMultistepScheduler` configured as Wan2.1's diffusers pipeline
configures it (`prediction_type="flow_prediction"`, `use_flow_sigmas=True`, `flow_shift` 3.0 or 5.0,
`solver_order=2`, `solver_type="bh2"`, `predict_x0=True`, `lower_order_final=True`), plus a few
variants (order 1 and 3, bh1, a disabled corrector) that exercise the rest of the algorithm.

Two sigma schedules:
  diffusers  `set_timesteps(n)`: sigmas = linspace(1, 1/T, n+1)[:-1], shifted by s*x/(1+(s-1)*x),
             the first one lowered by 1e-6 when it is 1.
  wan        the original Wan2.1 `FlowUniPCMultistepScheduler` (wan/utils/fm_solvers_unipc.py):
             sigmas = linspace(sigma_max, 0, n+1)[:-1] with sigma_max = float32(1 - 1/T), then the
             same shift. It is fed to the diffusers scheduler through `set_timesteps(sigmas=...)`,
             which applies the same shift and produces the same timesteps, so the step-by-step
             target stays diffusers' scheduler; the script checks that the schedule it gets equals
             the documented formula.

Model outputs: a fixed function of the current sample and the step (`fake_velocity`), computed in
torch float32, so that the x0 predictions change from step to step and the multistep terms matter.
Every case stores the model outputs it fed, so the test replays them without re-evaluating it.
The bh1 case's last sample is NaN: diffusers multiplies B(h) = -h = -inf by a zero correction in
the step to sigma = 0 (the test checks that step against its limit, the data prediction).

Writes tests/goldens/unipc/unipc_golden.npz (per case `<name>__timesteps` [N] int64,
`<name>__sigmas` [N+1] float32, `<name>__model_outputs` [N, *S] float32, `<name>__samples`
[N+1, *S] float32 with samples[0] the initial noise and samples[i+1] step i's `prev_sample`) and
tests/goldens/unipc/cases.json (each case's scheduler settings).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import torch
from diffusers import UniPCMultistepScheduler

OUT = pathlib.Path(__file__).resolve().parent / "unipc"
SHAPE = (1, 4, 2, 4, 4)  # [B, C, T, Y, X]
NUM_TRAIN_TIMESTEPS = 1000

# name -> settings. `sigma_schedule` and `shift` name the schedule, the rest are diffusers kwargs.
CASES: dict[str, dict] = {
    "diffusers_shift3_n10": dict(sigma_schedule="diffusers", shift=3.0, num_steps=10),
    "diffusers_shift5_n10": dict(sigma_schedule="diffusers", shift=5.0, num_steps=10),
    "diffusers_shift3_n50": dict(sigma_schedule="diffusers", shift=3.0, num_steps=50),
    "diffusers_shift5_n50": dict(sigma_schedule="diffusers", shift=5.0, num_steps=50),
    "wan_shift3_n10": dict(sigma_schedule="wan", shift=3.0, num_steps=10),
    "wan_shift5_n50": dict(sigma_schedule="wan", shift=5.0, num_steps=50),
    "diffusers_shift5_n10_order3": dict(sigma_schedule="diffusers", shift=5.0, num_steps=10,
                                        solver_order=3),
    "diffusers_shift3_n10_order1": dict(sigma_schedule="diffusers", shift=3.0, num_steps=10,
                                        solver_order=1),
    "diffusers_shift3_n12_bh1_nocorr": dict(sigma_schedule="diffusers", shift=3.0, num_steps=12,
                                            solver_type="bh1", disable_corrector=[0, 4]),
    "diffusers_shift5_n1": dict(sigma_schedule="diffusers", shift=5.0, num_steps=1),
}


def wan_unshifted_sigmas(num_steps: int) -> np.ndarray:
  """The original Wan schedule before its shift, in float64 (from the formula, not Wan's code)."""
  sigma_max = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))
  return np.linspace(sigma_max, 0.0, num_steps + 1)[:-1]


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
  return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def fake_velocity(x: torch.Tensor, step: int, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
  """A flow-matching-like velocity `eps - x0` plus a sample- and step-dependent wobble (float32)."""
  return (eps - x0) + 0.3 * torch.sin(1.5 * x + 0.25 * step) + 0.05 * step * torch.tanh(x)


def run_case(settings: dict, generator: torch.Generator) -> dict[str, np.ndarray]:
  kwargs = {k: v for k, v in settings.items()
            if k not in ("sigma_schedule", "shift", "num_steps")}
  sched = UniPCMultistepScheduler(
      num_train_timesteps=NUM_TRAIN_TIMESTEPS, prediction_type="flow_prediction",
      use_flow_sigmas=True, flow_shift=settings["shift"], predict_x0=True, lower_order_final=True,
      **{"solver_order": 2, "solver_type": "bh2", **kwargs})
  n = settings["num_steps"]
  if settings["sigma_schedule"] == "wan":
    sched.set_timesteps(sigmas=wan_unshifted_sigmas(n))  # an array: diffusers does arithmetic on it
    expected = shift_sigmas(wan_unshifted_sigmas(n), settings["shift"])
    np.testing.assert_array_equal(sched.timesteps.numpy(),
                                  (expected * NUM_TRAIN_TIMESTEPS).astype(np.int64))
    np.testing.assert_array_equal(sched.sigmas.numpy(),
                                  np.append(expected, 0.0).astype(np.float32))
  else:
    sched.set_timesteps(n)

  x0 = torch.randn(SHAPE, generator=generator, dtype=torch.float32)
  eps = torch.randn(SHAPE, generator=generator, dtype=torch.float32)
  sample = eps.clone()
  samples, outputs = [sample.clone()], []
  for i, t in enumerate(sched.timesteps):
    out = fake_velocity(sample, i, x0, eps)
    outputs.append(out.clone())
    sample = sched.step(out, t, sample, return_dict=False)[0]
    samples.append(sample.clone())
  return {
      "timesteps": sched.timesteps.numpy().astype(np.int64),
      "sigmas": sched.sigmas.numpy().astype(np.float32),
      "model_outputs": torch.stack(outputs).numpy(),
      "samples": torch.stack(samples).numpy(),
  }


def main() -> None:
  torch.manual_seed(0)
  generator = torch.Generator().manual_seed(1234)
  OUT.mkdir(parents=True, exist_ok=True)
  arrays = {}
  for name, settings in CASES.items():
    for key, value in run_case(settings, generator).items():
      arrays[f"{name}__{key}"] = value
  np.savez_compressed(OUT / "unipc_golden.npz", **arrays)
  (OUT / "cases.json").write_text(json.dumps(
      {"num_train_timesteps": NUM_TRAIN_TIMESTEPS, "shape": list(SHAPE), "cases": CASES},
      indent=2) + "\n")


if __name__ == "__main__":
  main()
