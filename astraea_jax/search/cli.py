"""`python -m astraea_jax.search`: evolutionary search of a per-step token budget schedule (ASTRAEA,
arXiv 2506.05096, Sec. 4) for `python -m astraea_jax.generate --schedule`.

Examples:

  python -m astraea_jax.search --budget 0.5 --out schedule.json    # default model, grammar prompts
  python -m astraea_jax.search --model DIR --budget 0.4 --prompts calib.txt --out s.json \\
      --state s.state.npz                                            # resumable
  python -m astraea_jax.generate --schedule schedule.json

Candidates are one theta per step on the 0.1 grid (`--levels 1`: whole steps, computed or skipped,
the fastest at a given mean) with their mean within +-10% of `--budget`
(`astraea_jax.search.space`); fitness is the MSE of the final latents against the dense run of the
same prompts and seeds (`astraea_jax.search.fitness`), every population evaluated in batched device
runs; the GA is `astraea_jax.search.algorithm.BudgetGA` with the paper's defaults (50 parents, 30
offspring, 30 generations, mutation 0.1 -> 0.01). The output is a `BudgetSchedule` JSON file that
also records the budget, model, size, steps, prompts and fitness.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from astraea_jax.cli_support import (COMPILE_CACHE_HELP, enable_compile_cache, load_model,
                                     model_family, run_main)

DEFAULT_BUDGET = 0.5
DEFAULT_NUM_PROMPTS = 4  # the paper calibrates on 4 prompts
NO_AUTOTUNE = {"xla_gpu_autotune_level": 0}


def _size(text: str) -> tuple[int, int]:
  try:
    w, h = (int(v) for v in text.lower().split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"size must look like 832x480 (WIDTHxHEIGHT), got {text!r}") from None
  return w, h


# `GAConfig.step_cache_seeds`' limit, repeated here so that `--help` and argument errors need no jax
# import; tests/test_search.py keeps the two equal.
MAX_STEP_CACHE_SEEDS = 8


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m astraea_jax.search",
      description="Search the per-step token budget schedule (theta_t on a 0.1 grid, or coarser "
                  "with --levels; mean within --tolerance of --budget) that keeps ASTRAEA's output "
                  "closest to the dense model's.",
      epilog="The schedule file is read by `python -m astraea_jax.generate --schedule FILE` (with "
             "the same --steps).")
  g = p.add_argument_group("what to search")
  g.add_argument("--model", default="default",
                 help="'default' (embedded model) or a Wan2.1-T2V folder (as for generate)")
  g.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                 help="target mean theta over the steps, in (0, 1] (default 0.5)")
  g.add_argument("--tolerance", type=float, default=0.1,
                 help="allowed relative deviation of the mean from --budget (default 0.1, the paper's "
                      "+-10%%; 0 holds the mean at --budget exactly, so the run time is the "
                      "budget's)")
  g.add_argument("--levels", type=int, default=10, metavar="N",
                 help="theta on the grid {0, 1/N, ..., 1} (default 10, the paper's 0.1 grid); 1 "
                      "searches whole steps only (computed or skipped), the fastest schedules at a "
                      "budget: a partial step costs more time than its share of tokens")
  g.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                 help="calibration prompts, one per line (default: --num-prompts captions of the "
                      "default model's grammar)")
  g.add_argument("--num-prompts", type=int, default=DEFAULT_NUM_PROMPTS,
                 help="grammar prompts used without --prompts (default 4)")
  g.add_argument("--out", type=Path, default=Path("schedule.json"), help="schedule JSON to write")
  g = p.add_argument_group("sampling (defaults: the model's own)")
  g.add_argument("--steps", type=int, default=None, help="denoising steps")
  g.add_argument("--size", type=_size, default=None, metavar="WxH", help="e.g. 832x480")
  g.add_argument("--frames", type=int, default=None, help="number of frames")
  g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
  g.add_argument("--seed", type=int, default=0,
                 help="seed of the GA; calibration prompt j uses noise seed SEED + j (default 0)")
  g = p.add_argument_group("genetic algorithm (defaults: the paper's)")
  g.add_argument("--population", type=int, default=50, help="parents kept per generation")
  g.add_argument("--offspring", type=int, default=30, help="new schedules per generation")
  g.add_argument("--generations", type=int, default=30, help="generations")
  g.add_argument("--mutation-start", type=float, default=0.1,
                 help="per-step mutation probability at the first generation")
  g.add_argument("--mutation-end", type=float, default=0.01,
                 help="per-step mutation probability at the last generation")
  g.add_argument("--step-cache-seeds", type=int, default=MAX_STEP_CACHE_SEEDS, metavar="N",
                 help="initial parents that compute whole steps or skip them (theta 0 or 1, "
                      f"front-loaded like adaptive step caches), 0-{MAX_STEP_CACHE_SEEDS} (default "
                      "%(default)s); the rest are random, plus the uniform schedule")
  g = p.add_argument_group("execution")
  g.add_argument("--state", type=Path, default=None, metavar="FILE",
                 help="resumable state file (.npz): resumed from if present, updated every "
                      "generation")
  g.add_argument("--max-batch", type=int, default=None,
                 help="candidates per device run (default: --offspring); lower it if memory is "
                      "short")
  g.add_argument("--min-bucket", type=int, default=8,
                 help="smallest padded group of batch rows sharing a token budget (default 8)")
  g.add_argument("--compile-threads", type=int, default=None, metavar="N",
                 help="threads compiling the programs a batch of candidates needs before it runs "
                      "(default: one per CPU core; 0 compiles each on first use)")
  g.add_argument("--no-autotune", action="store_true",
                 help="compile the candidates' programs without GPU kernel autotuning (much "
                      "faster compiles on a GPU, possibly slower steps)")
  g.add_argument("--compile-cache", default=None, metavar="DIR", help=COMPILE_CACHE_HELP)
  g.add_argument("--devices", type=int, default=None, metavar="N",
                 help="split every population run's batch rows (candidates x prompts) over the "
                      "first N devices, parameters replicated (1: one device; default: every "
                      "visible GPU, one device on CPU, as for generate). Several processes "
                      "(jax.distributed): N must be a multiple of the process count (default: "
                      "every device of every process)")
  g.add_argument("--quiet", action="store_true", help="no progress bar")
  return p


def _read_prompts(path: Path) -> list[str]:
  try:
    text = path.read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"cannot read prompts file {str(path)!r}: {e}") from None
  prompts = [line.strip() for line in text.splitlines() if line.strip()]
  if not prompts:
    raise ValueError(f"prompts file {str(path)!r} has no prompts")
  return prompts


def _check_numbers(args) -> None:
  if not 0.0 < args.budget <= 1.0:  # NaN fails too
    raise ValueError(f"--budget {args.budget:g} must lie in (0, 1]: it is the mean fraction of "
                     "tokens computed per step")
  if not 0.0 <= args.tolerance < 1.0:
    raise ValueError(f"--tolerance {args.tolerance:g} must lie in [0, 1)")
  for name in ("levels", "population", "offspring", "generations", "num_prompts", "min_bucket"):
    if getattr(args, name) < 1:
      raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} must be positive")
  if args.population < 2:
    raise ValueError(f"--population {args.population} must be at least 2")
  if args.compile_threads is not None and args.compile_threads < 0:
    raise ValueError(f"--compile-threads {args.compile_threads} must be 0 or more")
  if args.devices is not None and args.devices < 1:
    raise ValueError(f"--devices {args.devices} must be at least 1")
  if args.max_batch is not None and args.max_batch < 1:
    raise ValueError(f"--max-batch {args.max_batch} must be positive")
  for name in ("mutation_start", "mutation_end"):
    if not 0.0 <= getattr(args, name) <= 1.0:
      raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name):g} must lie in [0, 1]")
  if not 0 <= args.step_cache_seeds <= MAX_STEP_CACHE_SEEDS:
    raise ValueError(f"--step-cache-seeds {args.step_cache_seeds} must lie in "
                     f"[0, {MAX_STEP_CACHE_SEEDS}]")
  if args.steps is not None and args.steps < 2:
    raise ValueError(f"--steps {args.steps} must be at least 2 (step 0 is always dense)")


def run(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  _check_numbers(args)
  prompts = None if args.prompts is None else _read_prompts(args.prompts)
  # Heavy imports after the cheap checks, so usage errors are instant.
  # pylint: disable=import-outside-toplevel
  import jax

  from astraea_jax import parallel, video

  # Several hosts (`jax.distributed`, as for generate): every process runs the same search with
  # the same seed; the population's rows are split over the devices of all processes, every
  # process reads back the same fitness values, and process 0 alone writes files and reports.
  enable_compile_cache(args.compile_cache)  # before anything compiles
  parallel.maybe_initialize()  # before anything touches the devices (the imports below do)
  from astraea_jax.search.algorithm import GAConfig
  from astraea_jax.search.fitness import PopulationFitness, calibration_prompts
  from astraea_jax.search.runner import levels_evaluator, read_state, run_search
  from astraea_jax.search.space import BudgetSpace
  # pylint: enable=import-outside-toplevel

  processes = jax.process_count()
  lead = jax.process_index() == 0
  visible = len(jax.devices())
  if processes > 1:
    devices = visible if args.devices is None else args.devices
    if devices > visible or devices % processes:
      raise ValueError(f"--devices {devices} must be a multiple of the {processes} processes and "
                       f"at most {visible} (all devices)")
  else:
    visible = len(jax.local_devices())
    devices = parallel.default_num_devices() if args.devices is None else args.devices
    if devices > visible:
      raise ValueError(f"--devices {devices} must be at most {visible} (the visible devices)")

  def check_outputs():  # before any work: can the files be written (process 0 writes them)?
    if lead:
      video.check_writable(args.out)
      if args.state is not None:
        video.check_writable(args.state)

  parallel.check_together(check_outputs)  # several processes stop together, none left waiting
  if prompts is None:
    prompts = calibration_prompts(args.num_prompts)
  ga = GAConfig(num_parents=args.population, num_offspring=args.offspring,
                num_generations=args.generations, mutation_start=args.mutation_start,
                mutation_end=args.mutation_end, step_cache_seeds=args.step_cache_seeds)

  if model_family(args.model) not in ("default", "wan"):  # before loading it
    raise ValueError(f"{args.model}: search runs Wan2.1 models (the embedded default or a Wan2.1 "
                     "folder); for other models put schedule files in the folder's schedules/")
  pipe = load_model(args.model)
  overrides = {k: v for k, v in dict(frames=args.frames, steps=args.steps,
                                     guidance=args.guidance).items() if v is not None}
  if args.size is not None:
    overrides["width"], overrides["height"] = args.size
  cfg = dataclasses.replace(pipe.defaults, seed=args.seed, **overrides)
  pipe.latent_shape(cfg)  # GenerationError for sizes the model cannot take
  space = BudgetSpace(num_steps=cfg.steps, budget=args.budget, tolerance=args.tolerance,
                      levels=args.levels)

  dense = None
  resume = args.state is not None and args.state.exists()
  if processes > 1 and args.state is not None:
    # Every process resumes from the state file that process 0 writes: it must see it too.
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    seen = np.asarray(multihost_utils.process_allgather(np.int32(resume)))
    if seen.min() != seen.max():
      raise ValueError(f"--state {args.state} exists for some processes only: with several "
                       "hosts it must lie on a filesystem that every host sees")
  if resume:
    dense = read_state(args.state)[1].get("dense")  # the search's meta is checked by run_search
  chunk = min(args.max_batch or args.offspring, args.offspring)
  report = print if lead else lambda *a, **k: None  # process 0 alone reports
  report(f"{pipe.name}: searching a {cfg.steps}-step schedule, budget {args.budget:g} (mean in "
         f"[{space.mean_window[0]:.3f}, {space.mean_window[1]:.3f}]), {len(prompts)} prompt(s), "
         f"{cfg.width}x{cfg.height}, {cfg.frames} frames, {ga.num_evaluations} schedules, "
         f"{devices} device(s)",
         file=sys.stderr)
  fitness = PopulationFitness(pipe, prompts, cfg, chunk=chunk, min_bucket=args.min_bucket,
                              dense=dense, compile_workers=args.compile_threads,
                              compiler_options=NO_AUTOTUNE if args.no_autotune else None,
                              devices=devices)
  meta = {"model": args.model, "prompts": prompts, "size": f"{cfg.width}x{cfg.height}",
          "frames": cfg.frames, "guidance": cfg.guidance, "solver": cfg.solver}
  result = run_search(space, ga, levels_evaluator(space, fitness), seed=args.seed,
                      state_path=args.state, meta=meta, cache={"dense": fitness.dense},
                      progress=not args.quiet and lead)

  schedule = space.to_schedule(result.best, name=f"searched-{args.budget:g}")
  record = json.loads(schedule.to_json())
  record.update({
      "budget": args.budget, "mean": schedule.mean,
      "effective_mean": schedule.effective_mean(fitness.num_tokens),
      "tolerance": args.tolerance, "levels": args.levels, "model": args.model, "model_name": pipe.name,
      "size": f"{cfg.width}x{cfg.height}", "frames": cfg.frames, "steps": cfg.steps,
      "guidance": cfg.guidance, "seed": args.seed, "prompts": prompts,
      "fitness": result.fitness, "uniform_fitness": result.uniform_fitness,
      "population": ga.num_parents, "offspring": ga.num_offspring,
      "generations": ga.num_generations, "evaluations": result.evaluations,
      "history": [{k: h[k] for k in ("generation", "best", "mean")} for h in result.history]})
  if lead:
    with video.atomic_path(args.out) as tmp:
      tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
  rate = fitness.candidates_evaluated / max(result.seconds, 1e-9)
  report(f"wrote {args.out} | mean theta {schedule.mean:.3f} (target {args.budget:g}) | fitness "
         f"{result.fitness:.4g} vs {result.uniform_fitness:.4g} for the near-uniform schedule | "
         f"{fitness.candidates_evaluated} schedules evaluated in {result.seconds:.1f} s "
         f"({rate:.2f}/s) | thetas {' '.join(f'{t:g}' for t in schedule.thetas)}")
  return 0


def main(argv: list[str] | None = None) -> int:
  return run_main(run, argv, interrupted="interrupted (the --state file resumes from the last "
                                          "finished generation)")
