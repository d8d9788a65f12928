"""Pieces every GPU benchmark shares: the results folder, the device's name, random Wan weights on device.

Benchmarks run as scripts (`PYTHONPATH=. python3 benchmarks/NAME.py`), so this sits beside them.
"""

from __future__ import annotations

import datetime
import glob
import gzip
import json
import os
import re
import sys
import time
from pathlib import Path

import jax
from flax import nnx

from astraea_jax.acceleration.schedule import BudgetSchedule
from astraea_jax.models.wan import WanConfig, WanTransformer3DModel

RESULTS = Path(__file__).resolve().parent / "results"


def device_slug() -> str:
  """The first device's kind as a file-name part, e.g. `nvidia-h100-80gb-hbm3`."""
  return re.sub(r"[^a-z0-9]+", "-", jax.devices()[0].device_kind.lower()).strip("-")


def time_chained(compiled, fixed: tuple, cache, runs: int) -> tuple:
  """`runs + 1` calls of `compiled(*fixed, cache)`, the cache chained (donated), the first a
  warm-up: (times in ms, the last output, the last cache)."""
  times, out = [], None
  for i in range(runs + 1):
    start = time.perf_counter()
    out, cache = compiled(*fixed, cache)
    jax.block_until_ready((out, cache))
    if i:
      times.append((time.perf_counter() - start) * 1e3)
  return times, out, cache


def run_fields() -> dict:
  """What every result record names: device, jax version, date, command line."""
  return {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
          "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv)}


def generation_fields(result, wall_seconds: float) -> dict:
  """The timings of one `*Pipeline.generate` result (seconds, rounded to 10 ms)."""
  stats = result.denoise_stats
  return {"generate_s": round(wall_seconds, 2), "encode_s": round(result.encode_seconds, 2),
          "denoise_s": round(stats.total_seconds, 2),
          "denoise_compile_s": round(sum(stats.compile_seconds), 2),
          "decode_s": round(result.decode_seconds, 2)}


def append_record(record: dict, out: Path | None, name: str) -> Path:
  """Appends `record` as one JSON line to `out` (default results/<name>-<device>.jsonl)."""
  out = out or RESULTS / f"{name}-{device_slug()}.jsonl"
  with open(out, "a") as f:
    f.write(json.dumps(record) + "\n")
  return out


def parse_tuning(spec: str):
  """`AttentionTuning` from 'block_q,block_kv,stages[,schedule_barrier 0/1[,compute_registers]]'."""
  import pallas_kernels as pk  # pylint: disable=import-outside-toplevel

  bq, bkv, stages, *rest = (int(x) for x in spec.split(","))
  kwargs = {}
  if rest:
    kwargs["schedule_barrier"] = bool(rest[0])
  if len(rest) > 1:
    kwargs["compute_registers"] = rest[1]
  return pk.AttentionTuning(block_q=bq, block_kv=bkv, stages=stages, **kwargs)


def load_schedules(paths, steps: int,
                   mode: str = "repeat") -> dict[str, tuple[Path, BudgetSchedule]]:
  """`--schedule` files by file stem (the path where two stems agree): `(path, schedule)`, each
  resampled to `steps` (`BudgetSchedule.resample`, identity at the same length)."""
  out = {}
  for path in map(Path, paths):
    out[path.stem if path.stem not in out else str(path)] = (
        path, BudgetSchedule.load(path).resample(steps, mode=mode))
  return out


def init_on_device(make):
  """`(graphdef, state)` of the module `make()` builds, its random parameters initialised on the
  device (no host copy of the weights)."""
  graphdef, _ = nnx.split(nnx.eval_shape(make))
  return graphdef, jax.jit(lambda: nnx.split(make())[1])()


def build_state(config: WanConfig):
  """graphdef and random parameters of a Wan transformer, initialised on the device."""
  return init_on_device(lambda: WanTransformer3DModel(config, rngs=nnx.Rngs(0)))


def _categorize(name: str) -> str:
  low = name.lower()
  if any(k in low for k in ("fmha", "flash", "cudnn", "attn", "attention", "sdpa", "mosaic")):
    return "attention"
  if any(k in low for k in ("gemm", "xmma", "nvjet", "cutlass", "matmul", "gmma", "sm90")):
    return "matmul"
  return "other"


def kernel_times(fn, args, trace_dir: str, *, label: str = "", top: int = 40) -> tuple:
  """Traces one call `fn(*args)` (already compiled and warm); returns `(its result, its GPU kernel
  time {"by_category": {attention|matmul|other: ms}, "kernels": [rows, longest first]})` and
  prints the kernel time. The result is handed back for calls that donate their inputs.
  """
  trace_dir = os.path.join(trace_dir, re.sub(r"[^a-zA-Z0-9_.-]+", "_", label) or "trace")
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    result = jax.block_until_ready(fn(*args))
  files = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  events = json.load(gzip.open(sorted(files)[-1]))["traceEvents"]
  gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
              and "gpu" in str(e.get("args", {}).get("name", "")).lower()}
  agg: dict[str, list[float]] = {}
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in gpu_pids and "dur" in e:
      agg.setdefault(e.get("name", "?"), []).append(float(e["dur"]) / 1e3)
  rows = sorted(({"kernel": k[:160], "category": _categorize(k), "count": len(v),
                  "total_ms": sum(v)} for k, v in agg.items()), key=lambda r: -r["total_ms"])
  by_cat: dict[str, float] = {}
  for r in rows:
    by_cat[r["category"]] = by_cat.get(r["category"], 0.0) + r["total_ms"]
  print(f"GPU kernel time by category (ms){' of ' + label if label else ''}:",
        json.dumps({k: round(v, 1) for k, v in by_cat.items()}), flush=True)
  for r in rows[:top]:
    print(f"  {r['total_ms']:8.2f} ms {r['count']:5d}x {r['category']:9s} {r['kernel'][:110]}")
  return result, {"by_category": by_cat, "kernels": rows[:2 * top]}
