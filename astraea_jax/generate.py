"""`python -m astraea_jax.generate`: prompt in, video file out, dense or accelerated with ASTRAEA.

Examples:

  python -m astraea_jax.generate                                  # the embedded default model
  python -m astraea_jax.generate --prompt "a red circle moving right on a gray background" --budget 0.4
  python -m astraea_jax.generate --model DIR --prompt "a dog running happily" --budget 0.5 --out dog.mp4
  python -m astraea_jax.generate --model DIR --prompt-file prompts.txt --schedule schedule.json

`--budget THETA` computes THETA of the N video tokens per step on average (ASTRAEA, arXiv
2506.05096): with the schedule searched for the model at that budget where the model ships one for
the requested step count (the default model does at 0.4, 0.5 and 0.7; a converted folder's
`schedules/`), else round(THETA * N) tokens in every block at every step after the first
(`--uniform` asks for that in any case). `--schedule FILE` takes one theta per step from a JSON file
written by `python -m astraea_jax.search`; `--dense` runs the unaccelerated model. Without any of
the three, the default budget 0.5 is used.

`--method` picks a peer method instead of ASTRAEA (`astraea_jax.acceleration`):

  python -m astraea_jax.generate --method teacache --cache-threshold 0.1     # TeaCache, 2411.19108
  python -m astraea_jax.generate --method easycache --cache-threshold 0.05   # EasyCache, 2507.02860
  python -m astraea_jax.generate --method pab --pab-self-range 2 --pab-cross-range 6   # PAB, 2408.12588
  python -m astraea_jax.generate --method step-skip --skip-interval 2       # every 2nd step
  python -m astraea_jax.generate --method easycache --budget 0.5            # composed with ASTRAEA

EasyCache and step skipping compose with `--budget` / `--schedule` (whole steps reused, token budgets
on the computed ones); without either they wrap the dense model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

from astraea_jax.cli_support import (COMPILE_CACHE_HELP, enable_compile_cache, load_model,
                                     run_main)

DEFAULT_BUDGET = 0.5
METHODS = ("astraea", "teacache", "easycache", "pab", "step-skip")
# Knob flag -> the methods it applies to.
_KNOBS = {
    "cache_threshold": ("teacache", "easycache"), "cache_warmup": ("teacache", "easycache"),
    "cache_cutoff": ("teacache", "easycache"), "teacache_coefficients": ("teacache",),
    "teacache_indicator": ("teacache",), "pab_self_range": ("pab",), "pab_cross_range": ("pab",),
    "pab_window": ("pab",), "skip_interval": ("step-skip",), "skip_warmup": ("step-skip",),
}


def _size(text: str) -> tuple[int, int]:
  try:
    w, h = (int(v) for v in text.lower().split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(f"size must look like 832x480 (WIDTHxHEIGHT), got {text!r}")
  return w, h


def _theta(text: str) -> float:
  try:
    v = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"budget must be a number in [0, 1], got {text!r}") from None
  if not 0.0 <= v <= 1.0:
    raise argparse.ArgumentTypeError(f"budget must lie in [0, 1], got {v}")
  return v


def _positive(text: str) -> int:
  try:
    v = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
  if v < 1:
    raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
  return v


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m astraea_jax.generate",
      description="Generate a video from a text prompt with a Wan-architecture model, accelerated by "
                  "ASTRAEA's token-wise reuse (a token budget or a searched per-step schedule).",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="Without --model the embedded default model is used, with its own default size, frames "
             "and steps.\nExit status is non-zero, with one line on stderr, for any bad input; no "
             "partial output file is left.")
  g = p.add_argument_group("model and prompts")
  g.add_argument("--model", default="default",
                 help="'default' (embedded model), a Wan2.1-T2V folder as released (diffusers or "
                      "original layout, converted in memory at start) or one converted by "
                      "`python -m checkpoints_convert wan_t2v`, a converted OpenSora v1.2 folder "
                      "(`checkpoints_convert opensora_t2v`), or a diffusers HunyuanVideo folder "
                      "(converted in memory); the family is detected")
  g.add_argument("--prompt", default=None, help="the text prompt")
  g.add_argument("--prompt-file", type=Path, default=None,
                 help="a UTF-8 text file with one prompt per line (a batch; blank lines ignored)")
  g.add_argument("--negative-prompt", default=None,
                 help="unconditional prompt (default: Wan's English negative prompt)")
  g = p.add_argument_group("sampling (defaults: the model's own)")
  g.add_argument("--size", type=_size, default=None, metavar="WxH", help="e.g. 832x480")
  g.add_argument("--frames", type=int, default=None, help="number of frames (4k+1 for Wan)")
  g.add_argument("--steps", type=int, default=None, help="denoising steps")
  g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
  g.add_argument("--shift", type=float, default=None, help="flow shift of the sigma schedule")
  g.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
  g.add_argument("--sigma-schedule", choices=("diffusers", "wan"), default=None,
                 help="diffusers' flow sigmas or the original Wan repository's (default: the "
                      "model folder's; 'wan' for an original-layout release)")
  g.add_argument("--solver", choices=("unipc", "euler"), default="unipc")
  g = p.add_argument_group("acceleration (pick one; default --budget 0.5)")
  m = g.add_mutually_exclusive_group()
  m.add_argument("--budget", type=_theta, default=None,
                 help="token budget theta in [0, 1], the mean fraction of tokens computed per "
                      "step: the model's own searched schedule of that mean where it ships one "
                      "for --steps (the default model: 0.4, 0.5 and 0.7 at 20 steps), else theta "
                      "at every step (the first step is always dense)")
  m.add_argument("--schedule", type=Path, default=None, help="per-step budget schedule JSON")
  m.add_argument("--dense", action="store_true", help="no acceleration")
  g.add_argument("--resample-schedule", nargs="?", const="repeat", default=None,
                 choices=("repeat", "average"), metavar="MODE",  # BudgetSchedule.RESAMPLE_MODES (tested)
                 help="with --schedule: apply a schedule made for another step count (e.g. a "
                      "20-step search on a 50-step run) by resampling it to --steps. MODE 'repeat' "
                      "(default) repeats each step's budget, keeping whole and skipped steps as "
                      "they are; 'average' keeps the mean exactly and may split steps")
  g.add_argument("--uniform", action="store_true",
                 help="with --budget: theta at every step, even where the model ships a searched "
                      "schedule")
  g.add_argument("--dense-first", type=float, default=0.0, metavar="FRACTION",
                 help="with --budget: run this fraction of the first steps dense (e.g. 0.2)")
  g.add_argument("--compare-dense", action="store_true",
                 help="also run the dense model and report its time and the PSNR/SSIM against it")
  g = p.add_argument_group(
      "peer methods (values are checked after parsing: a bad one is an error line, exit 1)")
  g.add_argument("--method", default="astraea", metavar="{" + ",".join(METHODS) + "}",
                 help="acceleration method (default astraea). teacache: TeaCache whole-step "
                      "reuse; easycache: EasyCache; pab: Pyramid Attention Broadcast; step-skip: "
                      "compute every k-th step. easycache and step-skip compose with --budget / "
                      "--schedule")
  g.add_argument("--cache-threshold", default=None, metavar="X",
                 help="teacache: rel_l1_thresh (default 0.1); easycache: tau (default 0.05); "
                      "0 computes every step")
  g.add_argument("--cache-warmup", default=None, metavar="STEPS",
                 help="teacache / easycache: first steps always computed (default 1 / 2)")
  g.add_argument("--cache-cutoff", default=None, metavar="STEPS",
                 help="teacache / easycache: last steps always computed (default 1)")
  g.add_argument("--teacache-coefficients", default=None, metavar="NAME",
                 help="teacache rescaling polynomial: none (default), wan2.1-t2v-1.3b, "
                      "wan2.1-t2v-14b (fitted on the real checkpoints)")
  g.add_argument("--teacache-indicator", default=None, metavar="NAME",
                 help="teacache indicator: modulated-input (default) or timestep-embedding")
  g.add_argument("--pab-self-range", default=None, metavar="K",
                 help="pab: self-attention runs every K steps inside the window (default 2)")
  g.add_argument("--pab-cross-range", default=None, metavar="K",
                 help="pab: cross-attention runs every K steps inside the window (default 6)")
  g.add_argument("--pab-window", default=None, metavar="T0,T1",
                 help="pab: timesteps (1000 = noise) in which attention is reused (default 100,800)")
  g.add_argument("--skip-interval", default=None, metavar="K",
                 help="step-skip: compute every K-th step, reuse the last output otherwise "
                      "(default 2)")
  g.add_argument("--skip-warmup", default=None, metavar="STEPS",
                 help="step-skip: first steps always computed (default 1)")
  g = p.add_argument_group("devices")
  g.add_argument("--devices", type=_positive, default=None, metavar="N",
                 help="run on the first N devices (1: one device; default: every visible GPU "
                      "that splits the request evenly, 1 on CPU): Wan shards its tokens and CFG "
                      "halves over a mesh; OpenSora and HunyuanVideo split the batch rows (CFG "
                      "halves, prompts) over the devices. Several hosts (Wan): start the same "
                      "command on each under SLURM/mpirun or with JAX_COORDINATOR_ADDRESS, "
                      "JAX_NUM_PROCESSES and JAX_PROCESS_ID set")
  g = p.add_argument_group("output")
  g.add_argument("--out", type=Path, default=Path("video.mp4"),
                 help="output .mp4 (with several prompts: NAME_000.mp4, NAME_001.mp4, ...)")
  g.add_argument("--no-gif", action="store_true", help="do not write the .gif preview beside the mp4")
  g.add_argument("--save-latents", action="store_true", help="also save the final latents (.npy)")
  g.add_argument("--quiet", action="store_true", help="no progress bar")
  g.add_argument("--compile-cache", default=None, metavar="DIR", help=COMPILE_CACHE_HELP)
  return p


def _prompts(args) -> list[str] | None:
  if args.prompt is not None and args.prompt_file is not None:
    raise ValueError("give --prompt or --prompt-file, not both")
  if args.prompt_file is not None:
    try:
      text = args.prompt_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
      raise ValueError(f"cannot read prompt file {str(args.prompt_file)!r}: {e}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
      raise ValueError(f"prompt file {str(args.prompt_file)!r} has no prompts")
    return prompts
  if args.prompt is not None:
    if not args.prompt.strip():
      raise ValueError("--prompt is empty")
    return [args.prompt]
  return None


def _outputs(out: Path, n: int) -> list[Path]:
  if out.suffix.lower() != ".mp4":
    raise ValueError(f"--out must name an .mp4 file, got {str(out)!r}")
  if n == 1:
    return [out]
  return [out.with_name(f"{out.stem}_{i:03d}{out.suffix}") for i in range(n)]


_FIELD_FLAGS = {
    ("teacache", "rel_l1_thresh"): "--cache-threshold", ("easycache", "threshold"): "--cache-threshold",
    ("teacache", "warmup"): "--cache-warmup", ("easycache", "warmup"): "--cache-warmup",
    ("teacache", "cutoff"): "--cache-cutoff", ("easycache", "cutoff"): "--cache-cutoff",
    ("pab", "self_range"): "--pab-self-range", ("pab", "cross_range"): "--pab-cross-range",
    ("pab", "t_start"): "--pab-window", ("pab", "t_end"): "--pab-window",
    ("step-skip", "interval"): "--skip-interval", ("step-skip", "warmup"): "--skip-warmup",
}


def _number(text: str, flag: str, kind=float):
  try:
    return kind(text)
  except ValueError:
    raise ValueError(f"{flag} must be {'an integer' if kind is int else 'a number'}, got "
                     f"{text!r}") from None


def peer_config(args):
  """The config of `--method` from its knob flags (None for astraea); ValueError on bad values."""
  from astraea_jax.acceleration.attention_broadcast import PABConfig  # pylint: disable=import-outside-toplevel
  from astraea_jax.acceleration.step_cache import (  # pylint: disable=import-outside-toplevel
      COEFFICIENTS, EasyCacheConfig, TeaCacheConfig)
  from astraea_jax.acceleration.step_skip import StepSkipConfig  # pylint: disable=import-outside-toplevel

  method = args.method
  if method not in METHODS:
    raise ValueError(f"--method {method!r} must be one of {', '.join(METHODS)}")
  for name, methods in _KNOBS.items():
    if getattr(args, name) is not None and method not in methods:
      raise ValueError(f"--{name.replace('_', '-')} applies to --method {' / '.join(methods)} only")
  if method == "astraea":
    return None
  if args.dense:
    raise ValueError(f"--dense applies to --method astraea only (--method {method} without "
                     "--budget / --schedule already wraps the dense model)")
  if method in ("teacache", "pab") and (args.budget is not None or args.schedule is not None):
    raise ValueError(f"--method {method} replaces the whole forward: it does not combine with "
                     "--budget / --schedule (easycache and step-skip do)")
  kw = {}
  if method in ("teacache", "easycache"):
    if args.cache_threshold is not None:
      kw["rel_l1_thresh" if method == "teacache" else "threshold"] = _number(
          args.cache_threshold, "--cache-threshold")
    if args.cache_warmup is not None:
      kw["warmup"] = _number(args.cache_warmup, "--cache-warmup", int)
    if args.cache_cutoff is not None:
      kw["cutoff"] = _number(args.cache_cutoff, "--cache-cutoff", int)
    if args.teacache_coefficients is not None:
      if args.teacache_coefficients not in COEFFICIENTS:
        raise ValueError(f"--teacache-coefficients {args.teacache_coefficients!r} must be one of "
                         f"{', '.join(COEFFICIENTS)}")
      kw["coefficients"] = COEFFICIENTS[args.teacache_coefficients]
    if args.teacache_indicator is not None:
      names = {"modulated-input": "modulated_input", "timestep-embedding": "timestep_embedding"}
      if args.teacache_indicator not in names:
        raise ValueError(f"--teacache-indicator {args.teacache_indicator!r} must be one of "
                         f"{', '.join(names)}")
      kw["indicator"] = names[args.teacache_indicator]
    config_type = TeaCacheConfig if method == "teacache" else EasyCacheConfig
  elif method == "pab":
    if args.pab_self_range is not None:
      kw["self_range"] = _number(args.pab_self_range, "--pab-self-range", int)
    if args.pab_cross_range is not None:
      kw["cross_range"] = _number(args.pab_cross_range, "--pab-cross-range", int)
    if args.pab_window is not None:
      parts = args.pab_window.split(",")
      if len(parts) != 2:
        raise ValueError(f"--pab-window must look like 100,800 (T0,T1), got {args.pab_window!r}")
      kw["t_start"], kw["t_end"] = (_number(v, "--pab-window") for v in parts)
    config_type = PABConfig
  else:
    if args.skip_interval is not None:
      kw["interval"] = _number(args.skip_interval, "--skip-interval", int)
    if args.skip_warmup is not None:
      kw["warmup"] = _number(args.skip_warmup, "--skip-warmup", int)
    config_type = StepSkipConfig
  try:
    return config_type(**kw)
  except ValueError as e:
    # The configs name the field ("warmup=0 must ..."): name the flag that set it instead.
    match = re.match(r"(?:self\.)?(\w+)=", str(e))
    flag = _FIELD_FLAGS.get((method, match.group(1)) if match else None)
    raise ValueError(f"{flag}: {e}" if flag else str(e)) from None


def run(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  # Heavy imports after argument parsing, so --help and usage errors are instant.
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from astraea_jax import metrics, parallel, video  # pylint: disable=import-outside-toplevel
  from astraea_jax.acceleration import BudgetSchedule, shipped_schedule  # pylint: disable=import-outside-toplevel

  enable_compile_cache(args.compile_cache)  # before anything compiles
  parallel.maybe_initialize()  # several hosts: before anything touches the devices
  # Default: the most visible GPUs that split the request evenly (None); one device on CPU.
  devices = args.devices or (None if parallel.default_num_devices() > 1 else 1)

  prompts = _prompts(args)
  peer = peer_config(args)  # flag errors before loading the model
  pipe = load_model(args.model)
  if prompts is None:
    if pipe.default_prompt is None:
      raise ValueError("give --prompt or --prompt-file")
    prompts = [pipe.default_prompt]
  outs = _outputs(args.out, len(prompts))

  def check_outputs():  # before any work: can the files be written?
    for out in outs:
      video.check_writable(out)
    video.check_mp4_encoder()

  parallel.check_together(check_outputs)  # several processes stop together, none left waiting

  overrides = {k: v for k, v in dict(
      frames=args.frames, steps=args.steps, guidance=args.guidance, shift=args.shift,
      negative_prompt=args.negative_prompt, sigma_schedule=args.sigma_schedule).items()
      if v is not None}
  if args.size is not None:
    overrides["width"], overrides["height"] = args.size
  cfg = dataclasses.replace(pipe.defaults, seed=args.seed, solver=args.solver, **overrides)
  pipe.latent_shape(cfg)  # validate size and frames before loading anything else

  if args.uniform and (args.dense or args.schedule is not None):
    raise ValueError("--uniform goes with --budget, not with --dense or --schedule")
  if args.dense or (peer is not None and args.budget is None and args.schedule is None):
    schedule = None
  elif args.schedule is not None:
    try:
      schedule = BudgetSchedule.load(args.schedule)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
      raise ValueError(f"cannot read schedule {str(args.schedule)!r}: {e}") from None
    if len(schedule) != cfg.steps:
      if not args.resample_schedule:
        raise ValueError(f"schedule {str(args.schedule)!r} has {len(schedule)} steps; run with "
                         f"--steps {len(schedule)}, add --resample-schedule, or search a schedule "
                         f"for {cfg.steps} steps")
      resampled = schedule.resample(cfg.steps, mode=args.resample_schedule)
      print(f"resampled schedule {str(args.schedule)!r} from {len(schedule)} to {cfg.steps} steps "
            f"({args.resample_schedule}): mean budget {schedule.mean:.3f} -> {resampled.mean:.3f}",
            file=sys.stderr)
      schedule = resampled
  else:
    theta = DEFAULT_BUDGET if args.budget is None else args.budget
    if not 0.0 <= args.dense_first < 1.0:
      raise ValueError(f"--dense-first {args.dense_first} must lie in [0, 1)")
    dense_steps = round(args.dense_first * cfg.steps)
    shipped = (None if args.uniform or dense_steps else
               shipped_schedule(pipe.schedules, theta, cfg.steps))
    if shipped is not None:
      schedule = shipped
      print(f"budget {theta:g}: the model's searched schedule {shipped.name!r}, thetas "
            f"{' '.join(f'{t:g}' for t in shipped.thetas)} (--uniform: {theta:g} at every step)",
            file=sys.stderr)
    elif dense_steps:
      schedule = BudgetSchedule.dense_then(cfg.steps, theta, dense_steps=dense_steps)
    else:
      schedule = BudgetSchedule.uniform(cfg.steps, theta)

  progress = not args.quiet
  label = "dense" if schedule is None else f"schedule {schedule.name or 'from file'}"
  method = None
  if peer is not None:
    from astraea_jax.pipeline import step_method  # pylint: disable=import-outside-toplevel
    if devices != 1:
      raise ValueError(f"--method {args.method} runs on one device: use --devices 1")
    method = step_method(peer, schedule=schedule)
    label = f"{args.method} {_knobs(peer)}" + ("" if schedule is None else f" around {label}")
  print(f"{pipe.name}: {len(prompts)} prompt(s), {cfg.width}x{cfg.height}, {cfg.frames} frames, "
        f"{cfg.steps} steps, guidance {cfg.guidance:g}, {label}", file=sys.stderr)
  result = pipe.generate(prompts, cfg, schedule=None if method else schedule, progress=progress,
                         devices=devices, method=method)
  dense = None
  if args.compare_dense and (schedule is not None or method is not None):
    dense = pipe.generate(prompts, cfg, schedule=None, progress=progress, devices=devices)

  # Every host holds the whole result; one writes it.
  for i, out in enumerate(outs if jax.process_index() == 0 else []):
    video.write_video(out, result.frames[i], fps=pipe.fps)
    if not args.no_gif:
      video.write_video(out.with_suffix(".gif"), result.frames[i], fps=pipe.fps)
    if args.save_latents:
      with video.atomic_path(out.with_suffix(".npy")) as tmp:
        with open(tmp, "wb") as f:
          np.save(f, result.latents[i])

  stats = result.denoise_stats
  n_tokens = result.num_tokens
  budget = "dense"
  if schedule is not None:
    computed = result.computed_fraction
    if computed is None:  # a peer method around the schedule: its step model rounds no k
      computed = schedule.effective_mean(n_tokens)
    budget = (f"budget {schedule.mean:.2f} (first step dense: {computed:.2f} of N={n_tokens} "
              f"tokens computed on average)")
  if peer is not None:
    budget = f"{args.method} {_knobs(peer)}" + ("" if schedule is None else f" around {budget}")
  if result.step_records is not None:
    from astraea_jax.acceleration.method_stats import summary_line  # pylint: disable=import-outside-toplevel
    budget += f" | {summary_line(result.step_records, result.num_layers)}"
  print(f"wrote {', '.join(map(str, outs))} | {budget} | total {result.total_seconds:.1f} s "
        f"(text {result.encode_seconds:.1f} s, denoise {stats.total_seconds:.1f} s, "
        f"decode {result.decode_seconds:.1f} s) | {_ms_per_step(stats)}, "
        f"compile {sum(stats.compile_seconds):.1f} s")
  if dense is not None:
    d = dense.denoise_stats
    p = np.mean([metrics.psnr(a, b) for a, b in zip(result.frames, dense.frames)])
    s = np.mean([metrics.ssim(a, b) for a, b in zip(result.frames, dense.frames)])
    speedup = _compute_seconds(d) / max(_compute_seconds(stats), 1e-9)
    print(f"dense: denoise {d.total_seconds:.1f} s, {_ms_per_step(d)} | "
          f"speedup {speedup:.2f}x (denoising, compile time excluded) | PSNR {p:.2f} dB, "
          f"SSIM {s:.4f} vs dense")
  return 0


def _knobs(config) -> str:
  """e.g. "(rel_l1_thresh=0.1, warmup=1, cutoff=1)": the config's fields."""
  fields = ", ".join(f"{f.name}={getattr(config, f.name)}" for f in dataclasses.fields(config)
                     if f.name not in ("coefficients", "indicator") or getattr(config, f.name))
  return f"({fields})"


def _compute_seconds(stats) -> float:
  """Denoising wall time less the XLA compile time observed in each step."""
  return sum(max(s - c, 0.0) for s, c in zip(stats.step_seconds, stats.compile_seconds))


def _ms_per_step(stats) -> str:
  # The mean over every step, compile time taken out: with a schedule the steps differ (a skipped
  # step costs a few ms), so the median or the steps that compiled nothing would mislead.
  ms = _compute_seconds(stats) / max(len(stats.step_seconds), 1) * 1e3
  return f"{ms:.0f} ms/step on average without compiling"


def main(argv: list[str] | None = None) -> int:
  return run_main(run, argv)


if __name__ == "__main__":
  sys.exit(main())
