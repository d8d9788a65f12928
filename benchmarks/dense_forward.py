"""Times one dense forward of the Wan2.1 transformer (random weights) on the GPU.

Default: the full-size `wan2.1-t2v-1.3b` preset in bf16 at 480p x 81 frames (latents
[B, 16, 21, 60, 104] -> 32,760 tokens, 512 text tokens of dim 4096), batch 1 and batch 2 (the CFG
pair), for every available attention implementation. Weights are initialised directly on the device
under jit. Each case is compiled, warmed up, then timed `--runs` times (`block_until_ready`; with
`--chain K` each run is K forwards dispatched back to back, as in a sampling loop); the median is
reported with the peak device memory (`memory_stats()['peak_bytes_in_use']`).

With `--breakdown`, the batch-1 forward is also timed with attention replaced by a no-op and the 30
self-attention calls alone, to tell where the time goes.

    PYTHONPATH=. python3 benchmarks/dense_forward.py [--preset NAME] [--batch 1 2] [--runs 7]

Writes benchmarks/results/dense_forward-<device>.json (device, versions, date, command, numbers).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pallas_kernels
from astraea_jax.models import attention as attention_lib
from astraea_jax.models.wan import WanConfig, WanTransformer3DModel
from benchutil import (RESULTS as _RESULTS, build_state, device_slug,  # noqa: E402  (script dir)
                       kernel_times, parse_tuning)



def flops(config: WanConfig, batch: int, n: int, m: int) -> float:
  """Matmul FLOPs of one forward (2 per multiply-add): projections, both attentions, FFN."""
  c, f, layers = config.hidden_size, config.ffn_dim, config.num_layers
  per_layer = (2 * n * c * c * 4  # self-attention q, k, v, out
               + 2 * 2 * n * n * c  # self-attention scores and values
               + 2 * n * c * c * 2 + 2 * m * c * c * 2  # cross-attention q, out; k, v
               + 2 * 2 * n * m * c  # cross-attention scores and values
               + 2 * n * c * f * 2)  # FFN
  return float(batch * layers * per_layer)


def time_fn(fn, args, runs: int, warmup: int, chain: int = 1) -> tuple[list[float], float]:
  """Compiles `fn`, warms it up and returns per-run milliseconds and the compile seconds.

  Each run dispatches `chain` calls back to back and waits once, as a sampling loop does (no host
  sync between steps), and records the time per call.
  """
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  compile_s = time.perf_counter() - start
  for _ in range(warmup - 1):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    outs = [fn(*args) for _ in range(chain)]
    jax.block_until_ready(outs)
    times.append((time.perf_counter() - start) * 1e3 / chain)
    del outs
  return times, compile_s


def peak_gib() -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**30


def available_attention() -> list[str]:
  impls = ["cudnn"] if jax.default_backend() == "gpu" else ["xla"]
  if jax.default_backend() == "gpu":
    impls.append("pallas")
  return impls




def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="wan2.1-t2v-1.3b")
  parser.add_argument("--batch", type=int, nargs="+", default=[1, 2])
  parser.add_argument("--latent", type=int, nargs=3, default=[21, 60, 104], metavar=("T", "Y", "X"))
  parser.add_argument("--text-tokens", type=int, default=512)
  parser.add_argument("--runs", type=int, default=7)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--chain", type=int, default=1,
                      help="forwards per timed run, dispatched back to back as in a sampling loop "
                      "(one sync per run); the time per forward is reported")
  parser.add_argument("--attention", nargs="+", default=None,
                      help="attention implementations (default: all available)")
  parser.add_argument("--breakdown", action="store_true",
                      help="also time batch 1 without attention and attention alone")
  parser.add_argument("--profile", default=None, metavar="DIR",
                      help="trace one batch-1 forward into DIR and print the top GPU kernels")
  parser.add_argument("--attention-sweep", action="store_true",
                      help="time one self-attention call at N and at N rounded up to 128")
  parser.add_argument("--compare-unfused", action="store_true",
                      help="also time each attention with `fuse_projections=False`")
  parser.add_argument("--attention-tuning", nargs="*", default=[], metavar="SPEC",
                      help="also run the pallas attention with these kernel tunings in place of the "
                      "default preset: 'block_q,block_kv,stages[,schedule_barrier[,registers]]'")
  parser.add_argument("--out", default=None,
                      help="JSON path (default results/dense_forward-<device>.json)")
  args = parser.parse_args(argv)

  base = WanConfig.preset(args.preset)
  t, y, x = args.latent
  pt, py, px = base.patch_size
  n = (t // pt) * (y // py) * (x // px)
  m = args.text_tokens
  impls = args.attention or available_attention()
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, preset {args.preset}, "
        f"latents [B, {base.in_channels}, {t}, {y}, {x}] -> N={n}, M={m}, attention {impls}",
        flush=True)

  rng = np.random.default_rng(0)
  results = []
  graphdef, state = build_state(base)
  param_gib = sum(a.nbytes for a in jax.tree_util.tree_leaves(state)) / 2**30
  variants = [(impl, fuse, None) for impl in impls
              for fuse in ((True, False) if args.compare_unfused else (base.fuse_projections,))]
  variants += [("pallas", base.fuse_projections, spec) for spec in args.attention_tuning]

  def run_variant(impl, fuse, spec):
    label = f"{impl}[{spec}]" if spec else impl
    cfg = dataclasses.replace(base, attention_impl=impl, fuse_projections=fuse)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda cfg=cfg: WanTransformer3DModel(cfg,
                                                                               rngs=nnx.Rngs(0))))

    @jax.jit
    def forward(state, latents, timestep, context, graphdef=graphdef):
      return nnx.merge(graphdef, state)(latents, timestep, context)

    for b in args.batch:
      latents = jnp.asarray(rng.standard_normal((b, base.in_channels, t, y, x), np.float32))
      timestep = jnp.asarray(rng.uniform(0, 1000, (b,)).astype(np.float32))
      context = jnp.asarray(rng.standard_normal((b, m, base.text_dim), np.float32),
                            jnp.bfloat16)
      try:
        times, compile_s = time_fn(forward, (state, latents, timestep, context), args.runs,
                                   args.warmup, args.chain)
      except Exception as e:  # pylint: disable=broad-except
        # One failing implementation must not cost the other measurements of this call.
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        print(f"{label} B={b} failed: {msg}", flush=True)
        results.append({"attention": label, "fused": fuse, "batch": b, "error": msg})
        continue
      out = forward(state, latents, timestep, context)
      finite = bool(jnp.isfinite(out).all())
      med = statistics.median(times)
      row = {"attention": label, "fused": fuse, "batch": b, "chain": args.chain,
             "median_ms": med, "min_ms": min(times),
             "runs_ms": times, "compile_s": compile_s, "peak_gib": peak_gib(),
             "tflops": flops(base, b, n, m) / (med * 1e-3) / 1e12, "finite": finite}
      results.append(row)
      print(json.dumps({k: v for k, v in row.items() if k != "runs_ms"}), flush=True)
      del latents, context, out

  for impl, fuse, spec in variants:
    # The model takes the kernel's default preset; a swept tuning stands in for it while traced.
    override = (pallas_kernels.preset_override("default", parse_tuning(spec)) if spec
                else contextlib.nullcontext())
    with override:
      run_variant(impl, fuse, spec)

  breakdown = {}
  if args.breakdown:
    try:
      breakdown = run_breakdown(base, state, t, y, x, m, args, rng, impls[0])
    except Exception as e:  # pylint: disable=broad-except
      print(f"breakdown failed: {type(e).__name__}: {str(e)[:300]}", flush=True)

  kernels, sweep = [], []
  if args.profile:
    try:
      kernels = run_profile(base, state, t, y, x, m, rng, impls[0], args.profile)
    except Exception as e:  # pylint: disable=broad-except
      print(f"profile failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
  if args.attention_sweep:
    sweep = run_attention_sweep(base, n, args, rng)

  record = {
      "benchmark": "dense_forward",
      "device": jax.devices()[0].device_kind,
      "backend": jax.default_backend(),
      "jax": jax.__version__,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
      "preset": args.preset,
      "latents": [None, base.in_channels, t, y, x],
      "tokens": n,
      "text_tokens": m,
      "param_gib": param_gib,
      "flops_per_sample": flops(base, 1, n, m),
      "results": results,
      "breakdown": breakdown,
      "top_kernels": kernels,
      "attention_sweep": sweep,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }
  out = Path(args.out) if args.out else _RESULTS / f"dense_forward-{device_slug()}.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(record, indent=1) + "\n")

  print(f"\nwrote {out}")
  print(f"{'attention':>9} {'fused':>5} {'B':>2} {'median ms':>10} {'min ms':>8} {'TFLOP/s':>8} "
        f"{'peak GiB':>9}")
  for r in results:
    if "error" in r:
      print(f"{r['attention']:>9} {str(r['fused']):>5} {r['batch']:>2} failed: {r['error'][:80]}")
      continue
    peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
    print(f"{r['attention']:>9} {str(r['fused']):>5} {r['batch']:>2} {r['median_ms']:>10.1f} "
          f"{r['min_ms']:>8.1f} {r['tflops']:>8.0f} {peak:>9}")
  for k, v in breakdown.items():
    print(f"  breakdown {k}: {v:.1f} ms")
  for r in sweep:
    print(f"  attention {r['case']}: {r['median_ms']:.2f} ms, {r['tflops']:.0f} TFLOP/s")
  return 0


def run_profile(base, state, t, y, x, m, rng, impl, trace_dir) -> list[dict]:
  """Traces one batch-1 forward; returns (and prints) GPU kernel time grouped by kernel name."""
  cfg = dataclasses.replace(base, attention_impl=impl)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: WanTransformer3DModel(cfg, rngs=nnx.Rngs(0))))

  @jax.jit
  def forward(state, latents, timestep, context):
    return nnx.merge(graphdef, state)(latents, timestep, context)

  latents = jnp.asarray(rng.standard_normal((1, base.in_channels, t, y, x), np.float32))
  timestep = jnp.asarray([500.0], jnp.float32)
  context = jnp.asarray(rng.standard_normal((1, m, base.text_dim), np.float32), jnp.bfloat16)
  args = (state, latents, timestep, context)
  jax.block_until_ready(forward(*args))
  return kernel_times(forward, args, trace_dir, label="dense forward")[1]["kernels"]


def run_attention_sweep(base, n, args, rng) -> list[dict]:
  """One self-attention call at the model's N and at N rounded up to a multiple of 128."""
  h, d = base.num_attention_heads, base.attention_head_dim
  rows = []
  n_pad = -(-n // 128) * 128
  impls = ["cudnn"] + (["pallas"] if "pallas" in available_attention() else [])
  for impl in impls:
    for length in sorted({n, n_pad}):
      q, k, v = (jnp.asarray(rng.standard_normal((1, length, h, d), np.float32), jnp.bfloat16)
                 for _ in range(3))
      fn = jax.jit(lambda q, k, v, impl=impl: attention_lib.attention(q, k, v,
                                                                      implementation=impl))
      try:
        times, _ = time_fn(fn, (q, k, v), args.runs * 3, args.warmup)
      except Exception as e:  # pylint: disable=broad-except
        print(f"attention {impl} N={length} failed: {type(e).__name__}", flush=True)
        continue
      med = statistics.median(times)
      rows.append({"case": f"{impl} N={length}", "median_ms": med,
                   "tflops": 4 * length * length * h * d / (med * 1e-3) / 1e12})
  # Padded keys masked through cuDNN's key lengths: N real keys inside a 128-aligned buffer.
  if n_pad != n:
    q, k, v = (jnp.asarray(rng.standard_normal((1, n_pad, h, d), np.float32), jnp.bfloat16)
               for _ in range(3))
    lens = jnp.asarray([n], jnp.int32)
    fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, query_seq_lengths=lens, key_value_seq_lengths=lens, implementation="cudnn"))
    try:
      times, _ = time_fn(fn, (q, k, v), args.runs * 3, args.warmup)
      med = statistics.median(times)
      rows.append({"case": f"cudnn N={n} padded to {n_pad} (seq lengths)", "median_ms": med,
                   "tflops": 4 * n * n * h * d / (med * 1e-3) / 1e12})
    except Exception as e:  # pylint: disable=broad-except
      print(f"padded cudnn failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
  return rows


def run_breakdown(base, state, t, y, x, m, args, rng, impl) -> dict[str, float]:
  """Batch 1: the forward with attention as a no-op, and the L self-attention calls alone."""
  out: dict[str, float] = {}
  # A no-op attention (returns q) keeps every other op of the forward.
  impls = attention_lib._IMPLEMENTATIONS  # pylint: disable=protected-access
  impls["noop"] = lambda q, k, v, *, scale: q
  cfg = dataclasses.replace(base, attention_impl="noop")
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: WanTransformer3DModel(cfg, rngs=nnx.Rngs(0))))

  @jax.jit
  def forward(state, latents, timestep, context):
    return nnx.merge(graphdef, state)(latents, timestep, context)

  latents = jnp.asarray(rng.standard_normal((1, base.in_channels, t, y, x), np.float32))
  timestep = jnp.asarray([500.0], jnp.float32)
  context = jnp.asarray(rng.standard_normal((1, m, base.text_dim), np.float32), jnp.bfloat16)
  times, _ = time_fn(forward, (state, latents, timestep, context), args.runs, args.warmup)
  out["forward_without_attention"] = statistics.median(times)

  n = (t // base.patch_size[0]) * (y // base.patch_size[1]) * (x // base.patch_size[2])
  h, d = base.num_attention_heads, base.attention_head_dim
  q = jnp.asarray(rng.standard_normal((base.num_layers, 1, n, h, d), np.float32), jnp.bfloat16)

  @jax.jit
  def self_attention_only(q):
    def body(carry, qi):
      o = attention_lib.attention(qi + carry, qi, qi, implementation=impl)
      return carry + o[:, :1, :1, :1], None  # a data dependency, so no call is dropped
    carry, _ = jax.lax.scan(body, jnp.zeros((1, 1, 1, 1), jnp.bfloat16), q)
    return carry

  times, _ = time_fn(self_attention_only, (q,), args.runs, args.warmup)
  out[f"self_attention_only_{base.num_layers}x"] = statistics.median(times)
  del impls["noop"]
  return out


if __name__ == "__main__":
  sys.exit(main())
