"""Quality against speed of ASTRAEA's uniform budgets on the embedded default model.

For a fixed set of prompts (held out from any schedule calibration: `astraea_jax.search` draws its
calibration prompts from other seeds of the grammar), each budget's videos are compared with the dense
videos of the same prompts and seeds (PSNR, SSIM over all frames), and the denoising loop is timed
after a warm-up run that compiles every per-step token count k_t (so the times exclude compilation).

  python benchmarks/quality.py                       # budgets 0.7 0.5 0.4 0.3, 8 prompts, 2 seeds
  python benchmarks/quality.py --budgets 0.5 --seeds 0

Writes `benchmarks/results/quality-<device>.json` and, if matplotlib is installed, a plot of PSNR against
the measured speedup beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import jax
import numpy as np

from astraea_jax.acceleration import BudgetSchedule
from astraea_jax.default_model import load_default_pipeline
from astraea_jax.metrics import psnr, ssim

sys.path.insert(0, str(Path(__file__).parent))
from benchutil import device_slug  # noqa: E402  pylint: disable=wrong-import-position

PROMPTS = (
    "a red circle moving right on a gray background",
    "a blue square moving up on a white background",
    "a green triangle moving left on a black checkered background",
    "a yellow star bouncing on a beige gradient background",
    "a purple diamond growing and an orange circle moving down on a gray background",
    "a cyan square rotating on a black striped background",
    "a pink circle shrinking on a white background",
    "an orange triangle moving right and a blue star moving left on a beige background",
)


def _run(pipe, cfg, schedule):
  pipe.generate(list(PROMPTS), cfg, schedule=schedule, progress=False)  # compiles every k_t
  start = time.perf_counter()
  result = pipe.generate(list(PROMPTS), cfg, schedule=schedule, progress=False)
  return result, time.perf_counter() - start


def plot(record: dict, path: Path) -> None:
  """PSNR against measured speedup, one point per budget (needs matplotlib: the `bench` extra)."""
  summary = record["summary"]
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError:
    print("matplotlib not installed: no plot", file=sys.stderr)
    return
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot([s["speedup"] for s in summary], [s["psnr"] for s in summary], "o-")
  for s in summary:
    ax.annotate(f"{s['budget']:.1f}", (s["speedup"], s["psnr"]), textcoords="offset points",
                xytext=(4, 4))
  ax.set_xlabel(f"speedup of the denoising loop over dense ({record['device']})")
  ax.set_ylabel("PSNR vs dense (dB)")
  ax.set_title("ASTRAEA uniform budgets, default model")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--budgets", type=float, nargs="+", default=[0.7, 0.5, 0.4, 0.3])
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  p.add_argument("--steps", type=int, default=None, help="default: the model's (20)")
  p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
  p.add_argument("--plot-from", type=Path, default=None,
                  help="only draw the plot of an existing results JSON (beside it, .png)")
  args = p.parse_args(argv)
  if args.plot_from is not None:
    plot(json.loads(args.plot_from.read_text()), args.plot_from.with_suffix(".png"))
    return 0

  pipe = load_default_pipeline()
  base = pipe.defaults if args.steps is None else dataclasses.replace(pipe.defaults,
                                                                       steps=args.steps)
  rows = []
  for seed in args.seeds:
    cfg = dataclasses.replace(base, seed=seed)
    dense, dense_s = _run(pipe, cfg, None)
    rows.append({"seed": seed, "budget": 1.0, "seconds": dense_s, "speedup": 1.0,
                 "psnr": float("inf"), "ssim": 1.0})
    for budget in args.budgets:
      fast, fast_s = _run(pipe, cfg, BudgetSchedule.uniform(cfg.steps, budget))
      rows.append({
          "seed": seed, "budget": budget, "seconds": fast_s, "speedup": dense_s / fast_s,
          "psnr": float(np.mean([psnr(a, b) for a, b in zip(fast.frames, dense.frames)])),
          "ssim": float(np.mean([ssim(a, b) for a, b in zip(fast.frames, dense.frames)]))})
      print(f"seed {seed} budget {budget}: {rows[-1]['psnr']:.2f} dB, SSIM "
            f"{rows[-1]['ssim']:.4f}, {rows[-1]['speedup']:.2f}x", flush=True)

  summary = []
  for budget in args.budgets:
    sel = [r for r in rows if r["budget"] == budget]
    summary.append({k: float(np.mean([r[k] for r in sel])) for k in ("psnr", "ssim", "speedup")}
                   | {"budget": budget})
  device = device_slug()
  out = Path(args.out or Path(__file__).parent / "results" / f"quality-{device}.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  record = {
      "benchmark": "quality", "device": jax.devices()[0].device_kind, "platform": platform.platform(),
      "date": datetime.date.today().isoformat(),
      "command": "python benchmarks/quality.py " + " ".join(argv if argv is not None
                                                           else sys.argv[1:]),
      "versions": {n: metadata.version(n) for n in ("jax", "jaxlib", "flax")},
      "model": pipe.name, "size": [base.frames, base.height, base.width], "steps": base.steps,
      "guidance": base.guidance, "prompts": list(PROMPTS), "seeds": args.seeds,
      "timing": "denoising loop of the whole prompt batch, after a compiling warm-up run",
      "summary": summary, "runs": rows}
  out.write_text(json.dumps(record, indent=2) + "\n")
  plot(record, out.with_suffix(".png"))
  print("budget  PSNR(dB)  SSIM    speedup")
  for s in summary:
    print(f"{s['budget']:6.1f}  {s['psnr']:8.2f}  {s['ssim']:.4f}  {s['speedup']:6.2f}x")
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
