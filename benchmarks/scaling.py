"""Multi-GPU scaling of the dense and the ASTRAEA-accelerated Wan forward (sequence + CFG parallel).

Default: the full-size `wan2.1-t2v-1.3b` preset with random weights built on the device, bf16, CFG
as batch 2, 480p x 81 frames (latents [2, 16, 21, 60, 104] -> N = 32,760 tokens, 512 text tokens),
on 1, 2, 4, ... GPUs up to all visible ones (`--devices` to choose). n GPUs form the mesh
(cfg, seq) = (2, n/2) for even n (`astraea_jax.parallel.mesh`); 1 GPU runs the single-device code
that `generate --devices 1` runs (`jit_astraea_step` and the plain jitted model).

What is timed per device count (every program compiled ahead of time, compile time excluded):
- dense: one forward (the step of a dense loop), 1 warm-up call, then `--runs` timed calls (median);
  a 50-step dense loop is 50 x that median.
- ASTRAEA at uniform budget `--budget` (default 0.5; step 0 dense, as in `BudgetSchedule.uniform`):
  step 0 (the dense step that builds the token cache) timed over `--runs` calls after 1 warm-up;
  steps 1..49 all compute the same k = round(budget N) tokens per block and row, rounded to a
  multiple of the seq axis size P (top-k per shard), so one such step is timed over `--runs`
  calls after 1 warm-up, the cache chained from call to call as in the loop; a 50-step loop is
  step 0 + 49 x that median (the loop's guidance and solver arithmetic are not included).
- each `--schedule FILE` (resampled to `--steps` like `generate --resample-schedule`, whole steps
  kept whole): the loop itself, every step through the step model `generate` uses
  (`AstraeaStepModel`, or `parallel.ShardedAstraeaStepModel` on a mesh), so a dense step that no
  partial step follows keeps only the last block's output; one untimed pass compiles every
  variant, the next is timed step by step (each step waited for).
Speedups are against the 1-GPU dense loop; dense scaling efficiency = speedup / n. The sharded
dense output is also compared with the 1-GPU output (relative L2 error, bf16).

    PYTHONPATH=. python3 benchmarks/scaling.py [--devices 1 2 4] [--budget 0.5] [--runs 3] \
        [--schedule benchmarks/schedules/searched_default_0.5-whole.json]
    PYTHONPATH=. python3 benchmarks/scaling.py --quick   # tiny preset on 8 fake CPU devices

Writes benchmarks/results/scaling-<device>.json (device, versions, date, command, numbers);
`--quick` writes scaling-quick-<device>.json.
"""

from __future__ import annotations

import os
import sys

if "--quick" in sys.argv[1:]:  # before jax is imported: fake host devices to shard over
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from astraea_jax import parallel  # noqa: E402
from astraea_jax.acceleration.astraea import (  # noqa: E402
    AstraeaStepModel,
    jit_astraea_step,
    num_video_tokens,
)
from astraea_jax.acceleration.config import AstraeaConfig  # noqa: E402
from astraea_jax.acceleration.schedule import BudgetSchedule  # noqa: E402
from astraea_jax.models.wan import WanConfig  # noqa: E402
from astraea_jax.parallel import mesh as mesh_lib  # noqa: E402
from astraea_jax.parallel import sequence  # noqa: E402
from benchutil import RESULTS as _RESULTS, build_state, device_slug  # noqa: E402  (script dir)

_QUICK = dict(preset="tiny", latent=[2, 8, 8], text_tokens=5)


@functools.lru_cache(maxsize=4)
def _jit_dense_one_device(graphdef):
  # As pipeline.DenseStepModel: jax.jit over the split state.
  return jax.jit(lambda state, *inputs: nnx.merge(graphdef, state)(*inputs))


def _compile(fn, *args, **static):
  start = time.perf_counter()
  compiled = fn.lower(*args, **static).compile()
  return compiled, time.perf_counter() - start


def _time(call, runs: int):
  """1 warm-up call, then `runs` timed calls: (milliseconds, last result)."""
  result = jax.block_until_ready(call())
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    result = jax.block_until_ready(call())
    times.append((time.perf_counter() - start) * 1e3)
  return times, result


def _per_device_gib(tree) -> float:
  """Bytes one device holds of `tree` (its first addressable shard of every array), in GiB."""
  return sum(a.addressable_shards[0].data.nbytes for a in jax.tree.leaves(tree)) / 2**30


def default_device_counts(visible: int) -> list[int]:
  counts, n = [], 1
  while n <= visible:
    counts.append(n)
    n *= 2
  return counts if counts[-1] == visible else counts + [visible]


def time_schedule(mesh, graphdef, state, inputs, schedule, acfg) -> dict:
  """One pass of `schedule`'s loop that compiles every variant, then one timed pass."""
  latents, timestep, context = inputs
  model = nnx.merge(graphdef, state)
  if mesh is None:
    step_model = AstraeaStepModel(model, schedule, context, config=acfg, timed=True)
  else:
    step_model = parallel.ShardedAstraeaStepModel(model, schedule, context, mesh, config=acfg,
                                                  timed=True)
  for _ in range(2):
    step_model.stats.clear()
    carry, start = None, time.perf_counter()
    for step in range(len(schedule)):
      out, carry = step_model(latents, timestep, carry, step)
    jax.block_until_ready(out)
    wall = time.perf_counter() - start
    del carry
  assert not any(s.first_call for s in step_model.stats)
  return {"name": schedule.name, "thetas": list(schedule.thetas), "mean": schedule.mean,
          "k": [s.num_selected for s in step_model.stats],
          "step_ms": [round(s.seconds * 1e3, 3) for s in step_model.stats],
          "loop_s": sum(s.seconds for s in step_model.stats), "loop_wall_s": wall}


def measure(n, graphdef, state, inputs, *, steps, budget, runs, acfg, num_tokens, heads,
            schedules=()):
  """Times the dense and the ASTRAEA step on `n` devices; returns the row and the dense output."""
  latents, timestep, context = inputs
  row: dict = {"devices": n}
  mesh = None
  schedule = BudgetSchedule.uniform(steps, budget)
  if n == 1:
    seq = 1
    dense_fn = _jit_dense_one_device(graphdef)
    step = jit_astraea_step(graphdef, config=acfg)
    args = (state, latents, timestep, context)
    row["mesh"] = None
  else:
    mesh = parallel.make_mesh(parallel.MeshConfig(num_devices=n))
    seq = mesh_lib.seq_size(mesh)
    row["mesh"] = dict(mesh.shape)
    row["attention"] = ("local (seq = 1)" if seq == 1
                        else sequence.choose_strategy(heads, seq))
    dense_fn = parallel.jit_sharded_dense(graphdef, mesh)
    step = parallel.jit_sharded_astraea_step(graphdef, mesh, config=acfg)
    args = (parallel.replicate(state, mesh), *parallel.place_inputs(mesh, *inputs))
  k = parallel.round_num_selected(schedule.num_selected(1, num_tokens), num_tokens, seq)
  row["k"], row["k_per_shard"] = k, k // seq

  compiled, compile_s = _compile(dense_fn, *args)
  times, dense_out = _time(lambda: compiled(*args), runs)
  row["dense"] = {"median_ms": statistics.median(times), "runs_ms": times, "compile_s": compile_s}
  dense_out = np.asarray(dense_out, np.float32)

  first, first_compile_s = _compile(step, *args, None, num_selected=num_tokens)
  box = {}

  def first_call():
    box.pop("cache", None)  # one cache alive at a time
    out, box["cache"] = first(*args, None)
    return out

  first_times, _ = _time(first_call, runs)
  cache = box.pop("cache")
  row["cache_gib_per_device"] = _per_device_gib(cache)
  sparse, sparse_compile_s = _compile(step, *args, cache, num_selected=k)

  def sparse_call():
    out, box["cache"] = sparse(*args, box.get("cache", cache))
    return out

  sparse_times, sparse_out = _time(sparse_call, runs)
  row["astraea"] = {
      "budget": budget, "first_median_ms": statistics.median(first_times),
      "first_runs_ms": first_times, "first_compile_s": first_compile_s,
      "sparse_median_ms": statistics.median(sparse_times), "sparse_runs_ms": sparse_times,
      "sparse_compile_s": sparse_compile_s,
      "sparse_output_finite": bool(jnp.isfinite(sparse_out).all()),
  }
  row["dense_loop_s"] = steps * row["dense"]["median_ms"] / 1e3
  row["astraea_loop_s"] = (row["astraea"]["first_median_ms"]
                           + (steps - 1) * row["astraea"]["sparse_median_ms"]) / 1e3
  box.clear()  # the last cache; `cache` was donated to the first sparse call
  row["schedules"] = [time_schedule(mesh, graphdef, state, inputs, sched, acfg)
                      for sched in schedules]
  return row, dense_out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="tiny preset, small latents, 8 fake CPU devices (checks the code only)")
  parser.add_argument("--preset", default=None, help="default wan2.1-t2v-1.3b (tiny with --quick)")
  parser.add_argument("--latent", type=int, nargs=3, default=None, metavar=("T", "Y", "X"),
                      help="default 21 60 104 (480p x 81 frames)")
  parser.add_argument("--text-tokens", type=int, default=None, help="default 512")
  parser.add_argument("--devices", type=int, nargs="+", default=None,
                      help="device counts (default 1, 2, 4, ... and all visible)")
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--budget", type=float, default=0.5)
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--schedule", type=Path, action="append", default=[], metavar="FILE",
                      help="also time this schedule's whole loop (repeatable; resampled to --steps)")
  parser.add_argument("--time-limit", type=float, default=420.0,
                      help="seconds; device counts not started by then are skipped")
  parser.add_argument("--out", default=None, help="JSON path (default results/scaling-<dev>.json)")
  args = parser.parse_args(argv)
  t_start = time.perf_counter()
  defaults = _QUICK if args.quick else dict(preset="wan2.1-t2v-1.3b", latent=[21, 60, 104],
                                            text_tokens=512)
  preset = args.preset or defaults["preset"]
  t, y, x = args.latent or defaults["latent"]
  m = args.text_tokens or defaults["text_tokens"]

  config = WanConfig.preset(preset)
  acfg = AstraeaConfig()
  b = 2  # the CFG pair
  n_tokens = num_video_tokens(config.patch_size, (b, config.in_channels, t, y, x))
  visible = len(jax.devices())
  counts = args.devices or default_device_counts(visible)
  print(f"{visible} x {jax.devices()[0].device_kind}, jax {jax.__version__}, {preset}, latents "
        f"[{b}, {config.in_channels}, {t}, {y}, {x}] -> N={n_tokens}, M={m}, budget {args.budget}, "
        f"devices {counts}", flush=True)

  schedules = []
  for path in args.schedule:
    schedule = BudgetSchedule.load(path)
    if len(schedule) != args.steps:
      schedule = schedule.resample(args.steps)
    schedules.append(dataclasses.replace(schedule, name=path.stem))
    print(f"schedule {path.stem}: {len(schedule)} steps, mean {schedule.mean:.3f}", flush=True)

  graphdef, state = build_state(config)
  rng = np.random.default_rng(0)
  latents = jnp.asarray(rng.standard_normal((b, config.in_channels, t, y, x), np.float32))
  context = jnp.asarray(rng.standard_normal((b, m, config.text_dim), np.float32),
                        jnp.dtype(config.dtype))
  timestep = jnp.full((b,), 500.0, jnp.float32)
  inputs = (latents, timestep, context)

  rows, skipped, reference = [], {}, None
  for n in counts:
    if time.perf_counter() - t_start > args.time_limit:
      skipped[n] = "time limit"
      continue
    if n > visible:
      skipped[n] = f"only {visible} devices visible"
      continue
    if n > 1 and mesh_lib.fitting_num_devices(n, n_tokens, b) != n:
      skipped[n] = f"N={n_tokens} does not split evenly"
      continue
    start = time.perf_counter()
    row, out = measure(n, graphdef, state, inputs, steps=args.steps, budget=args.budget,
                       runs=args.runs, acfg=acfg, num_tokens=n_tokens,
                       heads=config.num_attention_heads, schedules=schedules)
    if reference is None and n == 1:
      reference = out
    if reference is not None:
      row["dense_rel_err_vs_1_device"] = float(np.linalg.norm(out - reference)
                                               / np.linalg.norm(reference))
    row["wall_s"] = time.perf_counter() - start
    rows.append(row)
    print(f"{n} device(s): dense {row['dense']['median_ms']:.1f} ms/step, astraea k={row['k']} "
          f"{row['astraea']['sparse_median_ms']:.1f} ms/step (step 0: "
          f"{row['astraea']['first_median_ms']:.1f} ms), {row['wall_s']:.0f} s", flush=True)

  base = next((r["dense_loop_s"] for r in rows if r["devices"] == 1), None)
  for r in rows:
    r["dense_speedup_vs_1_device_dense"] = None if base is None else base / r["dense_loop_s"]
    r["dense_scaling_efficiency"] = (None if base is None
                                     else r["dense_speedup_vs_1_device_dense"] / r["devices"])
    r["astraea_speedup_vs_1_device_dense"] = None if base is None else base / r["astraea_loop_s"]
    for sched in r["schedules"]:
      sched["speedup_vs_1_device_dense"] = None if base is None else base / sched["loop_s"]

  record = {
      "benchmark": "scaling",
      "device": jax.devices()[0].device_kind,
      "visible_devices": visible,
      "backend": jax.default_backend(),
      "jax": jax.__version__,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
      "preset": preset,
      "astraea_config": dataclasses.asdict(acfg),
      "latents": [b, config.in_channels, t, y, x],
      "tokens": n_tokens,
      "text_tokens": m,
      "steps": args.steps,
      "budget": args.budget,
      "loop_time_method": (
          f"dense: {args.steps} x median of {args.runs} timed forwards after 1 warm-up; astraea: "
          f"step 0 (dense, builds the cache) median of {args.runs} after 1 warm-up + "
          f"{args.steps - 1} x median of {args.runs} steady sparse steps (cache chained) after 1 "
          "warm-up; compile time excluded; k rounded to a multiple of the seq axis size"),
      "rows": rows,
      "skipped": {str(k): v for k, v in skipped.items()},
      "wall_s": time.perf_counter() - t_start,
  }
  name = f"scaling-quick-{device_slug()}" if args.quick else f"scaling-{device_slug()}"
  out_path = Path(args.out) if args.out else _RESULTS / f"{name}.json"
  out_path.parent.mkdir(parents=True, exist_ok=True)
  out_path.write_text(json.dumps(record, indent=1) + "\n")

  print(f"\nwrote {out_path} ({record['wall_s']:.0f} s)")
  for n, why in skipped.items():
    print(f"skipped {n} device(s): {why}")
  fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
  print(f"{'devices':>7} {'mesh cfg x seq':>14} {'k':>6} {'dense ms':>9} {'astraea ms':>10} "
        f"{'dense loop s':>12} {'astraea loop s':>14} {'x dense':>7} {'eff.':>5} "
        f"{'astraea x':>9}")
  for r in rows:
    mesh = "1 x 1" if r["mesh"] is None else f"{r['mesh']['cfg']} x {r['mesh']['seq']}"
    print(f"{r['devices']:>7} {mesh:>14} {r['k']:>6} {r['dense']['median_ms']:>9.1f} "
          f"{r['astraea']['sparse_median_ms']:>10.1f} {r['dense_loop_s']:>12.2f} "
          f"{r['astraea_loop_s']:>14.2f} {fmt(r['dense_speedup_vs_1_device_dense'], '.2f'):>7} "
          f"{fmt(r['dense_scaling_efficiency'], '.0%'):>5} "
          f"{fmt(r['astraea_speedup_vs_1_device_dense'], '.2f'):>9}")
  for r in rows:
    for sched in r["schedules"]:
      computed = sum(1 for k in sched["k"] if k)
      print(f"{r['devices']} device(s), schedule {sched['name']} (mean {sched['mean']:.3f}, "
            f"{computed}/{len(sched['k'])} steps computed): loop {sched['loop_s']:.2f} s, "
            f"{fmt(sched['speedup_vs_1_device_dense'], '.3f')}x vs 1-device dense")
  return 0


if __name__ == "__main__":
  sys.exit(main())
