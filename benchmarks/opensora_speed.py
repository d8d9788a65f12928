"""Speed of the ASTRAEA-accelerated OpenSora v1.2 STDiT3 against this project's dense STDiT3.

ASTRAEA (arXiv 2506.05096, Table 1) reports, for OpenSora v1.2 at 4 s on an A100, 1.43x / 1.86x /
2.31x end-to-end at budgets 70% / 50% / 40%. This measures the same budgets for this project's
forward (`astraea_jax.acceleration.opensora_astraea`: K = round(theta * S) patch positions per
block, in every frame, rounded up to even as the loop adapter does) against this project's dense
STDiT3. `--schedule FILE ...` adds the loop time of budget schedules (e.g. searched ones).

Default: the full-size `opensora-v1.2` preset (STDiT3-XL/2, 1.1B parameters) with random weights
built on the device, bf16, classifier-free guidance as batch 2, 300 caption tokens (all valid), at
OpenSora v1.2's "480p" 9:16 (480 x 854 pixels) and "4s" (102 frames). The latent grid follows the
v1.2 VAE (`VideoAutoencoderPipeline.get_latent_size`): the spatial VAE divides height and width by
8 (floor: 854 -> 106), the temporal VAE maps each 17-frame micro-clip to 5 latent frames (17
padded to 20, divided by 4), so 102 = 6 x 17 frames -> 30. Latents [2, 4, 30, 60, 106]; with the
(1, 2, 2) patch the token grid is t, y, x = 30, 30, 53: S = 1,590 positions per frame, N = 47,700
tokens per sample.

A step's time depends only on its K, not on which positions or which step, so every distinct K is
compiled once and timed as the median of `--runs` calls (the cache donated and chained). A budget's
loop time is the sum over `--steps` steps (RFLOW's 30) of the per-step time of each step's K: step 0
is the dense cache-filling step, the other steps run K = round(theta * S) (uniform theta, so the
effective mean is (1 + 29 theta) / 30). The dense loop is `--steps` calls of the plain model.

    PYTHONPATH=. python3 benchmarks/opensora_speed.py [--budgets 0.7 0.5 0.4] [--runs 3]
    PYTHONPATH=. python3 benchmarks/opensora_speed.py --quick      # tiny model, CPU check

Writes benchmarks/results/opensora_speed-<device>.json (device, versions, date, command, numbers)
and prints a table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from astraea_jax.acceleration.config import AstraeaConfig
from astraea_jax.acceleration.opensora_astraea import (K_MULTIPLE, OpenSoraAstraeaStepModel,
                                                      jit_opensora_astraea_step, num_positions)
from astraea_jax.acceleration.schedule import BudgetSchedule
from astraea_jax.acceleration.token_cache import cache_bytes_per_token_per_block
from astraea_jax.models.opensora import STDiT3, STDiT3Config
from astraea_jax.pipeline_opensora import OpenSoraDenseStepModel
from astraea_jax.sampling import loop, rflow
from benchutil import (RESULTS as _RESULTS, device_slug, init_on_device,  # noqa: E402
                       kernel_times, load_schedules)

# Table 1 of the paper: OpenSora v1.2, 4 s, A100, end-to-end speedup at each budget.
PAPER_SPEEDUP = {0.7: 1.43, 0.5: 1.86, 0.4: 2.31}
MICRO_FRAMES, MICRO_LATENT, TIME_STRIDE, SPACE_STRIDE = 17, 5, 4, 8


def latent_size(frames: int, height: int, width: int) -> tuple[int, int, int]:
  """(T, Y, X) of OpenSora v1.2's VAE for a video of `frames` x `height` x `width` pixels."""
  whole, rest = divmod(frames, MICRO_FRAMES)
  t = whole * MICRO_LATENT + -(-rest // TIME_STRIDE)  # a short last clip is padded to 4 frames
  return t, height // SPACE_STRIDE, width // SPACE_STRIDE


def peak_gib() -> float | None:
  b = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
  return None if b is None else b / 2**30


def end_to_end(graphdef, state, noise, captions, fps, h_px, w_px, steps, schedules, acfg,
               video, deadline) -> dict[str, float | None]:
  """Wall seconds of whole `denoise` loops: the dense step model, then each schedule's
  `OpenSoraAstraeaStepModel`; each loop runs twice (the first compiles) and the second is timed."""
  frames, height, width = video
  model = nnx.merge(graphdef, state)
  scheduler = rflow.RFlowScheduler(rflow.RFlowConfig(num_sampling_steps=steps, cfg_scale=7.0),
                                   height=float(height), width=float(width),
                                   num_frames=float(frames))
  sched_state = scheduler.set_timesteps(steps)
  cond = dict(fps=fps[:1], height=h_px[:1], width=w_px[:1])
  models = {"dense": lambda: OpenSoraDenseStepModel(model, captions, None, **cond)}
  for name, (_, schedule) in schedules.items():
    models[name] = functools.partial(OpenSoraAstraeaStepModel, model, schedule, captions,
                                     config=acfg, **cond)
  seconds: dict[str, float | None] = {}
  for name, make in models.items():
    if time.perf_counter() > deadline:
      print(f"time limit reached: no end-to-end loop of {name}", flush=True)
      seconds[name] = None
      continue
    for run in range(2):
      start = time.perf_counter()
      out, _, _ = loop.denoise(make(), noise, scheduler, sched_state, guidance_scale=7.0,
                               progress=False)
      jax.block_until_ready(out)
      seconds[name] = time.perf_counter() - start
      print(f"{'e2e ' + name:>22}: {seconds[name]:9.2f} s{' (compiling)' if run == 0 else ''}",
            flush=True)
  return seconds


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="tiny preset, 17 frames of 64 x 96, 4 steps, 1 run: checks the script")
  parser.add_argument("--preset", default=None, help="default opensora-v1.2 (tiny with --quick)")
  parser.add_argument("--batch", type=int, default=2, help="2 = the CFG cond/uncond pair")
  parser.add_argument("--frames", type=int, default=None, help="pixel frames (default 102)")
  parser.add_argument("--height", type=int, default=None, help="pixels (default 480)")
  parser.add_argument("--width", type=int, default=None, help="pixels (default 854)")
  parser.add_argument("--text-tokens", type=int, default=None,
                      help="caption tokens (default: the preset's model_max_length)")
  parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 30)")
  parser.add_argument("--budgets", type=float, nargs="+", default=[0.7, 0.5, 0.4])
  parser.add_argument("--schedule", nargs="+", default=[], metavar="FILE",
                      help="budget schedule JSON files (e.g. searched ones) whose loop time to "
                           "report too; resampled to --steps where their length differs")
  parser.add_argument("--delta-mode", default="sketch", choices=["sketch", "exact"])
  parser.add_argument("--runs", type=int, default=None, help="timed calls per variant (default 3)")
  parser.add_argument("--time-limit", type=float, default=360.0,
                      help="seconds; later variants are skipped past it (partial results kept)")
  parser.add_argument("--e2e", action="store_true",
                      help="also time whole sampling loops (RFLOW, guidance 7) of the dense model "
                           "and of each --schedule, as generate runs them")
  parser.add_argument("--profile", default=None, metavar="DIR",
                      help="trace the dense forward and each budget's step into DIR and "
                           "store their GPU kernel time by kernel")
  parser.add_argument("--out", default=None,
                      help="JSON path (default results/opensora_speed-<device>.json)")
  args = parser.parse_args(argv)
  t_start = time.perf_counter()
  deadline = t_start + args.time_limit
  quick = args.quick
  preset = args.preset or ("tiny" if quick else "opensora-v1.2")
  frames = args.frames or (17 if quick else 102)
  height = args.height or (64 if quick else 480)
  width = args.width or (96 if quick else 854)
  steps = args.steps or (4 if quick else 30)
  runs = args.runs or (1 if quick else 3)
  schedules = load_schedules(args.schedule, steps)

  config = STDiT3Config.preset(preset)
  acfg = AstraeaConfig(delta_mode=args.delta_mode)
  b = args.batch
  m = args.text_tokens or config.model_max_length
  t, y, x = latent_size(frames, height, width)
  shape = (b, config.in_channels, t, y, x)
  s = num_positions(config.patch_size, shape)
  grid_t = -(-t // config.patch_size[0])
  n = grid_t * s
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {preset} ({config.dtype}), "
        f"{frames} frames of {height} x {width} -> latents {list(shape)} -> t={grid_t}, S={s}, "
        f"N={n}, M={m}", flush=True)

  graphdef, state = init_on_device(lambda: STDiT3(config, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  latents = jnp.asarray(rng.standard_normal(shape, np.float32))
  captions = jnp.asarray(rng.standard_normal((b, 1, m, config.caption_channels), np.float32),
                         config.dtype)
  timestep = jnp.full((b,), 500.0, jnp.float32)
  fps, h_px, w_px = (jnp.full((b,), v, jnp.float32) for v in (24.0, height, width))
  fixed = (state, latents, timestep, captions, None, fps, h_px, w_px)
  jax.block_until_ready(fixed)

  rows: dict[str, dict] = {}

  def record(name, k, times, compile_s, **extra):
    row = {"k": k, "theta": k / s, "median_ms": statistics.median(times), "min_ms": min(times),
           "runs_ms": times, "compile_s": compile_s, "peak_gib": peak_gib(), **extra}
    rows[name] = row
    print(f"{name:>22}: {row['median_ms']:9.2f} ms (compile {compile_s:5.1f} s)", flush=True)

  def timed(fn, *a):
    start = time.perf_counter()
    res = jax.block_until_ready(fn(*a))
    return res, (time.perf_counter() - start) * 1e3

  # 1. The project's dense forward (the plain model: no LSE, no cache).
  @jax.jit
  def dense_forward(state, latents, timestep, captions, mask, fps, h_px, w_px):
    return nnx.merge(graphdef, state)(latents, timestep, captions, mask=mask, fps=fps,
                                      height=h_px, width=w_px)

  start = time.perf_counter()
  compiled = dense_forward.lower(*fixed).compile()
  cs = time.perf_counter() - start
  times = []
  for i in range(runs + 1):
    dense_out, ms = timed(compiled, *fixed)
    times.append(ms)
  record("dense (model)", s, times[1:], cs)

  profiles: dict[str, dict] = {}
  if args.profile:
    _, profiles["dense (model)"] = kernel_times(compiled, fixed, args.profile, label="dense")

  # 2. ASTRAEA: the cache-filling first step, then each sparse K with the cache chained.
  step = jit_opensora_astraea_step(graphdef, config=acfg)
  start = time.perf_counter()
  first = step.lower(*fixed, None, num_selected=s).compile()
  cs_first = time.perf_counter() - start
  (out, cache), first_ms = timed(first, *fixed, None)
  dense32 = dense_out.astype(jnp.float32)
  fill_err = float(jnp.linalg.norm(out.astype(jnp.float32) - dense32) / jnp.linalg.norm(dense32))
  cache_gib = cache.nbytes / 2**30
  del dense_out, dense32, out

  def time_step(k, name, refresh_cache=True):
    nonlocal cache
    start = time.perf_counter()
    compiled = step.lower(*fixed, cache, num_selected=k, refresh_cache=refresh_cache).compile()
    cs = time.perf_counter() - start
    times, finite = [], True
    for i in range(runs + 1):
      (out, cache), ms = timed(compiled, *fixed, cache)
      times.append(ms)
      finite &= bool(jnp.isfinite(out).all())
    record(name, k, times[1:], cs, outputs_finite=finite)
    if args.profile and k in ks.values():
      (_, cache), profiles[name] = kernel_times(compiled, (*fixed, cache), args.profile,
                                                label=name)

  budgets = sorted(args.budgets)  # the most telling (smallest) first, in case time runs out
  ks = {budget: BudgetSchedule.uniform(steps, budget).num_selected(1, s, multiple=K_MULTIPLE)
        for budget in budgets}
  for budget in budgets:
    k = ks[budget]
    if f"astraea K={k}" in rows:
      continue
    if time.perf_counter() > deadline:
      print(f"time limit reached: skipping K={k} (budget {budget:g}) and later", flush=True)
      continue
    if 0 < k < s:
      time_step(k, f"astraea K={k}")
  schedule_ks = sorted({sch.num_selected(i, s, multiple=K_MULTIPLE)
                        for _, sch in schedules.values() for i in range(1, steps)}
                       - {0, s} - set(ks.values()))
  for k in schedule_ks:
    if time.perf_counter() > deadline:
      print(f"time limit reached: skipping K={k} of the --schedule files", flush=True)
      break
    time_step(k, f"astraea K={k}")
  if time.perf_counter() < deadline:
    time_step(0, "astraea K=0")
  if time.perf_counter() < deadline:
    time_step(s, "astraea K=S, cached")
  if time.perf_counter() < deadline:
    # Timed as whole-step loops run it: on the last-output cache a light step leaves.
    _, cache = step(*fixed, cache, num_selected=s, refresh_cache=False)
    time_step(s, "astraea K=S, light", refresh_cache=False)
  # The first step, timed last: each call builds a new cache.
  times = [first_ms]
  for _ in range(runs if time.perf_counter() < deadline else 0):
    del cache
    (out, cache), ms = timed(first, *fixed, None)
    times.append(ms)
  record("astraea K=S, first", s, times[1:] or times, cs_first, rel_err_vs_dense=fill_err)

  # 3. Loop totals: the sum over the steps of each step's per-K time. A dense step whose block
  # caches no partial step reads runs light, as `OpenSoraAstraeaStepModel` does.
  def step_ms(i, k, schedule):
    if k == s:
      # Step 0 too runs light where no partial step reads its cache (no cache to fill then).
      light = not schedule.block_cache_read_after(i, s, multiple=K_MULTIPLE)
      row = rows.get("astraea K=S, " + ("light" if light else "first" if i == 0 else "cached"))
      return None if row is None else row["median_ms"]
    row = rows.get(f"astraea K={k}")
    return None if row is None else row["median_ms"]

  dense_loop_s = steps * rows["dense (model)"]["median_ms"] / 1e3
  loops = {"dense": {"thetas": [1.0] * steps, "effective_mean": 1.0, "loop_s": dense_loop_s,
                     "speedup_vs_dense": 1.0, "paper_speedup": None}}
  for budget in sorted(args.budgets, reverse=True):
    schedule = BudgetSchedule.uniform(steps, budget)
    per = [step_ms(i, schedule.num_selected(i, s, multiple=K_MULTIPLE), schedule)
           for i in range(steps)]
    total = None if None in per else sum(per) / 1e3
    loops[f"uniform {budget:g}"] = {
        "thetas": list(schedule.thetas), "k": ks[budget],
        "effective_mean": schedule.effective_mean(s, multiple=K_MULTIPLE), "loop_s": total,
        "speedup_vs_dense": None if total is None else dense_loop_s / total,
        "paper_speedup": PAPER_SPEEDUP.get(round(budget, 6)),
    }

  for name, (path, schedule) in schedules.items():
    per = [step_ms(i, schedule.num_selected(i, s, multiple=K_MULTIPLE), schedule)
           for i in range(steps)]
    total = None if None in per else sum(per) / 1e3
    loops[f"schedule {name}"] = {
        "file": str(path), "thetas": list(schedule.thetas), "mean": schedule.mean,
        "effective_mean": schedule.effective_mean(s, multiple=K_MULTIPLE), "loop_s": total,
        "speedup_vs_dense": None if total is None else dense_loop_s / total,
        "paper_speedup": None,
    }

  # 4. With --e2e: whole sampling loops (RFLOW, guidance 7), wall time of the second of two runs.
  if args.e2e:
    del cache
    e2e = end_to_end(graphdef, state, latents[:1], captions, fps, h_px, w_px, steps, schedules,
                     acfg, (frames, height, width), deadline)
    for name, seconds in e2e.items():
      row = loops["dense" if name == "dense" else f"schedule {name}"]
      row["e2e_loop_s"] = seconds
      if "dense" in e2e and seconds is not None:
        row["e2e_speedup_vs_dense"] = e2e["dense"] / seconds

  record_json = {
      "benchmark": "opensora_speed",
      "device": jax.devices()[0].device_kind,
      "backend": jax.default_backend(),
      "jax": jax.__version__,
      "flax": flax.__version__,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
      "preset": preset,
      "model_config": config.to_dict(),
      "astraea_config": dataclasses.asdict(acfg),
      "video": {"frames": frames, "height": height, "width": width},
      "latents": list(shape),
      "token_grid": [grid_t, -(-y // config.patch_size[1]), -(-x // config.patch_size[2])],
      "positions_per_frame": s,
      "tokens": n,
      "text_tokens": m,
      "steps": steps,
      "budget_unit": "K = round(theta * S) patch positions per block, computed in every frame",
      "loop_time_method": ("sum over steps of the median per-step time of that step's K; step 0 "
                           "is the dense cache-filling step; a dense step (step 0 included) runs "
                           "light when no partial step reads its cache; e2e_loop_s (--e2e): wall time of a "
                           "whole RFLOW loop, the second of two runs"),
      "first_step_rel_err_vs_dense": fill_err,
      "token_cache_gib": cache_gib,
      "token_cache_bytes_per_token_per_block": cache_bytes_per_token_per_block(
          config.hidden_size, acfg, jnp.dtype(config.dtype)),
      "paper_speedup_a100": {str(k): v for k, v in PAPER_SPEEDUP.items()},
      "variants": rows,
      "loops": loops,
      "profiles": profiles,
      "wall_s": time.perf_counter() - t_start,
  }
  out_path = Path(args.out) if args.out else _RESULTS / f"opensora_speed-{device_slug()}.json"
  out_path.parent.mkdir(parents=True, exist_ok=True)
  out_path.write_text(json.dumps(record_json, indent=1) + "\n")

  print(f"\nwrote {out_path}")
  print(f"token cache {cache_gib:.2f} GiB; first step vs dense model: relative error "
        f"{fill_err:.2e}; wall {record_json['wall_s']:.0f} s")
  print(f"{'variant':>22} {'K':>6} {'ms/step':>9}")
  for name, r in rows.items():
    print(f"{name:>22} {r['k']:>6} {r['median_ms']:>9.2f}")
  fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
  w = max(map(len, loops))
  print(f"{'schedule':>{w}} {'K':>6} {'mean':>5} {'loop s':>8} {'x dense':>7} {'e2e s':>7} "
        f"{'e2e x':>6} {'paper':>6}")
  for name, r in loops.items():
    print(f"{name:>{w}} {r.get('k', '-'):>6} {r['effective_mean']:>5.3f} "
          f"{fmt(r['loop_s'], '8.2f'):>8} {fmt(r['speedup_vs_dense'], '.3f'):>7} "
          f"{fmt(r.get('e2e_loop_s'), '7.2f'):>7} {fmt(r.get('e2e_speedup_vs_dense'), '.3f'):>6} "
          f"{fmt(r['paper_speedup'], '.2f'):>6}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
