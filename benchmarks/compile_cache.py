"""What the persistent compilation cache saves a `generate` run: one process per run, same cache.

`generate` and `search` keep jax's persistent compilation cache (`--compile-cache`, default
~/.cache/astraea-jax/xla). This script runs one text-to-video request through `WanPipeline.generate`
(the code path of `python -m astraea_jax.generate`) on the full-size Wan2.1-T2V-1.3B pipeline with
random weights built on the device (as `benchmarks/e2e.py`), 480p x 81 frames, 50 steps with CFG,
and reports its wall time, the compile time inside the denoising loop and how many programs the
cache holds before and after. Run it twice with the same `--cache`: the first run fills the cache,
the second loads from it.

    PYTHONPATH=.:benchmarks python3 benchmarks/compile_cache.py --cache /tmp/xla      # twice
    PYTHONPATH=.:benchmarks python3 benchmarks/compile_cache.py --cache /tmp/xla --quick

Prints one line and appends a JSON record to `--out` (default results/compile_cache-<device>.jsonl).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from astraea_jax.cli_support import enable_compile_cache


def _entries(folder: Path) -> int:
  return sum(1 for _ in folder.iterdir()) if folder.is_dir() else 0


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--cache", type=Path, required=True, help="compilation cache folder ('none': off)")
  p.add_argument("--schedule", type=Path,
                 default=Path(__file__).parent / "schedules" / "searched_default_0.5-whole.json",
                 help="budget schedule (resampled to the request's steps by repeating)")
  p.add_argument("--quick", action="store_true", help="tiny random models (CPU smoke run)")
  p.add_argument("--out", type=Path, default=None)
  args = p.parse_args(argv)

  started = time.perf_counter()
  folder = enable_compile_cache(args.cache)  # before anything compiles
  before = _entries(args.cache)

  # pylint: disable=import-outside-toplevel
  from astraea_jax.acceleration import BudgetSchedule
  from benchutil import append_record, generation_fields, run_fields
  from e2e import PROMPT, build
  # pylint: enable=import-outside-toplevel

  pipe, request = build(args.quick)
  built = time.perf_counter() - started
  schedule = BudgetSchedule.load(args.schedule).resample(request.steps)
  start = time.perf_counter()
  result = pipe.generate([PROMPT], request, schedule=schedule, progress=False)
  wall = time.perf_counter() - start
  record = {
      "benchmark": "compile_cache", "model": pipe.name, "cache": None if folder is None else str(folder),
      "schedule": args.schedule.name, "steps": request.steps,
      "video": f"{request.width}x{request.height}x{request.frames}",
      "entries_before": before, "entries_after": _entries(args.cache), "build_s": round(built, 2),
      **generation_fields(result, wall),
      "process_s": round(time.perf_counter() - started, 2), **run_fields()}
  append_record(record, args.out, "compile_cache")
  print(f"cache entries {before} -> {record['entries_after']}: generate {wall:.1f} s (encode "
        f"{record['encode_s']:.1f}, denoise {record['denoise_s']:.1f} of which compile "
        f"{record['denoise_compile_s']:.1f}, decode {record['decode_s']:.1f}); process "
        f"{record['process_s']:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
