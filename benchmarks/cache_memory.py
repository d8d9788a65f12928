"""Peak device memory of a denoising loop: dense, or ASTRAEA with a schedule (one per process).

The token cache (`astraea_jax.acceleration.token_cache`) holds every block's output and input sketch
for the partial steps to read; a schedule of whole steps (theta 0 or 1) never reads it, and its dense
steps keep only the last block's output (`TokenCache.last_output`). This script runs the loop of the
step model `generate` uses on the full-size Wan2.1-1.3B preset (random bf16 weights, CFG batch 2,
480p x 81 frames) and reports the device's peak bytes in use, which jax cannot reset: run each
setting in its own process.

    PYTHONPATH=.:benchmarks python3 benchmarks/cache_memory.py --dense
    PYTHONPATH=.:benchmarks python3 benchmarks/cache_memory.py --budget 0.5
    PYTHONPATH=.:benchmarks python3 benchmarks/cache_memory.py --schedule benchmarks/schedules/searched_default_0.5-whole.json

Prints one line and appends a JSON record to `--out` (default results/cache_memory-<device>.jsonl).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from astraea_jax.acceleration.astraea import AstraeaStepModel
from astraea_jax.acceleration.schedule import BudgetSchedule
from astraea_jax.models.wan import WanConfig
from benchutil import RESULTS, build_state, device_slug  # (script dir)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  g = p.add_mutually_exclusive_group(required=True)
  g.add_argument("--dense", action="store_true")
  g.add_argument("--budget", type=float, help="uniform budget")
  g.add_argument("--schedule", type=Path, help="schedule JSON (resampled to --steps)")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--preset", default="wan2.1-t2v-1.3b")
  p.add_argument("--latent", type=int, nargs=3, default=[21, 60, 104], metavar=("T", "Y", "X"))
  p.add_argument("--out", type=Path, default=None)
  args = p.parse_args(argv)

  config = WanConfig.preset(args.preset)
  graphdef, state = build_state(config)
  model = nnx.merge(graphdef, state)
  rng = np.random.default_rng(0)
  latents = jnp.asarray(rng.standard_normal((2, config.in_channels, *args.latent), np.float32))
  context = jnp.asarray(rng.standard_normal((2, 512, config.text_dim), np.float32),
                        jnp.dtype(config.dtype))
  if args.dense:
    label, schedule = "dense", BudgetSchedule.dense(args.steps)
    jitted = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))
    step_model = lambda x, t, c, i: (jitted(state, x, jnp.full((2,), t), context), c)  # noqa: E731
  else:
    schedule = (BudgetSchedule.uniform(args.steps, args.budget) if args.schedule is None
                else BudgetSchedule.load(args.schedule))
    if len(schedule) != args.steps:
      schedule = schedule.resample(args.steps)
    label = args.schedule.stem if args.schedule else schedule.name
    step_model = AstraeaStepModel(model, schedule, context)
  start, carry = time.perf_counter(), None
  for i in range(args.steps):
    out, carry = step_model(latents, jnp.float32(1000.0 - 90.0 * i), carry, i)
  jax.block_until_ready(out)
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use", 0) / 2**30
  cache = 0.0 if carry is None else sum(a.nbytes for a in jax.tree.leaves(carry)) / 2**30
  record = {
      "benchmark": "cache_memory", "device": jax.devices()[0].device_kind, "jax": jax.__version__,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
      "preset": args.preset, "latents": [2, config.in_channels, *args.latent], "steps": args.steps,
      "setting": label, "thetas": list(schedule.thetas), "peak_gib": peak,
      "final_carry_gib": cache, "wall_s": time.perf_counter() - start,
  }
  out_path = args.out or RESULTS / f"cache_memory-{device_slug()}.jsonl"
  with open(out_path, "a", encoding="utf-8") as f:
    f.write(json.dumps(record) + "\n")
  print(f"{label}: peak {peak:.2f} GiB, carry at the end {cache:.2f} GiB "
        f"({record['wall_s']:.0f} s for {args.steps} steps)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
