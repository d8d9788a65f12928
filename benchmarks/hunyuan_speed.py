"""Speed of the ASTRAEA-accelerated HunyuanVideo transformer against the same dense forward.

ASTRAEA (arXiv 2506.05096) reports, for HunyuanVideo (5 s videos, A100), 1.39x / 1.93x / 2.38x
end-to-end at budgets 70% / 50% / 40%. This measures the same budgets for this project's forward
(`astraea_jax.acceleration.hunyuan_astraea`: k = round(theta * N) video tokens per block, text
tokens always computed) against this project's dense forward.

Default: the full-size `hunyuanvideo-t2v` preset (13B transformer, 20 dual + 40 single blocks) with
random weights built on the device in bf16, batch 1 (HunyuanVideo's guidance is embedded: no CFG
batch), 544x960 pixels x 129 frames (5 s at 24 fps). The causal 3D VAE divides height and width by
8 and maps 4t + 1 frames to t + 1 latents: latents [1, 16, 33, 68, 120], and the (1, 2, 2) patch
gives the token grid 33 x 34 x 60, N = 67,320 video tokens. Text: M = 256 LLM tokens, the text
encoder's maximum length in HunyuanVideo (`--text-len 256`, LLaVA-LLaMA-3-8B states of width
4096), all valid (padding only shortens the key length, `--text-valid`); embedded guidance 6.0 x
1000; timestep 500.

Memory at the default size: parameters ~25.7 GB; the token cache holds per block and video token a
bf16 output (2 C = 6 KiB) plus a 64-float sketch and two scalars, 60 x 67,320 x 6,408 B = 25.9 GB;
one block's live activations over N + M tokens add ~12 GB: ~63 GB (59 GiB), which fits an 80 GB
H100. Smaller settings: `--size 480x848` (N = 52,470 at 129 frames, ~51 GiB), `--frames 65`
(N = 34,680, ~42 GiB); the script estimates the total before building anything and stops with that
suggestion if it does not fit the device.

Dense baseline: `hunyuan_astraea.dense_lse_forward`, every block dense through the same attention
path as the accelerated forward (the project's LSE kernel, the text mask as a key length), so the
speedup compares like with like. The model's own `__call__` (masked `attention`, which defers to
cuDNN on GPU) is also tried last and reported if it runs.

A step's time depends only on its k, so every distinct k is compiled once and timed as the median
of `--runs` calls (after one warm-up call; the cache donated and chained). A budget's loop time is
the sum over `--steps` (50) steps: step 0 is the dense cache-filling step, steps 1 .. 49 run
k = round(theta * N) (uniform theta; effective mean (1 + 49 theta) / 50). The dense loop is 50
dense forwards. `--schedule FILE ...` adds the loop time of budget schedules (e.g. searched ones;
a k = N step after the first counts the first step's time). Variants whose estimated time
(compile + calls) would pass `--time-limit` (420 s) are skipped and listed, which keeps the whole
run under 9 minutes.

    PYTHONPATH=. python3 benchmarks/hunyuan_speed.py [--budgets 0.7 0.5 0.4] [--runs 2]
    PYTHONPATH=. python3 benchmarks/hunyuan_speed.py --size 480x848 --frames 65
    PYTHONPATH=. python3 benchmarks/hunyuan_speed.py --quick        # tiny model, CPU check

Writes benchmarks/results/hunyuan_speed-<device>.json (device, versions, date, command, numbers)
and prints a table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from astraea_jax.acceleration.config import AstraeaConfig
from astraea_jax.acceleration.hunyuan_astraea import dense_lse_forward, jit_hunyuan_astraea_step
from astraea_jax.acceleration.schedule import BudgetSchedule
from astraea_jax.acceleration.token_cache import cache_bytes_per_token_per_block
from astraea_jax.models.hunyuan import HunyuanConfig, HunyuanVideoTransformer3DModel

sys.path.insert(0, str(Path(__file__).parent))
from benchutil import (RESULTS, device_slug, init_on_device,  # noqa: E402  pylint: disable=wrong-import-position
                       kernel_times, load_schedules)
from benchutil import time_chained as chain_calls  # noqa: E402  pylint: disable=wrong-import-position

PAPER = {"setting": "HunyuanVideo, 5 s video, A100, end to end",
         "speedup": {"0.7": 1.39, "0.5": 1.93, "0.4": 2.38}}
GUIDANCE = 6000.0  # HunyuanVideo's default embedded guidance scale 6.0, times 1000
TIMESTEP = 500.0


def gib(b) -> float | None:
  return None if b is None else b / 2**30


def memory_stat(key: str) -> int | None:
  return (jax.devices()[0].memory_stats() or {}).get(key)


def latent_shape(config: HunyuanConfig, height: int, width: int, frames: int, batch: int):
  """`[B, 16, (F - 1) / 4 + 1, H / 8, W / 8]`; ValueError unless the sizes fit the VAE and patch."""
  if (frames - 1) % 4:
    raise ValueError(f"--frames {frames} must be 4t + 1 (the causal VAE's temporal stride)")
  if height % 16 or width % 16:
    raise ValueError(f"--size {height}x{width}: height and width must be multiples of 16 (VAE 8 x "
                     f"patch 2)")
  return (batch, config.in_channels, (frames - 1) // 4 + 1, height // 8, width // 8)


def estimate_bytes(config: HunyuanConfig, params: int, batch: int, n: int, m: int,
                   acfg: AstraeaConfig) -> dict[str, int]:
  """Rough device memory of an accelerated step: parameters, the token cache and one block's
  live activations (~16 hidden and 3 MLP-wide vectors per token, bf16) over the N + M rows."""
  item = jnp.dtype(config.dtype).itemsize
  layers = config.num_layers + config.num_single_layers
  cache = cache_bytes_per_token_per_block(config.hidden_size, acfg, jnp.dtype(config.dtype))
  return {"params": params, "token_cache": cache * layers * batch * n,
          "activations": batch * (n + m) * (16 * config.hidden_size + 3 * config.mlp_dim) * item}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny model and video (CPU check)")
  parser.add_argument("--preset", default=None, help="default hunyuanvideo-t2v (tiny with --quick)")
  parser.add_argument("--size", default=None, metavar="HxW",
                      help="pixels, height x width (default 544x960; 64x96 with --quick)")
  parser.add_argument("--frames", type=int, default=None, help="default 129 (9 with --quick)")
  parser.add_argument("--text-tokens", type=int, default=None, help="M (default 256; 8 --quick)")
  parser.add_argument("--text-valid", type=int, default=None, help="valid text tokens (all)")
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--budgets", type=float, nargs="+", default=[0.7, 0.5, 0.4])
  parser.add_argument("--schedule", nargs="+", default=[], metavar="FILE",
                      help="budget schedule JSON files (e.g. searched ones) whose loop time to "
                           "report too; resampled to --steps where their length differs")
  parser.add_argument("--runs", type=int, default=2, help="timed calls per variant (median)")
  parser.add_argument("--delta-mode", default="sketch", choices=["sketch", "exact"])
  parser.add_argument("--selection", default="sort", choices=["sort", "radix"])
  parser.add_argument("--time-limit", type=float, default=420.0,
                      help="seconds; variants that would end past it are skipped")
  parser.add_argument("--skip-model-dense", action="store_true",
                      help="do not try the model's own dense __call__")
  parser.add_argument("--profile", default=None, metavar="DIR",
                      help="trace the dense step and the smallest budget's step into DIR and "
                           "print their GPU kernel time by kernel")
  parser.add_argument("--out", default=None, help="JSON path (default results/hunyuan_speed-<dev>)")
  args = parser.parse_args(argv)
  t_start = time.perf_counter()
  deadline = t_start + args.time_limit

  quick = args.quick
  preset = args.preset or ("tiny" if quick else "hunyuanvideo-t2v")
  height, width = (int(v) for v in (args.size or ("64x96" if quick else "544x960")).split("x"))
  frames = args.frames or (9 if quick else 129)
  m = args.text_tokens or (8 if quick else 256)
  valid = m if args.text_valid is None else args.text_valid
  if not 1 <= valid <= m:
    raise SystemExit(f"--text-valid {valid} must lie in [1, {m}]")
  schedules = load_schedules(args.schedule, args.steps)
  config = HunyuanConfig.preset(preset)
  acfg = AstraeaConfig(delta_mode=args.delta_mode, selection=args.selection)
  b = 1
  shape = latent_shape(config, height, width, frames, b)
  grid = tuple(d // p for d, p in zip(shape[2:], config.patch))
  n = math.prod(grid)
  make = lambda: HunyuanVideoTransformer3DModel(config, rngs=nnx.Rngs(0))  # noqa: E731
  abstract = nnx.state(nnx.eval_shape(make), nnx.Param)
  params = sum(a.size * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(abstract))
  estimate = estimate_bytes(config, params, b, n, m, acfg)
  limit = memory_stat("bytes_limit")
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {preset}, {height}x{width} x "
        f"{frames} frames -> latents {list(shape)}, grid {grid}: N={n}, M={m} ({valid} valid); "
        f"estimated GiB: " + ", ".join(f"{k} {gib(v):.1f}" for k, v in estimate.items())
        + (f" of {gib(limit):.1f}" if limit else ""), flush=True)
  if limit and sum(estimate.values()) > 0.95 * limit:
    raise SystemExit(f"estimated {gib(sum(estimate.values())):.1f} GiB does not fit "
                     f"{gib(limit):.1f} GiB: try --size 480x848 or --frames 65")

  graphdef, state = init_on_device(make)
  rng = np.random.default_rng(0)
  dt = jnp.dtype(config.dtype)
  latents = jnp.asarray(rng.standard_normal(shape, np.float32))
  text = jnp.asarray(rng.standard_normal((b, m, config.text_embed_dim), np.float32)).astype(dt)
  mask = jnp.asarray(np.arange(m)[None, :] < valid)  # [B, M]
  pooled = jnp.asarray(rng.standard_normal((b, config.pooled_projection_dim), np.float32))
  timestep = jnp.full((b,), TIMESTEP, jnp.float32)
  guidance = jnp.full((b,), GUIDANCE, jnp.float32) if config.guidance_embeds else None
  fixed = (state, latents, timestep, text, mask, pooled, guidance)
  jax.block_until_ready(fixed)
  base_bytes = memory_stat("bytes_in_use")
  rows: dict[str, dict] = {}
  skipped: list[str] = []

  def compile_(fn, *a, **static):
    start = time.perf_counter()
    compiled = fn.lower(*a, **static).compile()
    seconds = time.perf_counter() - start
    try:
      temp = compiled.memory_analysis().temp_size_in_bytes
    except Exception:  # pylint: disable=broad-except  (not every backend reports it)
      temp = None
    return compiled, seconds, temp

  def record(name, k, times, compile_s, temp, **extra):
    row = {"k": k, "theta": k / n, "median_ms": statistics.median(times), "runs_ms": times,
           "compile_s": compile_s, "temp_gib": gib(temp), "peak_gib": gib(memory_stat(
               "peak_bytes_in_use")), **extra}
    rows[name] = row
    print(f"{name:>26}: {row['median_ms']:9.1f} ms (compile {compile_s:5.1f} s, temp "
          f"{row['temp_gib'] or 0:.2f} GiB, peak {row['peak_gib'] or 0:.2f} GiB)", flush=True)
    return row

  def time_chained(compiled, cache):
    return chain_calls(compiled, fixed, cache, args.runs)

  def affordable(name, seconds):
    if time.perf_counter() + seconds <= deadline:
      return True
    print(f"time limit: skipping {name} (~{seconds:.0f} s)", flush=True)
    skipped.append(name)
    return False

  # 1. Dense: every block through the LSE attention path, no cache.
  @jax.jit
  def dense(state, latents, timestep, text, mask, pooled, guidance):
    return dense_lse_forward(nnx.merge(graphdef, state), latents, timestep, text, mask, pooled,
                             guidance)

  compiled, compile_s, temp = compile_(dense, *fixed)
  times = []
  for i in range(args.runs + 1):
    start = time.perf_counter()
    dense_out = jax.block_until_ready(compiled(*fixed))
    if i:
      times.append((time.perf_counter() - start) * 1e3)
  record("dense", n, times, compile_s, temp)
  dense_s = rows["dense"]["median_ms"] / 1e3
  profiles: dict[str, dict] = {}
  if args.profile:
    dense_out, profiles["dense"] = kernel_times(compiled, fixed, args.profile, label="dense")
  max_compile = compile_s

  # 2. The first, cache-filling step (k = N, no cache).
  step = jit_hunyuan_astraea_step(graphdef, config=acfg)
  compiled_first, compile_first, temp_first = compile_(step, *fixed, None, num_selected=n)
  start = time.perf_counter()
  out, cache = compiled_first(*fixed, None)
  jax.block_until_ready((out, cache))
  first_times = [(time.perf_counter() - start) * 1e3]
  max_compile = max(max_compile, compile_first)
  ref = dense_out.astype(jnp.float32)
  first_err = float(jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
  cache_bytes = cache.nbytes
  memory = {"peak_after_first_step": memory_stat("peak_bytes_in_use")}
  del dense_out, ref

  # 3. Sparse steps, the smallest budget first (the most telling, if time runs out).
  ks = sorted({BudgetSchedule.uniform(args.steps, t).num_selected(1, n) for t in args.budgets})
  schedule_ks = sorted({sch.num_selected(i, n) for _, sch in schedules.values()
                        for i in range(1, args.steps)} - {n} - set(ks))
  finite = True
  for k in [k for k in ks if 0 < k < n] + schedule_ks:
    name = f"astraea k={k}"
    if not affordable(name, max_compile + (args.runs + 1) * dense_s * max(k / n, 0.3)):
      continue
    compiled, compile_s, temp = compile_(step, *fixed, cache, num_selected=k)
    max_compile = max(max_compile, compile_s)
    times, out, cache = time_chained(compiled, cache)
    finite &= bool(jnp.isfinite(out).all())
    record(name, k, times, compile_s, temp)
    if args.profile and k in ks:
      (out, cache), profiles[name] = kernel_times(compiled, (*fixed, cache), args.profile,
                                                  label=name)
  # A later dense step whose block caches no partial step reads (see `HunyuanAstraeaStepModel`).
  if any(not sch.block_cache_read_after(i, n) for _, sch in schedules.values()
         for i in range(1, args.steps) if sch.num_selected(i, n) == n):
    name = "astraea k=N, light"
    if affordable(name, max_compile + (args.runs + 2) * dense_s):
      # Timed as whole-step loops run it: on the last-output cache a light step leaves.
      out, cache = step(*fixed, cache, num_selected=n, refresh_cache=False)
      compiled, compile_s, temp = compile_(step, *fixed, cache, num_selected=n,
                                           refresh_cache=False)
      times, out, cache = time_chained(compiled, cache)
      record(name, n, times, compile_s, temp)
  memory["peak_after_sparse_steps"] = memory_stat("peak_bytes_in_use")

  # 4. The first step again (each call builds a cache, so the previous one is freed first).
  for _ in range(args.runs - 1):
    if not affordable("first step re-run", 1.5 * dense_s):
      break
    del out, cache
    start = time.perf_counter()
    out, cache = compiled_first(*fixed, None)
    jax.block_until_ready((out, cache))
    first_times.append((time.perf_counter() - start) * 1e3)
  record("astraea k=N, first", n, first_times, compile_first, temp_first,
         rel_err_vs_dense=first_err)
  del out, cache

  # 5. The model's own dense forward (masked `attention`), if it runs here.
  model_dense = None
  if not args.skip_model_dense and affordable("model __call__", max_compile + 3 * dense_s):
    @jax.jit
    def plain(state, latents, timestep, text, mask, pooled, guidance):
      return nnx.merge(graphdef, state)(latents, timestep, text, mask, pooled, guidance)

    try:
      compiled, compile_s, temp = compile_(plain, *fixed)
      times = []
      for i in range(args.runs + 1):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*fixed))
        if i:
          times.append((time.perf_counter() - start) * 1e3)
      model_dense = record("model __call__ (dense)", n, times, compile_s, temp)
    except Exception as e:  # pylint: disable=broad-except  (reported, not fatal)
      model_dense = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
      print(f"model __call__ (dense) failed: {model_dense['error']}", flush=True)

  # 6. 50-step loops: step 0 dense (cache-filling), steps 1 .. S-1 at k.
  first_ms = rows["astraea k=N, first"]["median_ms"]
  dense_loop_s = args.steps * dense_s
  model_loop_s = (args.steps * model_dense["median_ms"] / 1e3
                  if model_dense and "median_ms" in model_dense else None)
  loops = {}
  for theta in args.budgets:
    s = BudgetSchedule.uniform(args.steps, theta)
    k = s.num_selected(1, n)
    row = rows.get(f"astraea k={k}")
    total = None if row is None else (first_ms + (args.steps - 1) * row["median_ms"]) / 1e3
    loops[f"{theta:g}"] = {
        "k": k, "effective_mean": s.effective_mean(n), "loop_s": total,
        "speedup_vs_dense": None if total is None else dense_loop_s / total,
        "speedup_vs_model_call": None if total is None or model_loop_s is None
        else model_loop_s / total,
        "paper_speedup": PAPER["speedup"].get(f"{theta:g}")}

  def step_ms(i, k, schedule):
    if k < n:
      return rows.get(f"astraea k={k}", {}).get("median_ms")
    if not schedule.block_cache_read_after(i, n) and "astraea k=N, light" in rows:
      return rows["astraea k=N, light"]["median_ms"]
    return first_ms  # a dense step that refills the cache, priced as the first one

  for name, (path, schedule) in schedules.items():
    per = [step_ms(i, schedule.num_selected(i, n), schedule) for i in range(args.steps)]
    total = None if None in per else sum(per) / 1e3
    loops[f"schedule {name}"] = {
        "file": str(path), "thetas": list(schedule.thetas), "k": "-", "mean": schedule.mean,
        "effective_mean": schedule.effective_mean(n), "loop_s": total,
        "speedup_vs_dense": None if total is None else dense_loop_s / total,
        "speedup_vs_model_call": None if total is None or model_loop_s is None
        else model_loop_s / total,
        "paper_speedup": None}

  record_json = {
      "benchmark": "hunyuan_speed",
      "device": jax.devices()[0].device_kind,
      "backend": jax.default_backend(),
      "jax": jax.__version__,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
      "preset": preset,
      "hunyuan_config": config.to_dict(),
      "astraea_config": dataclasses.asdict(acfg),
      "video": {"height": height, "width": width, "frames": frames},
      "latents": list(shape),
      "grid": list(grid),
      "tokens": n,
      "text_tokens": m,
      "text_valid": valid,
      "batch": b,
      "steps": args.steps,
      "loop_time_method": "step 0: first (cache-filling) step; steps 1..S-1: median per-step time "
                          "of that step's k (k = N: the first step's time); dense: S x dense "
                          "forward (same attention path)",
      "memory": {
          "estimate_gib": {k: gib(v) for k, v in estimate.items()},
          "device_limit_gib": gib(limit),
          "params_and_inputs_gib": gib(base_bytes),
          **{f"{k}_gib": gib(v) for k, v in memory.items()},
          "token_cache_gib": gib(cache_bytes),
      },
      "sparse_outputs_finite": finite,
      "variants": rows,
      "model_call_dense": model_dense,
      "loops": loops,
      "profiles": profiles,
      "paper": PAPER,
      "skipped": skipped,
      "wall_s": time.perf_counter() - t_start,
  }
  out_path = Path(args.out) if args.out else RESULTS / f"hunyuan_speed-{device_slug()}.json"
  out_path.parent.mkdir(parents=True, exist_ok=True)
  out_path.write_text(json.dumps(record_json, indent=1) + "\n")

  print(f"\nwrote {out_path} ({record_json['wall_s']:.0f} s)")
  print(f"{'variant':>26} {'k':>7} {'ms/step':>9}")
  for name, r in rows.items():
    print(f"{name:>26} {r['k']:>7} {r['median_ms']:>9.1f}")
  fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
  w = max([8, *map(len, loops)])
  print(f"{'budget':>{w}} {'k':>7} {'loop s':>8} {'x dense':>8} {'paper (A100)':>12}")
  print(f"{'dense':>{w}} {n:>7} {dense_loop_s:>8.1f} {1.0:>8.2f} {'1.00':>12}")
  for name, r in loops.items():
    print(f"{name:>{w}} {r['k']:>7} {fmt(r['loop_s'], '8.1f'):>8} "
          f"{fmt(r['speedup_vs_dense'], '8.2f'):>8} {fmt(r['paper_speedup'], '.2f'):>12}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
