"""Speed-quality frontier of ASTRAEA and its peers: TeaCache, EasyCache, PAB, uniform step skipping.

Two parts, merged into one JSON (and a PSNR-vs-speedup plot when matplotlib is installed):

1. Quality, on the embedded default model: every method at several settings generates the held-out
   prompts of `benchmarks/quality.py` (never used to calibrate a schedule), compared with the dense
   videos of the same prompts and seeds (PSNR, SSIM over all frames). Each run records, per step,
   what its step model computed (`astraea_jax.acceleration.method_stats`): that is the method's
   decision pattern. The denoising loop's compute time on this device (compile time excluded) gives
   a measured speedup of the small model too.
2. Speed, on the full-size Wan2.1-1.3B preset (random weights built on the device, bf16, 480p x 81
   frames: latents [2, 16, 21, 60, 104], CFG as batch 2, 512 text tokens): every distinct per-step
   variant the patterns use is compiled once and timed (median of `--runs` calls): the dense
   forward, TeaCache's indicator / compute / reuse programs, EasyCache's check and reuse, PAB's
   forward with either attention reused, ASTRAEA's forward at each token budget theta (0 is the
   pure cache step), step skipping's reuse (free). A setting's speedup is then the dense time of
   all its steps over the sum of the measured times of the variants its pattern ran: measured
   programs, the pattern taken from the quality run (adaptive methods decide from real content,
   which random weights do not have). Runs on GPU by default (`--timing auto`); `--timing on
   --timing-preset tiny --timing-latent 2 8 8` exercises it on CPU.

    PYTHONPATH=. python3 benchmarks/frontier.py                  # full: 8 prompts, 20 steps, GPU timing
    PYTHONPATH=. python3 benchmarks/frontier.py --quick --out /tmp/frontier.json   # CPU-friendly

`--time-limit` (seconds, whole script) stops timing further variants when reached; settings whose
variants were not all timed get no speedup. Writes benchmarks/results/frontier-<device>.json.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import functools
import json
import math
import platform
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from astraea_jax.acceleration.astraea import jit_astraea_step, num_video_tokens
from astraea_jax.acceleration.attention_broadcast import PABConfig, pab_step_program
from astraea_jax.acceleration.method_stats import summarize
from astraea_jax.acceleration.schedule import BudgetSchedule, num_selected_tokens
from astraea_jax.acceleration.step_cache import (EasyCacheConfig, TeaCacheConfig, easy_cache_change,
                                                 easy_cache_reuse, tea_cache_programs)
from astraea_jax.acceleration.step_skip import StepSkipConfig
from astraea_jax.default_model import load_default_pipeline
from astraea_jax.metrics import psnr, ssim
from astraea_jax.models.wan import WanConfig
from astraea_jax.pipeline import step_method

sys.path.insert(0, str(Path(__file__).parent))
from benchutil import RESULTS, build_state, device_slug  # noqa: E402  pylint: disable=wrong-import-position
from quality import PROMPTS  # noqa: E402  pylint: disable=wrong-import-position

# Schedules searched for the default model (python -m astraea_jax.search), one frontier point each.
SEARCHED = sorted((Path(__file__).parent / "schedules").glob("searched_default_*.json"))


@dataclasses.dataclass(frozen=True)
class Setting:
  """One point of the frontier: a method, its knobs, and an ASTRAEA schedule (or None)."""

  method: str  # dense, astraea, teacache, easycache, pab, step-skip
  label: str
  config: object = None
  schedule: BudgetSchedule | None = None

  def factory(self):
    if self.config is None:
      return None
    return step_method(self.config, schedule=self.schedule)


def settings(steps: int, quick: bool) -> list[Setting]:
  """The frontier's points; --quick keeps one or two per method."""
  def uniform(theta):
    return BudgetSchedule.uniform(steps, theta)

  if quick:
    return [
        Setting("astraea", "astraea 0.5", schedule=uniform(0.5)),
        Setting("teacache", "teacache 0.2", TeaCacheConfig(0.2)),
        Setting("easycache", "easycache 0.2", EasyCacheConfig(0.2)),
        Setting("pab", "pab 2/6 [100,950]", PABConfig(2, 6, 100.0, 950.0)),
        Setting("step-skip", "step-skip 2", StepSkipConfig(2)),
        Setting("easycache+astraea", "easycache 0.2 + astraea 0.5", EasyCacheConfig(0.2),
                uniform(0.5)),
    ]
  out = [Setting("astraea", f"astraea {b:g}", schedule=uniform(b)) for b in (0.7, 0.5, 0.4, 0.3)]
  for path in SEARCHED:
    schedule = BudgetSchedule.load(path)
    budget = path.stem.rsplit("_", 1)[-1]
    if len(schedule) == steps:
      label = f"astraea searched {budget} (theta=0 steps skipped)"
      out.append(Setting("astraea", label, schedule=schedule))
      # Joint: the schedule's theta = 0 steps are skipped steps; EasyCache may skip more.
      out.append(Setting("easycache+astraea", f"easycache 0.05 + astraea searched {budget}",
                         EasyCacheConfig(0.05), schedule))
    else:
      # Searched for another step count: run it the ways `generate --resample-schedule` can.
      for mode in BudgetSchedule.RESAMPLE_MODES:
        label = f"astraea searched {budget}, {len(schedule)} steps resampled ({mode})"
        out.append(Setting("astraea", label, schedule=schedule.resample(steps, mode=mode)))
  out += [Setting("teacache", f"teacache {t:g}", TeaCacheConfig(t)) for t in (0.05, 0.1, 0.2, 0.3)]
  out += [Setting("easycache", f"easycache {t:g}", EasyCacheConfig(t))
          for t in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)]
  out += [Setting("pab", "pab 2/6 [100,800]", PABConfig(2, 6, 100.0, 800.0)),
          Setting("pab", "pab 2/6 [100,950]", PABConfig(2, 6, 100.0, 950.0)),
          Setting("pab", "pab 3/6 [100,950]", PABConfig(3, 6, 100.0, 950.0))]
  out += [Setting("step-skip", f"step-skip {k}", StepSkipConfig(k)) for k in (2, 3)]
  out += [Setting("easycache+astraea", "easycache 0.1 + astraea 0.5", EasyCacheConfig(0.1),
                  uniform(0.5)),
          Setting("step-skip+astraea", "step-skip 2 + astraea 0.7", StepSkipConfig(2),
                  uniform(0.7))]
  # Token reuse on the steps a step cache computes: mild budgets on top of EasyCache's skips.
  out += [Setting("easycache+astraea", f"easycache {t:g} + astraea {b:g}", EasyCacheConfig(t),
                  uniform(b)) for t, b in ((0.2, 0.7), (0.3, 0.7), (0.3, 0.8), (0.4, 0.8))]
  return out


# -- part 1: quality and decision patterns on the default model ------------------------------------


def _compute_seconds(stats) -> float:
  return math.fsum(max(s - c, 0.0) for s, c in zip(stats.step_seconds, stats.compile_seconds))


def _generate(pipe, prompts, cfg, setting: Setting | None):
  if setting is None or setting.method == "dense":
    return pipe.generate(prompts, cfg, progress=False)
  if setting.config is None:
    return pipe.generate(prompts, cfg, schedule=setting.schedule, progress=False)
  return pipe.generate(prompts, cfg, progress=False, method=setting.factory())


def step_costs(setting: Setting, records) -> list[list[str]]:
  """The variants every step of a run ran (keys of the timing table), from its step records."""
  def inner(r):
    return f"astraea:{round(r.tokens, 2):g}" if r.method.startswith("k=") else "dense"

  out = []
  for r in records:
    if setting.method == "dense":
      out.append(["dense"])
    elif setting.config is None:  # ASTRAEA alone; k = 0 records no block but still runs the head
      out.append([inner(r)])
    elif setting.method == "teacache":
      out.append(["tea_indicator", "tea_compute" if r.computed else "tea_reuse"])
    elif setting.method == "pab":
      out.append([f"pab:{r.method}"])
    elif setting.method.startswith("easycache"):
      check = ["easy_check"] if r.step >= setting.config.warmup else []
      out.append(check + ([inner(r)] if r.computed else ["easy_reuse"]))
    else:  # step skipping: a reused step costs nothing
      out.append([inner(r)] if r.computed else [])
  return out


def quality_part(pipe, cfg, prompts, seeds, points, warm):
  """Rows of (setting, seed): quality vs dense, what was computed, and the local speedup (with
  `warm`, each run follows an untimed one, so that first-call tracing is not counted)."""
  def run(setting):
    if warm:
      _generate(pipe, prompts, run_cfg, setting)
    return _generate(pipe, prompts, run_cfg, setting)

  rows = []
  for seed in seeds:
    run_cfg = dataclasses.replace(cfg, seed=seed)
    dense = run(None)
    dense_s = _compute_seconds(dense.denoise_stats)
    for setting in points:
      start = time.perf_counter()
      result = run(setting)
      summary = summarize(result.step_records, result.num_layers)
      row = {
          "seed": seed, "method": setting.method, "label": setting.label,
          "psnr": float(np.mean([psnr(a, b) for a, b in zip(result.frames, dense.frames)])),
          "ssim": float(np.mean([ssim(a, b) for a, b in zip(result.frames, dense.frames)])),
          "computed_steps": summary["computed_steps"], "blocks": summary["blocks"],
          "self_attn": summary["self_attn"], "cross_attn": summary["cross_attn"],
          "blocks_total": summary["blocks_total"], "block_work": summary["block_tokens"] / max(
              summary["blocks_total"], 1),
          "local_speedup": dense_s / max(_compute_seconds(result.denoise_stats), 1e-9),
          "step_costs": step_costs(setting, result.step_records),
          "wall_s": time.perf_counter() - start}
      rows.append(row)
      print(f"seed {seed} {setting.label:>32}: {row['psnr']:6.2f} dB, SSIM {row['ssim']:.4f}, "
            f"{len(row['computed_steps'])}/{cfg.steps} steps, {row['blocks']}/"
            f"{row['blocks_total']} blocks, local {row['local_speedup']:.2f}x", flush=True)
  return rows


# -- part 2: per-variant step times on the full-size model -------------------------------------------


class VariantTimer:
  """Compiles (first call) and times the step variants on random full-size weights."""

  def __init__(self, preset: str, latent, batch: int, text_tokens: int, runs: int,
               deadline: float):
    self.config = WanConfig.preset(preset)
    self.runs, self.deadline = runs, deadline
    self.graphdef, self.state = build_state(self.config)
    t, y, x = latent
    rng = np.random.default_rng(0)
    shape = (batch, self.config.in_channels, t, y, x)
    self.latents = jnp.asarray(rng.standard_normal(shape, np.float32))
    self.latents2 = self.latents * 0.99
    self.context = jnp.asarray(rng.standard_normal((batch, text_tokens, self.config.text_dim),
                                                   np.float32), self.config.dtype)
    self.timestep = jnp.full((batch,), 500.0, jnp.float32)
    self.num_tokens = num_video_tokens(self.config.patch_size, shape)
    self.ms: dict[str, float] = {"zero": 0.0}
    self.compile_s: dict[str, float] = {}
    self.skipped: list[str] = []
    jax.block_until_ready((self.state, self.latents, self.context))

  def out_of_time(self) -> bool:
    return time.perf_counter() > self.deadline

  def measure(self, key: str, call) -> None:
    """`call()` once to compile and warm up, then `runs` timed calls; the median in ms."""
    if key in self.ms:
      return
    if self.out_of_time():
      self.skipped.append(key)
      return
    start = time.perf_counter()
    jax.block_until_ready(call())
    self.compile_s[key] = time.perf_counter() - start
    times = []
    for _ in range(self.runs):
      start = time.perf_counter()
      jax.block_until_ready(call())
      times.append((time.perf_counter() - start) * 1e3)
    self.ms[key] = statistics.median(times)
    print(f"  {key:>22}: {self.ms[key]:9.2f} ms (compile + warm-up {self.compile_s[key]:.1f} s)",
          flush=True)

  def run(self, keys) -> None:
    """Times the variants named in `keys` (a set, or a Counter of how often each is used)."""
    g, s, lat, t, ctx = self.graphdef, self.state, self.latents, self.timestep, self.context

    @jax.jit
    def dense(state, latents, timestep, context):
      return nnx.merge(g, state)(latents, timestep, context)

    self.measure("dense", lambda: dense(s, lat, t, ctx))
    names = set(keys)
    if names & {"tea_indicator", "tea_compute", "tea_reuse"}:
      indicator, compute, reuse = tea_cache_programs(g, "modulated_input")
      m, _ = indicator(s, lat, t, ctx, None)
      self.measure("tea_indicator", lambda: indicator(s, lat, t, ctx, m))
      _, residual = compute(s, lat, t, ctx)
      self.measure("tea_compute", lambda: compute(s, lat, t, ctx))
      self.measure("tea_reuse", lambda: reuse(s, lat, t, ctx, residual))
      del m, residual
    if names & {"easy_check", "easy_reuse"}:
      v = dense(s, lat, t, ctx)
      self.measure("easy_check", lambda: easy_cache_change(lat, self.latents2, v))
      self.measure("easy_reuse", lambda: easy_cache_reuse(lat, self.latents2, v))
      del v
    pab_keys = sorted(k for k in keys if k.startswith("pab:"))
    if pab_keys:
      pab = pab_step_program(g)
      box = {"cache": pab(s, lat, t, ctx, None, compute_self=True, compute_cross=True)[1]}
      flags = {"dense": (True, True), "self-reused": (False, True),
               "cross-reused": (True, False), "both-reused": (False, False)}

      def pab_call(cs, cc):
        out, box["cache"] = pab(s, lat, t, ctx, box["cache"], compute_self=cs, compute_cross=cc)
        return out

      for key in pab_keys:
        self.measure(key, functools.partial(pab_call, *flags[key.split(":", 1)[1]]))
      del box
    # The most used budgets first, in case the time limit cuts the list short.
    uses = keys if isinstance(keys, collections.Counter) else collections.Counter(keys)
    thetas = [float(k.split(":")[1]) for k, _ in uses.most_common() if k.startswith("astraea:")]
    if thetas:
      step = jit_astraea_step(g)
      n = self.num_tokens
      box = {"cache": step(s, lat, t, ctx, None, num_selected=n)[1]}

      def astraea_call(k):
        out, box["cache"] = step(s, lat, t, ctx, box["cache"], num_selected=k)
        return out

      for theta in thetas:
        self.measure(f"astraea:{theta:g}",
                     functools.partial(astraea_call, num_selected_tokens(theta, n)))
      del box
    self.skipped += sorted(k for k in keys if k not in self.ms and k not in self.skipped)


def speedups(rows, ms: dict[str, float]):
  """Per row: dense time of all steps over the sum of its variants' times (None if one is missing)."""
  for row in rows:
    costs = row["step_costs"]
    needed = {k for step in costs for k in step}
    if "dense" not in ms or not needed <= set(ms):
      row["speedup"] = None
      continue
    total = math.fsum(ms[k] for step in costs for k in step)
    row["speedup"] = len(costs) * ms["dense"] / max(total, 1e-9)
    row["modeled_ms"] = total


def summarize_rows(rows):
  out = []
  for label in dict.fromkeys(r["label"] for r in rows):
    sel = [r for r in rows if r["label"] == label]

    def mean(key):
      vals = [r[key] for r in sel if r.get(key) is not None]
      return float(np.mean(vals)) if vals else None

    out.append({"label": label, "method": sel[0]["method"], "psnr": mean("psnr"),
                "ssim": mean("ssim"), "speedup": mean("speedup"),
                "local_speedup": mean("local_speedup"),
                "computed_steps": mean("num_computed"), "blocks": mean("blocks"),
                "blocks_total": sel[0]["blocks_total"], "block_work": mean("block_work")})
  return out


def plot(record: dict, path: Path) -> None:
  """PSNR against speedup, one marker style per method (needs matplotlib)."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError:
    print("matplotlib not installed: no plot", file=sys.stderr)
    return
  key = "speedup" if any(s["speedup"] for s in record["summary"]) else "local_speedup"
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  def group(s):  # a searched schedule is its own series, not a point of the uniform budgets
    return s["method"] + (" (searched)" if "searched" in s["label"] else "")

  for method in dict.fromkeys(group(s) for s in record["summary"]):
    pts = sorted((s for s in record["summary"] if group(s) == method and s[key] and s["psnr"]
                  and math.isfinite(s["psnr"])), key=lambda s: s[key])
    ax.plot([s[key] for s in pts], [s["psnr"] for s in pts], "o-" if len(pts) > 1 else "o",
            label=method)
  ax.set_xlabel("speedup over dense (" + (f"{record['timing']['device']}, {record['timing'].get('preset')} step times"
                                          if key == "speedup" else "default model, this device")
                + ")")
  ax.set_ylabel("PSNR vs dense (dB)")
  ax.set_title("speed-quality frontier, default model")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true",
                 help="2 prompts, 8 steps, one seed, one or two settings per method")
  p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 (quick: 0)")
  p.add_argument("--steps", type=int, default=None, help="default: the model's (20; quick: 8)")
  p.add_argument("--no-warm-up", action="store_true",
                 help="time each quality run's first call (halves the quality part's cost; the "
                      "local speedups then include tracing)")
  p.add_argument("--time-limit", type=float, default=480.0,
                 help="seconds for the whole script; variants past it are not timed")
  p.add_argument("--timing", choices=("auto", "on", "off"), default="auto",
                 help="per-variant timing on the full-size model (auto: on GPU only)")
  p.add_argument("--timing-preset", default="wan2.1-t2v-1.3b")
  p.add_argument("--timing-latent", type=int, nargs=3, default=[21, 60, 104],
                 metavar=("T", "Y", "X"))
  p.add_argument("--text-tokens", type=int, default=512)
  p.add_argument("--runs", type=int, default=3)
  p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
  p.add_argument("--resume-from", type=Path, default=None,
                 help="a results JSON of the same model, steps and seeds: its rows and step times "
                      "are kept, only the settings it lacks are run (e.g. a newly searched schedule)")
  p.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                 help="run only the settings whose label contains one of these texts")
  p.add_argument("--plot-from", type=Path, default=None,
                 help="only draw the plot of an existing results JSON (beside it, .png)")
  args = p.parse_args(argv)
  if args.plot_from is not None:
    plot(json.loads(args.plot_from.read_text()), args.plot_from.with_suffix(".png"))
    return 0
  deadline = time.perf_counter() + args.time_limit

  pipe = load_default_pipeline()
  steps = args.steps or (8 if args.quick else pipe.defaults.steps)
  cfg = dataclasses.replace(pipe.defaults, steps=steps)
  prompts = list(PROMPTS[:2] if args.quick else PROMPTS)
  seeds = args.seeds or ([0] if args.quick else [0, 1])
  points = settings(steps, args.quick)
  if args.only:
    points = [s for s in points if any(text in s.label for text in args.only)]
  done = {"runs": [], "timing": {"ms": {}}}
  if args.resume_from is not None:
    done = json.loads(args.resume_from.read_text())
    if done.get("steps") != steps or done.get("seeds") != seeds or done.get("prompts") != prompts:
      p.error(f"--resume-from {args.resume_from}: other steps, seeds or prompts than this run")
    have = {r["label"] for r in done["runs"]}
    points = [s for s in points if s.label not in have]
  print(f"quality: {len(points)} settings x {len(seeds)} seed(s), {len(prompts)} prompts, "
        f"{steps} steps, on {jax.devices()[0].device_kind}", flush=True)
  new_rows = quality_part(pipe, cfg, prompts, seeds, points, warm=not args.no_warm_up)
  for row in new_rows:  # a resumed file may hold rows measured on another device
    row.setdefault("device", jax.devices()[0].device_kind)
  rows = done["runs"] + new_rows
  for row in rows:
    row["num_computed"] = len(row["computed_steps"])

  timing = {"device": jax.devices()[0].device_kind, "ms": {}, "skipped": []}
  if args.timing == "on" or (args.timing == "auto" and jax.default_backend() == "gpu"):
    keys = collections.Counter(k for row in rows for step in row["step_costs"] for k in step)
    keys["dense"] += 1
    timer = VariantTimer(args.timing_preset, args.timing_latent, 2, args.text_tokens, args.runs,
                         deadline)
    if done["timing"].get("device") == timing["device"]:  # step times of the resumed run stand
      timer.ms.update(done["timing"]["ms"])
      timer.compile_s.update(done["timing"].get("compile_s", {}))
    print(f"timing {len(keys)} variants: {args.timing_preset}, N={timer.num_tokens}", flush=True)
    timer.run(keys)
    timing.update(preset=args.timing_preset, latent=[2, timer.config.in_channels,
                                                     *args.timing_latent],
                  num_tokens=timer.num_tokens, text_tokens=args.text_tokens, ms=timer.ms,
                  compile_s=timer.compile_s, skipped=timer.skipped, runs=args.runs)
    if timer.skipped:
      print(f"time limit: not timed {timer.skipped}", flush=True)
  elif done["timing"].get("ms"):
    # Not timing here (e.g. on a CPU): the resumed run's step times price the new settings too,
    # if it timed every variant they ran.
    timing = done["timing"]
  speedups(rows, timing["ms"])
  summary = summarize_rows(rows)

  device = device_slug()
  out = Path(args.out or RESULTS / f"frontier-{device}.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  record = {
      "benchmark": "frontier", "device": jax.devices()[0].device_kind,
      "platform": platform.platform(), "date": datetime.date.today().isoformat(),
      "command": "python benchmarks/frontier.py " + " ".join(
          argv if argv is not None else sys.argv[1:]),
      "versions": {n: metadata.version(n) for n in ("jax", "jaxlib", "flax")},
      "model": pipe.name, "size": [cfg.frames, cfg.height, cfg.width], "steps": steps,
      "guidance": cfg.guidance, "prompts": prompts, "seeds": seeds,
      "speedup": "dense time of all steps / sum of the timed variants each step ran (timing)",
      "local_speedup": "denoising compute time of the default model on this device, dense / method",
      "timing": timing, "summary": summary, "runs": rows}
  out.write_text(json.dumps(record, indent=2) + "\n")
  plot(record, out.with_suffix(".png"))

  def fmt(v, spec, suffix=""):
    return "-".rjust(len(format(0.0, spec)) + len(suffix)) if v is None else format(v, spec) + suffix

  print(f"{'setting':>34}  PSNR(dB)  SSIM    steps   work  speedup  local")
  for s in summary:
    print(f"{s['label']:>34}  {fmt(s['psnr'], '8.2f')}  {fmt(s['ssim'], '.4f')}  "
          f"{fmt(s['computed_steps'], '5.1f')}/{steps}  {fmt(s['block_work'], '5.2f')}  "
          f"{fmt(s['speedup'], '6.2f', 'x')}  {fmt(s['local_speedup'], '5.2f', 'x')}")
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
