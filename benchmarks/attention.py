"""Selected-query attention on the GPU at the Wan2.1-1.3B 480p x 81-frame shape.

Keys/values: B = 1, Nk = 32,760 tokens, H = 12 heads, D = 128, bf16; queries: Nq = round(theta * Nk)
for each theta. Compared in one run:

- `mosaic_gpu`: this package's Pallas Mosaic GPU kernel (returns the LSE too);
- `chunked`: this package's pure-JAX path (what non-Hopper GPUs get);
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")` (no LSE);
- `torch_flash`, `torch_cudnn`: PyTorch SDPA with the flash and cuDNN backends (no LSE returned);
- `tokamax`: tokamax's Mosaic GPU attention, when the package imports.

FLOPs per call: 4 * B * H * Nq * Nk * D. Each case is compiled and warmed up, then timed as
`--iters` back-to-back calls between two device syncs, `--repeats` times; the median per call is
reported. Inputs are normal random (never zeros); Q/K/V take ~0.2 GB each, far above the 50 MB L2.

Also measured (item 3 of the kernel issue): XLA's gather of S = 0.4 N rows of `[B, N, C]` (C = 1536)
and the scatter back, against the attention time of one block at theta = 0.4.

`--check` first runs a correctness pass of the Mosaic GPU kernel against the float32 reference on
small ragged shapes (bf16 and fp16, kv_len per batch row, block-sparse), after poisoning the device
allocator with NaN buffers of the output's size.

    PYTHONPATH=. python3 benchmarks/attention.py [--check] [--thetas 1 0.7 0.5 0.4 0.2] [--out DIR]

Writes DIR/attention-<device>.json (default benchmarks/results/) with the device, versions, date,
command line and every number; prints a short table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from benchutil import RESULTS as _RESULTS, device_slug, parse_tuning  # noqa: E402  (script dir)





def time_jax(fn, args, *, iters: int, repeats: int) -> float:
  """Median milliseconds per call of a jitted `fn`, after compile and warm-up."""
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  per_call = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    per_call.append((time.perf_counter() - start) * 1e3 / iters)
  return statistics.median(per_call)


def time_torch(fn, *, iters: int, repeats: int) -> float:
  import torch  # pylint: disable=import-outside-toplevel

  fn()
  fn()
  torch.cuda.synchronize()
  per_call = []
  for _ in range(repeats):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
      fn()
    end.record()
    torch.cuda.synchronize()
    per_call.append(start.elapsed_time(end) / iters)
  return statistics.median(per_call)


def poison_allocator(nbytes: int) -> None:
  """Fill and free a NaN buffer so that the next allocations of that size start as garbage."""
  buf = jnp.full((nbytes // 4,), jnp.nan, jnp.float32)
  buf.block_until_ready()
  buf.delete()


# --------------------------------------------------------------------------------------------------


def check(log, *, interpret: bool = False) -> list[dict]:
  """Mosaic GPU kernel vs the float32 reference on small ragged shapes; one row per case."""
  cases = [
      # (B, Nq, Nk, H, D, dtype, kv_len)
      (1, 128, 256, 1, 64, jnp.bfloat16, None),
      (2, 1, 300, 2, 128, jnp.bfloat16, None),
      (2, 333, 333, 3, 128, jnp.bfloat16, [333, 150]),
      (1, 200, 1000, 2, 72, jnp.bfloat16, None),
      (2, 257, 130, 2, 64, jnp.float16, [0, 77]),
      (1, 1100, 4099, 1, 128, jnp.bfloat16, None),
      (1, 500, 700, 2, 256, jnp.bfloat16, None),
  ]
  rows = []
  key = jax.random.key(0)
  for i, (b, nq, nk, h, d, dtype, kv_len) in enumerate(cases):
    key, kq, kk, kvk = jax.random.split(key, 4)
    q = jax.random.normal(kq, (b, nq, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (b, nk, h, d), jnp.float32).astype(dtype)
    v = jax.random.normal(kvk, (b, nk, h, d), jnp.float32).astype(dtype)
    kvl = None if kv_len is None else jnp.asarray(kv_len, jnp.int32)
    name = f"B{b} Nq{nq} Nk{nk} H{h} D{d} {jnp.dtype(dtype).name} kv_len={kv_len}"
    try:
      ro, rl = pk.selected_query_attention_reference(q, k, v, kv_len=kvl)
      poison_allocator(4 * q.size * 4)
      out, lse = pk.selected_query_attention(q, k, v, kv_len=kvl, implementation="mosaic_gpu",
                                             interpret=interpret)
      rows.append(_compare(name, out, lse, ro, rl))
    except Exception as e:  # noqa: BLE001 -- report every case, keep going
      rows.append({"case": name, "error": f"{type(e).__name__}: {e}"[:500]})
      traceback.print_exc()
    log(rows[-1])
  # Block-sparse: random tile lists, some empty.
  for b, nq, nk, h, bkv in ((2, 300, 700, 2, 128), (1, 256, 512, 2, 64)):
    key, kq, kk, kvk = jax.random.split(key, 4)
    q = jax.random.normal(kq, (b, nq, h, 128), jnp.bfloat16)
    k = jax.random.normal(kk, (b, nk, h, 128), jnp.bfloat16)
    v = jax.random.normal(kvk, (b, nk, h, 128), jnp.bfloat16)
    tq, tk = -(-nq // 128), -(-nk // bkv)
    rng = np.random.default_rng(tq * 31 + tk)
    idx = np.stack([rng.permutation(tk) for _ in range(b * h * tq)]).reshape(b, h, tq, tk)
    cnt = rng.integers(0, tk + 1, size=(b, h, tq))
    name = f"sparse B{b} Nq{nq} Nk{nk} H{h} block_kv{bkv}"
    try:
      ro, rl = pk.block_sparse_attention_reference(q, k, v, idx, cnt, block_kv=bkv)
      poison_allocator(4 * q.size * 4)
      out, lse = pk.block_sparse_attention(q, k, v, idx, cnt, block_kv=bkv,
                                           implementation="mosaic_gpu", interpret=interpret)
      rows.append(_compare(name, out, lse, ro, rl))
    except Exception as e:  # noqa: BLE001
      rows.append({"case": name, "error": f"{type(e).__name__}: {e}"[:500]})
      traceback.print_exc()
    log(rows[-1])
  return rows


def _compare(name, out, lse, ro, rl) -> dict:
  out = np.asarray(out.astype(jnp.float32), np.float64)
  ro = np.asarray(ro.astype(jnp.float32), np.float64)
  lse, rl = np.asarray(lse, np.float64), np.asarray(rl, np.float64)
  finite = np.isfinite(rl)
  rel = float(np.linalg.norm(out - ro) / max(np.linalg.norm(ro), 1e-30))
  lse_err = float(np.abs(lse[finite] - rl[finite]).max()) if finite.any() else 0.0
  ok = (np.isfinite(out).all() and rel < 1e-2 and lse_err < 1e-2
        and bool((np.isneginf(lse) == ~finite).all()))
  return {"case": name, "rel_err": rel, "lse_max_abs_err": lse_err, "ok": bool(ok)}


# --------------------------------------------------------------------------------------------------


def attention_impls(args):
  """name -> (make(q, k, v) -> zero-arg callable, returns_lse)."""
  impls = {}
  scale = 128 ** -0.5

  def ours(name, tuning=None):
    def make(q, k, v):
      fn = jax.jit(lambda q, k, v: pk.selected_query_attention(
          q, k, v, scale=scale, implementation=name, tuning=tuning))
      return ("jax", fn, (q, k, v))
    return make

  impls["mosaic_gpu"] = (ours("mosaic_gpu"), True)
  for spec in args.tunings:
    tuning = parse_tuning(spec)
    impls[f"mosaic_gpu[{spec}]"] = (ours("mosaic_gpu", tuning), True)
  if not args.skip_chunked:
    impls["chunked"] = (ours("chunked", pk.AttentionTuning(q_chunk=2048, kv_chunk=4096)), True)

  def cudnn(q, k, v):
    fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale,
                                                              implementation="cudnn"))
    return ("jax", fn, (q, k, v))

  impls["cudnn"] = (cudnn, False)
  try:
    import torch  # pylint: disable=import-outside-toplevel
    # pylint: disable-next=import-outside-toplevel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def torch_sdpa(backend):
      def make(q, k, v):
        # PyTorch's own random inputs of the same shapes, in its [B, H, N, D] layout.
        gen = torch.Generator(device="cuda").manual_seed(0)
        tq, tk, tv = (torch.randn(x.shape[0], x.shape[2], x.shape[1], x.shape[3], device="cuda",
                                  dtype=torch.bfloat16, generator=gen) for x in (q, k, v))

        def call():
          with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, scale=scale)
        return ("torch", call, None)
      return make

    impls["torch_flash"] = (torch_sdpa(SDPBackend.FLASH_ATTENTION), False)
    impls["torch_cudnn"] = (torch_sdpa(SDPBackend.CUDNN_ATTENTION), False)
  except ImportError:
    pass
  try:
    import tokamax  # pylint: disable=import-outside-toplevel

    def tok(q, k, v):
      fn = jax.jit(lambda q, k, v: tokamax.dot_product_attention(
          q, k, v, scale=scale, implementation="mosaic"))
      return ("jax", fn, (q, k, v))

    impls["tokamax"] = (tok, False)
  except Exception as e:  # noqa: BLE001 -- optional
    print(f"tokamax unavailable: {type(e).__name__}: {e}"[:200])
  return impls


def bench(args, log) -> dict:
  b, nk, h, d = 1, args.nk, 12, 128
  key = jax.random.key(1)
  kk, kvk, kq = jax.random.split(key, 3)
  k = jax.random.normal(kk, (b, nk, h, d), jnp.bfloat16)
  v = jax.random.normal(kvk, (b, nk, h, d), jnp.bfloat16)
  q_full = jax.random.normal(kq, (b, nk, h, d), jnp.bfloat16)
  impls = attention_impls(args)
  results: dict[str, dict[str, dict]] = {name: {} for name in impls}
  for theta in args.thetas:
    nq = max(1, round(theta * nk))
    q = q_full[:, :nq]
    flop = 4.0 * b * h * nq * nk * d
    for name, (make, has_lse) in impls.items():
      if name.startswith("mosaic_gpu[") and theta != args.thetas[0] and name not in args.sweep:
        continue
      if name == "chunked" and theta not in (1.0, 0.4):
        continue
      try:
        kind, fn, fargs = make(q, k, v)
        if kind == "jax":
          ms = time_jax(fn, fargs, iters=args.iters, repeats=args.repeats)
        else:
          ms = time_torch(fn, iters=args.iters, repeats=args.repeats)
        row = {"nq": nq, "ms": ms, "tflops": flop / ms / 1e9, "returns_lse": has_lse}
      except Exception as e:  # noqa: BLE001 -- one failing implementation must not end the run
        row = {"nq": nq, "error": f"{type(e).__name__}: {e}"[:400]}
        traceback.print_exc()
      results[name][str(theta)] = row
      log({"theta": theta, "impl": name, **row})
  return results


def parity(args, log) -> dict:
  """theta = 1 at Nq = Nk = 32,768 (multiples of every tile), beside jax's Mosaic GPU example."""
  b, n, h, d = 1, 32768, 12, 128
  scale = d ** -0.5
  flop = 4.0 * b * h * n * n * d
  kq, kk, kvk = jax.random.split(jax.random.key(3), 3)
  rows = {}

  def run(name, fn, dtype):
    q, k, v = (jax.random.normal(key, (b, n, h, d), jnp.float32).astype(dtype)
               for key in (kq, kk, kvk))
    try:
      ms = time_jax(jax.jit(fn), (q, k, v), iters=args.iters, repeats=args.repeats)
      rows[name] = {"ms": ms, "tflops": flop / ms / 1e9}
    except Exception as e:  # noqa: BLE001
      rows[name] = {"error": f"{type(e).__name__}: {e}"[:400]}
      traceback.print_exc()
    log({"parity": name, **rows[name]})

  for dtype in (jnp.bfloat16, jnp.float16):
    run(f"mosaic_gpu {jnp.dtype(dtype).name}",
        lambda q, k, v: pk.selected_query_attention(q, k, v, scale=scale,
                                                    implementation="mosaic_gpu"), dtype)
  flipped = not pk.TUNING_PRESETS["default"].schedule_barrier
  run(f"mosaic_gpu bfloat16 schedule_barrier={flipped}",
      lambda q, k, v: pk.selected_query_attention(
          q, k, v, scale=scale, implementation="mosaic_gpu",
          tuning=pk.AttentionTuning(schedule_barrier=flipped)), jnp.bfloat16)
  run("cudnn bfloat16", lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, scale=scale, implementation="cudnn"), jnp.bfloat16)
  try:
    # pylint: disable-next=import-outside-toplevel
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    config = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2)
    # The example applies no score scale; timing it unscaled changes no FLOPs.
    run("jax example attention_mgpu float16 (save_residuals)",
        lambda q, k, v: attention_mgpu.attention(q, k, v, config, save_residuals=True),
        jnp.float16)
  except ImportError as e:
    rows["jax example"] = {"error": str(e)}
  return rows


def gather_scatter(args, log) -> dict:
  b, n, c = 1, args.nk, 1536
  s = round(0.4 * n)
  key = jax.random.key(2)
  kx, ki, ky = jax.random.split(key, 3)
  x = jax.random.normal(kx, (b, n, c), jnp.bfloat16)  # [B, N, C]
  idx = jnp.sort(jax.random.permutation(ki, n)[:s])[None, :].astype(jnp.int32)  # [B, S]
  y = jax.random.normal(ky, (b, s, c), jnp.bfloat16)  # [B, S, C]
  gather = jax.jit(lambda x, idx: jnp.take_along_axis(x, idx[..., None], axis=1))
  scatter = jax.jit(lambda x, idx, y: x.at[jnp.arange(b)[:, None], idx].set(y))
  g_ms = time_jax(gather, (x, idx), iters=args.iters * 4, repeats=args.repeats)
  s_ms = time_jax(scatter, (x, idx, y), iters=args.iters * 4, repeats=args.repeats)
  # In place, as inside the jitted denoising step: the full array is donated, and XLA is told the
  # indices are sorted and unique.
  scatter_inplace = jax.jit(
      lambda x, idx, y: x.at[jnp.arange(b)[:, None], idx].set(
          y, indices_are_sorted=True, unique_indices=True), donate_argnums=0)
  x2 = x + jnp.bfloat16(0)
  for _ in range(2):
    x2 = scatter_inplace(x2, idx, y)
  jax.block_until_ready(x2)
  per_call = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    for _ in range(args.iters * 4):
      x2 = scatter_inplace(x2, idx, y)
    jax.block_until_ready(x2)
    per_call.append((time.perf_counter() - start) * 1e3 / (args.iters * 4))
  si_ms = statistics.median(per_call)
  moved_g = 2 * b * s * c * 2  # read + write the selected rows
  moved_s = moved_g + 2 * b * n * c * 2  # copy of the full array (not donated) + the rows
  out = {"N": n, "C": c, "S": s, "gather_ms": g_ms, "scatter_ms": s_ms,
         "scatter_inplace_ms": si_ms, "gather_gbps": moved_g / g_ms / 1e6,
         "scatter_gbps": moved_s / s_ms / 1e6, "scatter_inplace_gbps": moved_g / si_ms / 1e6}
  log(out)
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--thetas", type=float, nargs="+", default=[1.0, 0.7, 0.5, 0.4, 0.2])
  parser.add_argument("--nk", type=int, default=32760)
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--check", action="store_true", help="correctness pass first")
  parser.add_argument("--check-only", action="store_true")
  parser.add_argument("--interpret", action="store_true",
                      help="run the check in GPU interpret mode (CPU; slow at the larger cases)")
  parser.add_argument("--skip-chunked", action="store_true")
  parser.add_argument("--parity", action="store_true",
                      help="also time theta = 1 at Nk = 32,768 beside jax's Mosaic GPU example")
  parser.add_argument("--tunings", nargs="*", default=[],
                      help="extra Mosaic GPU tunings 'block_q,block_kv,stages[,schedule_barrier "
                      "0/1[,compute_registers]]'; first theta only")
  parser.add_argument("--sweep", nargs="*", default=[],
                      help="names of extra tunings ('mosaic_gpu[spec]') to time at every theta")
  parser.add_argument("--out", type=Path, default=_RESULTS)
  args = parser.parse_args(argv)

  def log(row):
    print(json.dumps(row), flush=True)

  report = {
      "device": jax.devices()[0].device_kind,
      "jax": jax.__version__,
      "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": " ".join([sys.executable, *sys.argv]),
      "shape": {"B": 1, "Nk": args.nk, "H": 12, "D": 128, "dtype": "bfloat16"},
      "timing": f"median of {args.repeats} x ({args.iters} back-to-back calls)",
      "default_tuning": dataclasses.asdict(pk.TUNING_PRESETS["default"]),
  }
  try:
    import jaxlib  # pylint: disable=import-outside-toplevel
    report["jaxlib"] = jaxlib.__version__
  except ImportError:
    pass
  if args.check or args.check_only:
    report["check"] = check(log, interpret=args.interpret)
  if not args.check_only:
    if args.parity:
      report["parity_32768"] = parity(args, log)
    report["attention"] = bench(args, log)
    report["gather_scatter"] = gather_scatter(args, log)
  args.out.mkdir(parents=True, exist_ok=True)
  path = args.out / f"attention-{device_slug()}.json"
  path.write_text(json.dumps(report, indent=2) + "\n")
  print(f"wrote {path}")
  _print_table(report)
  return 0


def _print_table(report) -> None:
  for row in report.get("check", []):
    status = "ok" if row.get("ok") else "FAIL"
    print(f"check {status:4} {row['case']}: {row.get('error') or row.get('rel_err')}"
          f" {row.get('lse_max_abs_err', '')}")
  for name, row in report.get("parity_32768", {}).items():
    print(f"Nq=Nk=32768 {name:52} " + (f"{row['ms']:8.3f} ms {row['tflops']:6.1f} TFLOP/s"
                                         if "ms" in row else row["error"][:60]))
  att = report.get("attention")
  if att:
    dense = {name: rows.get("1.0", {}).get("ms") for name, rows in att.items()}
    print(f"{'impl':24} {'theta':>5} {'Nq':>6} {'ms':>8} {'TFLOP/s':>8} {'t/(theta*t1)':>12}")
    for name, rows in att.items():
      for theta, row in rows.items():
        if "error" in row:
          print(f"{name:24} {theta:>5} {row['nq']:>6} error: {row['error'][:60]}")
          continue
        ratio = (row["ms"] / (float(theta) * dense[name])) if dense.get(name) else float("nan")
        print(f"{name:24} {theta:>5} {row['nq']:>6} {row['ms']:8.3f} {row['tflops']:8.1f} "
              f"{ratio:12.3f}")
  gs = report.get("gather_scatter")
  if gs:
    print(f"gather {gs['gather_ms']:.3f} ms ({gs['gather_gbps']:.0f} GB/s), scatter "
          f"{gs['scatter_ms']:.3f} ms ({gs['scatter_gbps']:.0f} GB/s), in-place scatter "
          f"{gs['scatter_inplace_ms']:.3f} ms ({gs['scatter_inplace_gbps']:.0f} GB/s) at "
          f"N={gs['N']} C={gs['C']} S={gs['S']}")


if __name__ == "__main__":
  sys.exit(main())
