"""Cost and value of the budget schedule search (`astraea_jax.search`; ASTRAEA, arXiv 2506.05096,
Sec. 4).

The paper's evolutionary search costs 34-139 GPU-hours per setting. This benchmark measures ours:

1. Search on the embedded default model at the paper's settings (50 parents, 30 offspring, 30
   generations, 4 calibration prompts of the caption grammar, 20 steps, 17x64x64): wall time,
   compile time, schedules per second (overall and steady state).
2. Value on held-out prompts (disjoint from the calibration ones): PSNR against the dense videos of
   the searched schedule, of the uniform schedule with the same mean theta (dense step 0, the same
   theta afterwards; the honest baseline, since the search may use the +10% of the window), and of
   `generate --budget B` (uniform theta B; its dense step 0 makes its true mean slightly higher).
3. Schedules per second for the Wan2.1-1.3B preset (random weights) at a proxy size (416x240, 17
   frames, 50 steps, 512 text tokens), and the GPU-hours a whole search would take there; with
   `benchmarks/results/astraea_speed-<device>.json` present, also the estimate at the full size.
4. Proxies (while time is left): searches on cheaper settings of the default model (1 calibration
   prompt; 9 frames; 32x32), each schedule then judged at the full size on the held-out prompts, so
   the cheapest proxy whose schedules transfer can be read off.

  PYTHONPATH=. python benchmarks/search_cost.py            # GPU, full settings (< 9 min on H100)
  PYTHONPATH=. python benchmarks/search_cost.py --quick    # CPU smoke run, small settings

Writes `benchmarks/results/search-<device>.json` and prints a short table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import statistics
import sys
import threading
import time
import zlib
from importlib import metadata
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from astraea_jax.acceleration import BudgetSchedule
from astraea_jax.default_model import load_default_pipeline
from astraea_jax.metrics import psnr
from astraea_jax.models.wan import WanConfig
from astraea_jax.pipeline import GenerationConfig, WanPipeline
from astraea_jax.search.algorithm import GAConfig
from astraea_jax.search.fitness import PopulationFitness, calibration_prompts, held_out_prompts
from astraea_jax.search.runner import levels_evaluator, run_search
from astraea_jax.search.space import BudgetSpace

sys.path.insert(0, str(Path(__file__).parent))
# pylint: disable-next=wrong-import-position
from benchutil import RESULTS, build_state, device_slug  # noqa: E402

PAPER_GPU_HOURS = (34, 139)
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileClock:
  """Sums XLA compile seconds reported through `jax.monitoring` on this thread while registered."""

  def __init__(self):
    self.seconds = 0.0
    self._thread = threading.get_ident()
    jax.monitoring.register_event_duration_secs_listener(self)

  def __call__(self, event: str, duration: float, **kwargs) -> None:
    del kwargs
    if event == _COMPILE_EVENT and threading.get_ident() == self._thread:
      self.seconds += duration


@dataclasses.dataclass(frozen=True)
class Settings:
  """One benchmark scale: the default model's search and the Wan proxy."""

  steps: int
  height: int
  width: int
  frames: int
  prompts: int
  held_out: int
  ga: GAConfig
  min_bucket: int
  wan_layers: int | None  # None: the preset's 30
  wan_height: int
  wan_width: int
  wan_frames: int
  wan_steps: int
  wan_text_tokens: int
  wan_prompts: int
  wan_chunk: int
  wan_timed_chunks: int


FULL = Settings(steps=20, height=64, width=64, frames=17, prompts=4, held_out=8, ga=GAConfig(),
                min_bucket=32, wan_layers=None, wan_height=240, wan_width=416, wan_frames=17,
                wan_steps=50, wan_text_tokens=512, wan_prompts=1, wan_chunk=8, wan_timed_chunks=2)
QUICK = Settings(steps=8, height=32, width=32, frames=9, prompts=2, held_out=4,
                 ga=GAConfig(num_parents=8, num_offspring=4, num_generations=4), min_bucket=16,
                 wan_layers=1, wan_height=64, wan_width=64, wan_frames=5, wan_steps=6,
                 wan_text_tokens=16, wan_prompts=1, wan_chunk=2, wan_timed_chunks=2)
# Proxy searches of the default model: overrides of (prompts, frames, height, width).
PROXIES = {"1 prompt": {"prompts": 1}, "9 frames": {"frames": 9},
           "32x32": {"height": 32, "width": 32}, "1 prompt, 9 frames": {"prompts": 1, "frames": 9}}
QUICK_PROXIES = {"1 prompt": {"prompts": 1}}  # exercises the code path only


# -- 1 + 2: the default model ---------------------------------------------------------------------


def search_default(pipe, settings: Settings, budget: float, clock: CompileClock, *, prompts=None,
                   frames=None, height=None, width=None, seed=0,
                   compiler_options: dict | None = None) -> dict:
  cfg = dataclasses.replace(pipe.defaults, steps=settings.steps, seed=seed,
                            frames=frames or settings.frames, height=height or settings.height,
                            width=width or settings.width)
  calib = calibration_prompts(prompts or settings.prompts)
  space = BudgetSpace(num_steps=cfg.steps, budget=budget)
  compile_start, start = clock.seconds, time.perf_counter()
  fitness = PopulationFitness(pipe, calib, cfg, chunk=settings.ga.num_offspring,
                              min_bucket=settings.min_bucket, compiler_options=compiler_options)
  dense_s = time.perf_counter() - start
  result = run_search(space, settings.ga, levels_evaluator(space, fitness), seed=seed)
  wall = time.perf_counter() - start
  gens = [h["seconds"] for h in result.history]
  steady = statistics.median(gens[len(gens) // 2:]) if gens else math.nan
  schedule = space.to_schedule(result.best, name=f"searched-{budget:g}")
  return {
      "frames": cfg.frames, "size": f"{cfg.width}x{cfg.height}", "steps": cfg.steps,
      "tokens": fitness.num_tokens, "prompts": calib, "seconds": wall,
      "dense_reference_seconds": dense_s, "compile_seconds": clock.seconds - compile_start,
      "evaluations": result.evaluations,
      "candidates_per_second": result.evaluations / wall,
      "steady_candidates_per_second": settings.ga.num_offspring / steady,
      "prompt_candidates_per_second_steady": settings.ga.num_offspring * len(calib) / steady,
      "compiled_variants": len(fitness.variants),
      "compiled_ahead": fitness.compiled_ahead,
      "compile_ahead_wall_seconds": fitness.compile_ahead_seconds,
      "compiler_options": compiler_options or {},
      "padding_overhead": (fitness.token_rows + fitness.padded_token_rows) / max(
          fitness.token_rows, 1),
      "gpu_hours": wall / 3600,
      "fitness": result.fitness, "uniform_grid_fitness": result.uniform_fitness,
      "thetas": list(schedule.thetas), "mean": schedule.mean,
      "history": [{k: h[k] for k in ("generation", "best", "mean", "seconds")}
                  for h in result.history]}


def matched_uniform(steps: int, mean: float) -> BudgetSchedule:
  """Dense step 0, then one theta for the rest, with exactly this mean."""
  rest = (mean * steps - 1.0) / (steps - 1)
  return BudgetSchedule((1.0,) + (rest,) * (steps - 1), name=f"uniform-mean-{mean:.3f}")


def held_out_check(pipe, cfg: GenerationConfig, prompts, schedules: dict[str, BudgetSchedule],
                   dense) -> dict:
  """PSNR of each schedule's videos against `dense` (the dense `generate` of the same request)."""
  out = {}
  for name, schedule in schedules.items():
    r = pipe.generate(prompts, cfg, schedule=schedule, progress=False)
    values = [psnr(a, b) for a, b in zip(r.frames, dense.frames)]
    out[name] = {"psnr": float(np.mean(values)), "psnr_per_prompt": values,
                 "latent_mse": float(np.mean(np.square(r.latents - dense.latents))),
                 "mean_theta": schedule.mean, "thetas": list(schedule.thetas),
                 "effective_mean": schedule.effective_mean(r.num_tokens)}
  return out


# -- 3: Wan2.1-1.3B at a proxy size ---------------------------------------------------------------


def wan_proxy(settings: Settings, budget: float, clock: CompileClock, padding: float) -> dict:
  """Schedules per second of the 1.3B preset with full row groups, and a search's GPU-hours.

  Every chunk holds copies of the near-uniform grid schedule of the budget (its compute is that of
  any schedule of the same mean), so each step runs one group without padding and only three
  programs compile (the 30-block model compiles for ~10 s per k on an H100; a real search
  compiles each of its (k, bucket) pairs once). A search's population splits into several groups
  per step; `padding` (the default model search's measured factor) scales the GPU-hours to that.
  """
  config = WanConfig.preset("wan2.1-t2v-1.3b")
  if settings.wan_layers is not None:
    config = dataclasses.replace(config, num_layers=settings.wan_layers)
  graphdef, state = build_state(config)
  model = nnx.merge(graphdef, state)
  m, dim, dtype = settings.wan_text_tokens, config.text_dim, jnp.dtype(config.dtype)

  def encode_text(prompts):  # random but fixed per prompt: umT5 embeddings stand-in
    return jnp.stack([jax.random.normal(jax.random.key(zlib.crc32(p.encode())), (m, dim), dtype)
                      for p in prompts])

  cfg = GenerationConfig(height=settings.wan_height, width=settings.wan_width,
                         frames=settings.wan_frames, steps=settings.wan_steps, guidance=5.0)
  pipe = WanPipeline(name="wan2.1-t2v-1.3b (random weights)", transformer=model,
                     encode_text=encode_text, decode=lambda x: x, spatial_stride=8,
                     temporal_stride=4, default_shift=3.0, defaults=cfg)
  prompts = calibration_prompts(settings.wan_prompts)
  rows = settings.wan_chunk * len(prompts) * 2
  fitness = PopulationFitness(pipe, prompts, cfg, chunk=settings.wan_chunk, min_bucket=rows)
  space = BudgetSpace(num_steps=cfg.steps, budget=budget)
  evaluate = levels_evaluator(space, fitness)
  one = space.uniform_levels()[None]  # [1, T_s]
  warm = time.perf_counter()
  evaluate(np.repeat(one, settings.wan_chunk, axis=0))  # compiles this schedule's k values
  warm_s = time.perf_counter() - warm
  compile_before, start = clock.seconds, time.perf_counter()
  evaluate(np.repeat(one, settings.wan_chunk * settings.wan_timed_chunks, axis=0))
  wall = time.perf_counter() - start
  compiled = clock.seconds - compile_before
  timed = settings.wan_chunk * settings.wan_timed_chunks
  rate = timed / max(wall - compiled, 1e-9)
  evals = GAConfig().num_evaluations  # the paper's 950 schedules
  hours = evals * (4 / len(prompts)) / rate / 3600  # scaled to the paper's 4 prompts
  schedule = space.to_schedule(one[0])
  return {"preset": "wan2.1-t2v-1.3b", "num_layers": config.num_layers,
          "size": f"{cfg.width}x{cfg.height}", "frames": cfg.frames, "steps": cfg.steps,
          "tokens": fitness.num_tokens, "text_tokens": m, "prompts": len(prompts),
          "chunk": settings.wan_chunk, "warmup_seconds": warm_s, "timed_seconds": wall,
          "compile_seconds_in_timed": compiled, "schedule_mean": schedule.mean,
          "candidates_per_second": rate, "search_gpu_hours_4_prompts": hours,
          "padding_factor": padding, "search_gpu_hours_4_prompts_padded": hours * padding}


def full_size_estimate(budget: float) -> dict | None:
  """GPU-hours of a whole search at 832x480x81 from astraea_speed's per-step times (B = 2)."""
  path = RESULTS / f"astraea_speed-{device_slug()}.json"
  if not path.exists():
    return None
  record = json.loads(path.read_text())
  points = sorted({(v["k"], v["median_ms"]) for name, v in record["variants"].items()
                   if name.startswith("astraea k=") and "carried" not in name})
  ks, ms = zip(*points)
  n, steps = record["tokens"], record["steps"]
  # The uniform schedule of the budget: dense step 0, then k = budget * N.
  per_prompt_s = float(np.interp(n, ks, ms) + (steps - 1) * np.interp(budget * n, ks, ms)) / 1e3
  candidate_s = 4 * per_prompt_s
  return {"source": path.name, "tokens": n, "steps": steps, "seconds_per_candidate_4_prompts":
          candidate_s, "search_gpu_hours": GAConfig().num_evaluations * candidate_s / 3600}


# -- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="small settings (CPU smoke run)")
  p.add_argument("--budget", type=float, default=0.5, help="target mean theta (default 0.5)")
  p.add_argument("--max-seconds", type=float, default=480.0,
                 help="start no proxy search after this wall time (default 480)")
  p.add_argument("--skip-wan", action="store_true", help="no Wan2.1-1.3B proxy measurement")
  p.add_argument("--skip-proxies", action="store_true", help="no proxy searches")
  p.add_argument("--proxies", nargs="+", choices=sorted(PROXIES), default=None,
                 help="run only these proxy searches, in this order (default: all)")
  p.add_argument("--no-autotune", action="store_true",
                 help="compile the search programs without GPU kernel autotuning")
  p.add_argument("--resume-from", type=Path, default=None, metavar="JSON",
                 help="an earlier (e.g. time-limited) result of this benchmark: its finished parts "
                      "are kept, the rest is run")
  p.add_argument("--out", type=Path, default=None)
  args = p.parse_args(argv)
  settings = QUICK if args.quick else FULL
  t0 = time.perf_counter()
  clock = CompileClock()
  pipe = load_default_pipeline()

  out = args.out or RESULTS / f"search-{device_slug()}.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  record = {
      "benchmark": "search_cost", "device": jax.devices()[0].device_kind,
      "backend": jax.default_backend(),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
      "versions": {n: metadata.version(n) for n in ("jax", "jaxlib", "flax", "evosax")},
      "quick": args.quick, "budget": args.budget, "ga": dataclasses.asdict(settings.ga),
      "paper_gpu_hours": PAPER_GPU_HOURS, "wan_full_size_estimate": full_size_estimate(args.budget)}
  done = {}
  if args.resume_from is not None:
    done = json.loads(args.resume_from.read_text())
    if done.get("budget") != args.budget or done.get("quick") != args.quick:
      raise SystemExit(f"{args.resume_from} was run with another --budget or --quick")
    record.update({k: done[k] for k in ("default_model_search", "held_out_prompts", "held_out",
                                        "searched_beats_uniform_same_mean", "wan_proxy", "proxies")
                   if k in done})
    record["resumed_from"] = {"date": done.get("date"), "command": done.get("command"),
                              "wall_seconds": done.get("wall_seconds")}
  options = {"xla_gpu_autotune_level": 0} if args.no_autotune else None

  def save(**parts):
    # Rewritten after every part, so a run stopped by a time limit keeps what it measured.
    record.update(parts, wall_seconds=time.perf_counter() - t0)
    out.write_text(json.dumps(record, indent=1) + "\n")

  if "default_model_search" in done:
    full = done["default_model_search"]
    print(f"default model search: kept from {args.resume_from}", flush=True)
  else:
    print(f"search on the default model, budget {args.budget:g}", flush=True)
    full = search_default(pipe, settings, args.budget, clock, compiler_options=options)
  cfg = dataclasses.replace(pipe.defaults, steps=settings.steps, frames=settings.frames,
                            height=settings.height, width=settings.width)
  held = held_out_prompts(settings.held_out, exclude=full["prompts"])
  save(default_model_search=full, held_out_prompts=held)
  dense = pipe.generate(held, cfg, progress=False)
  if "held_out" in done:
    value = done["held_out"]
  else:
    searched = BudgetSchedule(tuple(full["thetas"]), name="searched")
    value = held_out_check(pipe, cfg, held, {
        "searched": searched, "uniform (same mean)": matched_uniform(cfg.steps, searched.mean),
        f"generate --budget {args.budget:g}": BudgetSchedule.uniform(cfg.steps, args.budget)},
                           dense)
  save(held_out=value, searched_beats_uniform_same_mean=(
      value["searched"]["psnr"] > value["uniform (same mean)"]["psnr"]))

  wan = done.get("wan_proxy")
  if wan is None and not args.skip_wan:
    print("Wan2.1-1.3B proxy", flush=True)
    wan = wan_proxy(settings, args.budget, clock, full["padding_overhead"])
    save(wan_proxy=wan)

  proxies = {k: v for k, v in done.get("proxies", {}).items() if "skipped" not in v}
  if not args.skip_proxies:
    table = QUICK_PROXIES if args.quick else PROXIES
    order = args.proxies if args.proxies and not args.quick else list(table)
    for name, overrides in ((n, table[n]) for n in order):
      if name in proxies:
        continue
      # Each finished part is saved, so a proxy cut off by an outer time limit loses only itself.
      if time.perf_counter() - t0 > args.max_seconds:
        proxies[name] = {"skipped": "time"}
        continue
      print(f"proxy search: {name}", flush=True)
      r = search_default(pipe, settings, args.budget, clock, compiler_options=options,
                         **overrides)
      s = BudgetSchedule(tuple(r["thetas"]), name=name)
      judged = held_out_check(pipe, cfg, held, {
          name: s, "uniform": matched_uniform(cfg.steps, s.mean)}, dense)
      proxies[name] = {**{k: r[k] for k in ("size", "frames", "tokens", "seconds", "fitness",
                                            "thetas", "mean", "compile_ahead_wall_seconds",
                                            "steady_candidates_per_second",
                                            "compiler_options")},
                       "prompts": len(r["prompts"]), "cost_vs_full": r["seconds"] / full["seconds"],
                       # A resumed record may hold parts run on another GPU model.
                       "device": jax.devices()[0].device_kind,
                       "held_out_psnr_at_full_size": judged[name]["psnr"],
                       "held_out_uniform_same_mean_psnr": judged["uniform"]["psnr"]}
      save(proxies=proxies)
  save(proxies=proxies)
  estimate = record["wan_full_size_estimate"]

  print(f"\nwrote {out}")
  print(f"default model search: {full['evaluations']} schedules in {full['seconds']:.1f} s "
        f"(compiling ahead {full.get('compile_ahead_wall_seconds', math.nan):.1f} s wall): "
        f"{full['candidates_per_second']:.2f} "
        f"schedules/s overall, {full['steady_candidates_per_second']:.2f}/s steady "
        f"({len(full['prompts'])} prompts, {full['steps']} steps, N={full['tokens']}; padding "
        f"{full['padding_overhead']:.2f}x, {full['compiled_variants']} programs)")
  print(f"calibration MSE: searched {full['fitness']:.4g}, near-uniform grid "
        f"{full['uniform_grid_fitness']:.4g}")
  print(f"{'held-out (' + str(len(held)) + ' prompts)':<28} {'computed':>8} {'PSNR dB':>8}")
  for name, r in value.items():
    print(f"{name:<28} {r['effective_mean']:>8.3f} {r['psnr']:>8.2f}")
  if wan is not None:
    print(f"Wan2.1-1.3B proxy {wan['size']}x{wan['frames']} (N={wan['tokens']}, {wan['steps']} "
          f"steps, {wan['num_layers']} layers): {wan['candidates_per_second']:.3f} schedules/s "
          f"per prompt -> {wan['search_gpu_hours_4_prompts']:.2f} GPU-h per search, "
          f"{wan['search_gpu_hours_4_prompts_padded']:.2f} with padding (paper "
          f"{PAPER_GPU_HOURS[0]}-{PAPER_GPU_HOURS[1]})")
  if estimate is not None:
    print(f"Wan2.1-1.3B full size (from {estimate['source']}): "
          f"{estimate['search_gpu_hours']:.1f} GPU-h per search")
  for name, r in proxies.items():
    if "skipped" in r:
      print(f"proxy {name}: skipped ({r['skipped']})")
    else:
      print(f"proxy {name:<10} cost {r['cost_vs_full']:.2f}x, held-out PSNR at full size "
            f"{r['held_out_psnr_at_full_size']:.2f} dB (uniform same mean "
            f"{r['held_out_uniform_same_mean_psnr']:.2f})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
