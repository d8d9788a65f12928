"""`python -m astraea_jax.generate`: prompt in, video file out, dense or accelerated with ASTRAEA.

Examples:

  python -m astraea_jax.generate                                  # the embedded default model
  python -m astraea_jax.generate --prompt "a red circle moving right on a gray background" --budget 0.4
  python -m astraea_jax.generate --model DIR --prompt "a dog running happily" --budget 0.5 --out dog.mp4
  python -m astraea_jax.generate --model DIR --prompt-file prompts.txt --schedule schedule.json

`--budget THETA` computes round(THETA * N) of the N video tokens in every block at every step after the
first (ASTRAEA, arXiv 2506.05096); `--schedule FILE` takes one theta per step from a JSON file written by
`python -m astraea_jax.search`; `--dense` runs the unaccelerated model. Without any of the three, the
default budget 0.5 is used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from astraea_jax.cli_support import load_model, run_main

DEFAULT_BUDGET = 0.5


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
                      "`python -m checkpoints_convert wan_t2v`")
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
                 help="uniform token budget theta in [0, 1] (the first step is always dense)")
  m.add_argument("--schedule", type=Path, default=None, help="per-step budget schedule JSON")
  m.add_argument("--dense", action="store_true", help="no acceleration")
  g.add_argument("--dense-first", type=float, default=0.0, metavar="FRACTION",
                 help="with --budget: run this fraction of the first steps dense (e.g. 0.2)")
  g.add_argument("--compare-dense", action="store_true",
                 help="also run the dense model and report its time and the PSNR/SSIM against it")
  g = p.add_argument_group("devices")
  g.add_argument("--devices", type=_positive, default=None, metavar="N",
                 help="shard over the first N devices (1: one device; default: every visible GPU "
                      "that splits the request evenly, 1 on CPU). Several hosts: start the same "
                      "command on each under SLURM/mpirun or with JAX_COORDINATOR_ADDRESS, "
                      "JAX_NUM_PROCESSES and JAX_PROCESS_ID set")
  g = p.add_argument_group("output")
  g.add_argument("--out", type=Path, default=Path("video.mp4"),
                 help="output .mp4 (with several prompts: NAME_000.mp4, NAME_001.mp4, ...)")
  g.add_argument("--no-gif", action="store_true", help="do not write the .gif preview beside the mp4")
  g.add_argument("--save-latents", action="store_true", help="also save the final latents (.npy)")
  g.add_argument("--quiet", action="store_true", help="no progress bar")
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


def run(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  # Heavy imports after argument parsing, so --help and usage errors are instant.
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from astraea_jax import metrics, parallel, video  # pylint: disable=import-outside-toplevel
  from astraea_jax.acceleration import BudgetSchedule  # pylint: disable=import-outside-toplevel

  parallel.maybe_initialize()  # several hosts: before anything touches the devices
  # Default: the most visible GPUs that split the request evenly (None); one device on CPU.
  devices = args.devices or (None if parallel.default_num_devices() > 1 else 1)

  prompts = _prompts(args)
  pipe = load_model(args.model)
  if prompts is None:
    if pipe.default_prompt is None:
      raise ValueError("give --prompt or --prompt-file")
    prompts = [pipe.default_prompt]
  outs = _outputs(args.out, len(prompts))
  for out in outs:  # fail before any work if the files cannot be written
    video.check_writable(out)

  overrides = {k: v for k, v in dict(
      frames=args.frames, steps=args.steps, guidance=args.guidance, shift=args.shift,
      negative_prompt=args.negative_prompt, sigma_schedule=args.sigma_schedule).items()
      if v is not None}
  if args.size is not None:
    overrides["width"], overrides["height"] = args.size
  cfg = dataclasses.replace(pipe.defaults, seed=args.seed, solver=args.solver, **overrides)
  pipe.latent_shape(cfg)  # validate size and frames before loading anything else

  if args.dense:
    schedule = None
  elif args.schedule is not None:
    try:
      schedule = BudgetSchedule.load(args.schedule)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
      raise ValueError(f"cannot read schedule {str(args.schedule)!r}: {e}") from None
    if len(schedule) != cfg.steps:
      raise ValueError(f"schedule {str(args.schedule)!r} has {len(schedule)} steps; run with "
                       f"--steps {len(schedule)} or search a schedule for {cfg.steps} steps")
  else:
    theta = DEFAULT_BUDGET if args.budget is None else args.budget
    if not 0.0 <= args.dense_first < 1.0:
      raise ValueError(f"--dense-first {args.dense_first} must lie in [0, 1)")
    dense_steps = round(args.dense_first * cfg.steps)
    schedule = (BudgetSchedule.dense_then(cfg.steps, theta, dense_steps=dense_steps) if dense_steps
                else BudgetSchedule.uniform(cfg.steps, theta))

  progress = not args.quiet
  label = "dense" if schedule is None else f"schedule {schedule.name or 'from file'}"
  print(f"{pipe.name}: {len(prompts)} prompt(s), {cfg.width}x{cfg.height}, {cfg.frames} frames, "
        f"{cfg.steps} steps, guidance {cfg.guidance:g}, {label}", file=sys.stderr)
  result = pipe.generate(prompts, cfg, schedule=schedule, progress=progress, devices=devices)
  dense = None
  if args.compare_dense and schedule is not None:
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
  budget = "dense" if schedule is None else (
      f"budget {schedule.mean:.2f} (first step dense: {schedule.effective_mean(n_tokens):.2f} of "
      f"N={n_tokens} tokens computed on average)")
  print(f"wrote {', '.join(map(str, outs))} | {budget} | total {result.total_seconds:.1f} s "
        f"(text {result.encode_seconds:.1f} s, denoise {stats.total_seconds:.1f} s, "
        f"decode {result.decode_seconds:.1f} s) | {stats.steady_step_seconds * 1e3:.0f} ms/step "
        f"steady, compile {sum(stats.compile_seconds):.1f} s")
  if dense is not None:
    d = dense.denoise_stats
    p = np.mean([metrics.psnr(a, b) for a, b in zip(result.frames, dense.frames)])
    s = np.mean([metrics.ssim(a, b) for a, b in zip(result.frames, dense.frames)])
    speedup = _compute_seconds(d) / max(_compute_seconds(stats), 1e-9)
    print(f"dense: denoise {d.total_seconds:.1f} s, {d.steady_step_seconds * 1e3:.0f} ms/step steady | "
          f"speedup {speedup:.2f}x (denoising, compile time excluded) | PSNR {p:.2f} dB, "
          f"SSIM {s:.4f} vs dense")
  return 0


def _compute_seconds(stats) -> float:
  """Denoising wall time less the XLA compile time observed in each step."""
  return sum(max(s - c, 0.0) for s, c in zip(stats.step_seconds, stats.compile_seconds))


def main(argv: list[str] | None = None) -> int:
  return run_main(run, argv)


if __name__ == "__main__":
  sys.exit(main())
