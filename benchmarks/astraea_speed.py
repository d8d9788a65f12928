"""Speed and memory of the ASTRAEA-accelerated Wan forward against this project's dense forward.

Default: the full-size `wan2.1-t2v-1.3b` preset with random weights built on the device, bf16, CFG
as batch 2, 480p x 81 frames (latents [2, 16, 21, 60, 104] -> N = 32,760 tokens, 512 text tokens).

A step's time depends only on its k (tokens computed per block and batch row), not on which tokens
or which step, so every distinct k of the compared schedules is compiled once and timed over
`--runs` calls (median); a schedule's loop time is then the SUM over its 50 steps of the per-step
time of each step's k (not a timed 50-step loop). The schedules: dense (the plain model), uniform
theta for each `--budgets` value (step 0 dense), and "dense for the first `--dense-fraction` of the
steps, then theta" with theta chosen so that the mean budget is the same value.

Also measured: the selection overhead, i.e. the same forward with every block replaced by a no-op
(`selection_only_block`: scoring, top-k, gathers, scatters and cache updates remain); the pure cache
step (k = 0); the same budget with each block's input carried as a copy (`inplace_input=False`);
the compiled temporaries of each variant; and the allocator's peak memory after the dense forward,
after the first (cache-filling) step plus sparse steps, and after a dense step with a cache, in that
order, before anything holds two caches (the first step is timed last for that reason). The
diffusers + PyTorch dense reference is the figure measured on this project's H100 (623 ms per
batch-1 forward, so 2 x 50 x 623 ms for 50 CFG steps) at the default size only, unless
`--diffusers-ms` gives one.

    PYTHONPATH=. python3 benchmarks/astraea_speed.py [--steps 50] [--budgets 0.7 0.5 0.4] [--runs 3]

Writes benchmarks/results/astraea_speed-<device>.json (device, versions, date, command, numbers).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from astraea_jax.acceleration.astraea import (
    compute_block,
    jit_astraea_step,
    num_video_tokens,
    selection_only_block,
)
from astraea_jax.acceleration.config import AstraeaConfig
from astraea_jax.acceleration.schedule import BudgetSchedule
from astraea_jax.acceleration.token_cache import cache_bytes_per_token_per_block
from astraea_jax.models.wan import WanConfig
from benchutil import (RESULTS as _RESULTS, build_state, device_slug, time_chained,  # noqa: E402  (script dir)
                       load_schedules)

_DIFFUSERS_MS = 623.0  # diffusers 0.42.1 + PyTorch 2.11, bf16, batch 1, H100 (../shared/DESIGN.md)




def peak_bytes() -> int | None:
  return (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")


def in_use_bytes() -> int | None:
  return (jax.devices()[0].memory_stats() or {}).get("bytes_in_use")


def gib(b) -> float | None:
  return None if b is None else b / 2**30




class Timer:
  """Compiles (ahead of time) and times jitted calls; chains the donated cache between calls."""

  def __init__(self, runs: int, deadline: float):
    self.runs = runs
    self.deadline = deadline

  def out_of_time(self) -> bool:
    return time.perf_counter() > self.deadline

  def compile(self, fn, *args, **static):
    start = time.perf_counter()
    compiled = fn.lower(*args, **static).compile()
    seconds = time.perf_counter() - start
    try:
      temp = compiled.memory_analysis().temp_size_in_bytes
    except Exception:  # pylint: disable=broad-except  (not every backend reports it)
      temp = None
    return compiled, seconds, temp

  def time_chain(self, compiled, args_without_cache, cache):
    """Calls `compiled(*args, cache)` runs + 1 times, the first a warm-up: (ms, out, cache)."""
    return time_chained(compiled, args_without_cache, cache, self.runs)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="wan2.1-t2v-1.3b")
  parser.add_argument("--batch", type=int, default=2, help="2 = the CFG cond/uncond pair")
  parser.add_argument("--latent", type=int, nargs=3, default=[21, 60, 104], metavar=("T", "Y", "X"))
  parser.add_argument("--text-tokens", type=int, default=512)
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--budgets", type=float, nargs="+", default=[0.7, 0.5, 0.4])
  parser.add_argument("--dense-fraction", type=float, default=0.2)
  parser.add_argument("--no-dense-first", action="store_true",
                      help="skip the 'dense first, then theta' schedules")
  parser.add_argument("--schedule", type=Path, nargs="*", default=[],
                      help="also time these schedule JSON files (e.g. from python -m "
                           "astraea_jax.search); a schedule of another step count is resampled "
                           "to --steps (BudgetSchedule.resample, --resample)")
  parser.add_argument("--resample", default="repeat", choices=["repeat", "average"],
                      help="how --schedule files are resampled to --steps (default: repeat)")
  parser.add_argument("--selection", default="sort", choices=["sort", "radix"],
                      help="top-k method of the main runs; the selection-only probe times both")
  parser.add_argument("--delta-mode", default="sketch", choices=["sketch", "exact"])
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--time-limit", type=float, default=480.0,
                      help="seconds; later variants are skipped past it (partial results kept)")
  parser.add_argument("--diffusers-ms", type=float, default=None,
                      help="diffusers dense forward, batch 1, ms (default: the H100 figure at the "
                           "1.3B preset's 480p x 81 frames; none at other sizes)")
  parser.add_argument("--out", default=None, help="JSON path (default results/astraea_speed-<dev>)")
  args = parser.parse_args(argv)
  if args.diffusers_ms is None and args.preset == "wan2.1-t2v-1.3b" and args.latent == [21, 60, 104]:
    args.diffusers_ms = _DIFFUSERS_MS
  t_start = time.perf_counter()
  timer = Timer(args.runs, t_start + args.time_limit)

  config = WanConfig.preset(args.preset)
  acfg = AstraeaConfig(delta_mode=args.delta_mode, selection=args.selection)
  t, y, x = args.latent
  b, m = args.batch, args.text_tokens
  n = num_video_tokens(config.patch_size, (b, config.in_channels, t, y, x))
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {args.preset}, "
        f"latents [{b}, {config.in_channels}, {t}, {y}, {x}] -> N={n}, M={m}, {acfg}", flush=True)

  graphdef, state = build_state(config)
  rng = np.random.default_rng(0)
  latents = jnp.asarray(rng.standard_normal((b, config.in_channels, t, y, x), np.float32))
  context = jnp.asarray(rng.standard_normal((b, m, config.text_dim), np.float32), jnp.bfloat16)
  timestep = jnp.full((b,), 500.0, jnp.float32)
  jax.block_until_ready((state, latents, context))
  base_bytes = in_use_bytes()

  # Schedules and the distinct k they need.
  schedules = {"dense": BudgetSchedule.dense(args.steps)}
  for budget in args.budgets:
    schedules[f"uniform {budget:g}"] = BudgetSchedule.uniform(args.steps, budget)
  if not args.no_dense_first:
    for budget in args.budgets:
      s = BudgetSchedule.dense_then_mean(args.steps, budget, dense_fraction=args.dense_fraction)
      schedules[f"dense {args.dense_fraction:.0%} then {s.thetas[-1]:g} (mean {budget:g})"] = s
  for name, (_, loaded) in load_schedules(args.schedule, args.steps, args.resample).items():
    schedules[f"{name} (mean {loaded.mean:.3f})"] = loaded
  # Most telling first (the smallest budget), in case the time limit cuts the list short.
  sparse_ks = []
  for s in sorted(schedules.values(), key=lambda s: s.mean):
    for i in range(1, args.steps):
      k = s.num_selected(i, n)
      if 0 < k < n and k not in sparse_ks:
        sparse_ks.append(k)
  rows: dict[str, dict] = {}

  def record(name, k, times, compile_s, temp, **extra):
    row = {"k": k, "theta": k / n if k is not None else None,
           "median_ms": statistics.median(times), "min_ms": min(times), "runs_ms": times,
           "compile_s": compile_s, "temp_gib": gib(temp), "peak_gib": gib(peak_bytes()), **extra}
    rows[name] = row
    print(f"{name:>22}: {row['median_ms']:8.1f} ms (compile {compile_s:5.1f} s, "
          f"temp {row['temp_gib'] or 0:.2f} GiB, peak {row['peak_gib'] or 0:.2f} GiB)", flush=True)
    return row

  # 1. The project's dense forward (the plain model, no LSE, no cache).
  @jax.jit
  def dense_forward(state, latents, timestep, context):
    return nnx.merge(graphdef, state)(latents, timestep, context)

  compiled, cs, temp = timer.compile(dense_forward, state, latents, timestep, context)
  times = []
  for i in range(args.runs + 1):
    start = time.perf_counter()
    dense_out = jax.block_until_ready(compiled(state, latents, timestep, context))
    if i:
      times.append((time.perf_counter() - start) * 1e3)
  record("dense (model)", n, times, cs, temp)
  peak_dense = peak_bytes()

  # 2. Astraea. Memory first: one cache-filling dense step, then sparse steps (the cache donated
  # and updated in place) and a dense step with a cache, reading the allocator's peak after each.
  step = jit_astraea_step(graphdef, config=acfg, block_fn=compute_block)
  fixed = (state, latents, timestep, context)
  compiled_first, cs_first, temp_first = timer.compile(step, *fixed, None, num_selected=n)
  out, cache = compiled_first(*fixed, None)
  jax.block_until_ready((out, cache))
  fill_err = float(jnp.linalg.norm((out - dense_out).astype(jnp.float32))
                   / jnp.linalg.norm(dense_out.astype(jnp.float32)))
  cache_bytes = cache.nbytes
  del dense_out
  memory = {"peak_after_first_step": peak_bytes()}

  sparse_outputs_finite = True

  def time_sparse(k, fn=step, name=None):
    nonlocal cache, sparse_outputs_finite
    compiled, cs, temp = timer.compile(fn, *fixed, cache, num_selected=k)
    times, out, cache = timer.time_chain(compiled, fixed, cache)
    sparse_outputs_finite &= bool(jnp.isfinite(out).all())
    record(name or f"astraea k={k}", k, times, cs, temp)

  time_sparse(sparse_ks[0])
  memory["peak_after_sparse_steps"] = peak_bytes()
  memory["in_use_after_sparse_steps"] = in_use_bytes()

  compiled, cs, temp = timer.compile(step, *fixed, cache, num_selected=n)
  times, out, cache = timer.time_chain(compiled, fixed, cache)
  record("astraea k=N, cached", n, times, cs, temp)
  memory["peak_after_dense_step_with_cache"] = peak_bytes()

  # The same budget with each block's input carried as a copy instead of read in place.
  carry_step = jit_astraea_step(graphdef, config=dataclasses.replace(acfg, inplace_input=False))
  time_sparse(sparse_ks[0], carry_step, f"astraea k={sparse_ks[0]}, carried input")

  for k in sparse_ks[1:]:
    if timer.out_of_time():
      print(f"time limit reached: skipping k={k} and later", flush=True)
      break
    time_sparse(k)

  # The pure cache step (k = 0): embedding, head and the skip counters only.
  if not timer.out_of_time():
    time_sparse(0)

  # The first step, timed last: each call builds a new cache while the previous one is alive.
  times = []
  for _ in range(args.runs):
    start = time.perf_counter()
    out, cache = compiled_first(*fixed, None)
    jax.block_until_ready((out, cache))
    times.append((time.perf_counter() - start) * 1e3)
  record("astraea k=N, first", n, times, cs_first, temp_first, rel_err_vs_dense=fill_err)

  # 3. The selection machinery alone (blocks replaced by a gather of their input rows).
  probe = jit_astraea_step(graphdef, config=acfg, block_fn=selection_only_block)
  for k in sparse_ks:
    if timer.out_of_time():
      print(f"time limit reached: skipping the overhead probe at k={k} and later", flush=True)
      break
    compiled, cs, temp = timer.compile(probe, *fixed, cache, num_selected=k)
    times, out, cache = timer.time_chain(compiled, fixed, cache)
    record(f"selection only k={k}", k, times, cs, temp)
  # The other top-k method, same probe (the selected set is the same; only its cost differs).
  other = "radix" if args.selection == "sort" else "sort"
  probe_other = jit_astraea_step(graphdef, config=dataclasses.replace(acfg, selection=other),
                                 block_fn=selection_only_block)
  for k in sparse_ks:
    if timer.out_of_time():
      break
    compiled, cs, temp = timer.compile(probe_other, *fixed, cache, num_selected=k)
    times, out, cache = timer.time_chain(compiled, fixed, cache)
    record(f"selection only ({other}) k={k}", k, times, cs, temp)

  # 4. Loop totals: the sum over the steps of each step's per-k time.
  def step_ms(i, k):
    if k == n:
      return rows["astraea k=N, first" if i == 0 else "astraea k=N, cached"]["median_ms"]
    row = rows.get(f"astraea k={k}")
    return None if row is None else row["median_ms"]

  dense_loop_s = args.steps * rows["dense (model)"]["median_ms"] / 1e3
  diffusers_loop_s = (2 * args.steps * args.diffusers_ms / 1e3
                      if b == 2 and args.diffusers_ms is not None else None)
  loops = {}
  for name, s in schedules.items():
    ks = [s.num_selected(i, n) for i in range(args.steps)]
    if name == "dense":
      total = dense_loop_s
    else:
      per = [step_ms(i, k) for i, k in enumerate(ks)]
      total = None if None in per else sum(per) / 1e3
    overhead = None
    sel = [rows.get(f"selection only k={k}") for k in ks if 0 < k < n]
    if sel and None not in sel and total:
      overhead = sum(r["median_ms"] for r in sel) / 1e3 / total
    loops[name] = {
        "thetas": list(s.thetas), "mean_theta": s.mean, "effective_mean": s.effective_mean(n),
        "loop_s": total,
        "speedup_vs_dense": None if total is None else dense_loop_s / total,
        "speedup_vs_diffusers": (None if total is None or diffusers_loop_s is None
                                 else diffusers_loop_s / total),
        "selection_overhead_fraction": overhead,
    }

  record_json = {
      "benchmark": "astraea_speed",
      "device": jax.devices()[0].device_kind,
      "backend": jax.default_backend(),
      "jax": jax.__version__,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
      "preset": args.preset,
      "astraea_config": dataclasses.asdict(acfg),
      "latents": [b, config.in_channels, t, y, x],
      "tokens": n,
      "text_tokens": m,
      "steps": args.steps,
      "loop_time_method": "sum over steps of the median per-step time of that step's k",
      "diffusers_ms_per_forward_batch1": args.diffusers_ms,
      "diffusers_loop_s": diffusers_loop_s,
      "memory": {
          "params_and_inputs_gib": gib(base_bytes),
          "peak_dense_gib": gib(peak_dense),
          **{f"{key}_gib": gib(value) for key, value in memory.items()},
          "token_cache_gib": gib(cache_bytes),
          "token_cache_bytes_per_token_per_block": cache_bytes_per_token_per_block(
              config.hidden_size, acfg, jnp.dtype(config.dtype)),
          "bf16_hidden_vector_bytes": 2 * config.hidden_size,
      },
      "sparse_outputs_finite": sparse_outputs_finite,
      "variants": rows,
      "loops": loops,
      "wall_s": time.perf_counter() - t_start,
  }
  out_path = Path(args.out) if args.out else _RESULTS / f"astraea_speed-{device_slug()}.json"
  out_path.parent.mkdir(parents=True, exist_ok=True)
  out_path.write_text(json.dumps(record_json, indent=1) + "\n")

  print(f"\nwrote {out_path}")
  mem = record_json["memory"]
  print("memory (GiB): " + ", ".join(f"{key[:-4]} {value:.2f}" for key, value in mem.items()
                                      if key.endswith("_gib") and value is not None))
  print(f"{'variant':>24} {'k':>6} {'ms/step':>8}")
  for name, r in rows.items():
    print(f"{name:>24} {r['k']:>6} {r['median_ms']:>8.1f}")
  print(f"{'schedule':>34} {'loop s':>7} {'x dense':>7} {'x diffusers':>11} {'sel. ovh':>8}")
  for name, r in loops.items():
    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    print(f"{name:>34} {fmt(r['loop_s'], '7.1f'):>7} {fmt(r['speedup_vs_dense'], '.2f'):>7} "
          f"{fmt(r['speedup_vs_diffusers'], '.2f'):>11} "
          f"{fmt(r['selection_overhead_fraction'], '.1%'):>8}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
