"""Text to video end to end on the GPU: text encoding, denoising and decoding timed separately.

The full-size Wan2.1-T2V-1.3B pipeline with random weights built on the device (umT5-xxl encoder in
bf16, 1.3B transformer in bf16, Wan VAE in fp32, as `checkpoints_convert wan_t2v` loads a release),
480p x 81 frames, 50 UniPC steps with classifier-free guidance, dense and with ASTRAEA budgets 0.5
and 0.4 (uniform; the first step dense). Everything goes through `WanPipeline.generate`, the code
path of `python -m astraea_jax.generate`. A two-step run of the same setting first compiles the encoder, the
decoder and every forward of a setting before its timed run; denoising times are also reported
without any XLA compile time that still fell inside a timed run.

  PYTHONPATH=. python3 benchmarks/e2e.py                 # H100/H200: about 3 minutes
  PYTHONPATH=. python3 benchmarks/e2e.py --quick         # tiny random models, any backend

Writes benchmarks/results/e2e-<device>.json (device, versions, date, command, numbers); prints a
table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from astraea_jax.acceleration import BudgetSchedule
from astraea_jax.models.tokenizer import UMT5Tokenizer
from astraea_jax.models.umt5 import UMT5Config, UMT5Encoder
from astraea_jax.models.wan import WanConfig, WanTransformer3DModel
from astraea_jax.models.wan_vae import AutoencoderKLWan, WanVAEConfig
from astraea_jax.pipeline import GenerationConfig
from astraea_jax.pipelines import assemble

sys.path.insert(0, str(Path(__file__).parent))
from benchutil import RESULTS, device_slug, init_on_device  # noqa: E402  pylint: disable=wrong-import-position

# A tokenizer on disk (the parity goldens'): token ids do not change the encoder's cost.
TOKENIZER = Path(__file__).resolve().parent.parent / "tests" / "goldens" / "umt5" / "tokenizer"
PROMPT = "a corgi running on a beach at sunset, cinematic, 4k"


def _on_device(make):
  return nnx.merge(*init_on_device(make))


def build(quick: bool):
  if quick:
    wan_cfg = WanConfig.preset("tiny", text_dim=40)
    text_cfg, vae_cfg = UMT5Config.preset("tiny"), WanVAEConfig.preset("tiny")
    request = GenerationConfig(height=32, width=48, frames=9, steps=6, guidance=5.0)
  else:
    wan_cfg = WanConfig.preset("wan2.1-t2v-1.3b")
    text_cfg, vae_cfg = UMT5Config.preset("umt5-xxl"), WanVAEConfig.preset("wan2.1")
    request = GenerationConfig()  # Wan's own: 832x480, 81 frames, 50 steps, guidance 5
  text_dtype = jnp.float32 if quick else jnp.bfloat16
  transformer = _on_device(lambda: WanTransformer3DModel(wan_cfg, rngs=nnx.Rngs(0)))
  encoder = _on_device(lambda: UMT5Encoder(text_cfg, dtype=text_dtype, param_dtype=text_dtype,
                                           rngs=nnx.Rngs(1)))
  vae = _on_device(lambda: AutoencoderKLWan(vae_cfg, rngs=nnx.Rngs(2)))
  pipe = assemble("wan2.1-t2v-1.3b (random)" if not quick else "tiny (random)", transformer, encoder,
                  vae, UMT5Tokenizer(TOKENIZER))
  return pipe, request


def peak_gib() -> float | None:
  peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
  return None if peak is None else peak / 2**30


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="tiny random models (CPU smoke run)")
  p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.4])
  p.add_argument("--steps", type=int, default=None, help="default: 50 (quick: 6)")
  p.add_argument("--out", type=Path, default=None, help="default: results/e2e-<device>.json")
  args = p.parse_args(argv)

  pipe, request = build(args.quick)
  if args.steps:
    request = dataclasses.replace(request, steps=args.steps)
  rows = []
  dense_compute = None
  warmup_s = {}
  for budget in [None, *args.budgets]:
    # Two steps compile the encoder, the decoder and this budget's forwards (dense first step, k).
    start = time.perf_counter()
    pipe.generate([PROMPT], dataclasses.replace(request, steps=2), progress=False,
                  schedule=None if budget is None else BudgetSchedule.uniform(2, budget))
    warmup_s["dense" if budget is None else str(budget)] = time.perf_counter() - start
    schedule = None if budget is None else BudgetSchedule.uniform(request.steps, budget)
    result = pipe.generate([PROMPT], request, schedule=schedule, progress=False)
    stats = result.denoise_stats
    compute = sum(max(s - c, 0.0) for s, c in zip(stats.step_seconds, stats.compile_seconds))
    if budget is None:
      dense_compute = compute
    rows.append({
        "budget": "dense" if budget is None else budget,
        "text_encode_s": result.encode_seconds,
        "denoise_s": stats.total_seconds,
        "denoise_compile_s": sum(stats.compile_seconds),
        "denoise_without_compile_s": compute,
        "steady_step_ms": stats.steady_step_seconds * 1e3,
        "decode_s": result.decode_seconds,
        "total_s": result.total_seconds,
        "denoise_speedup_vs_dense": dense_compute / compute if compute else None,
        "peak_gib_so_far": peak_gib(),
    })

  record = {
      "benchmark": "e2e",
      "device": jax.devices()[0].device_kind,
      "backend": jax.default_backend(),
      "jax": jax.__version__,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": " ".join(["e2e.py"] + (argv if argv is not None else sys.argv[1:])),
      "model": pipe.name,
      "request": {k: v for k, v in dataclasses.asdict(request).items() if k != "negative_prompt"},
      "tokens": pipe.num_tokens(request),
      "warmup_s": warmup_s,
      "runs": rows,
      "peak_gib": peak_gib(),
  }
  out = args.out or RESULTS / f"e2e-{device_slug()}{'-quick' if args.quick else ''}.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(record, indent=2) + "\n")
  print(f"wrote {out}")
  print(f"{'budget':>7} {'text s':>7} {'denoise s':>10} {'(no compile)':>12} {'ms/step':>8} "
        f"{'decode s':>9} {'total s':>8} {'speedup':>8}")
  for r in rows:
    print(f"{r['budget']!s:>7} {r['text_encode_s']:7.2f} {r['denoise_s']:10.2f} "
          f"{r['denoise_without_compile_s']:12.2f} {r['steady_step_ms']:8.1f} {r['decode_s']:9.2f} "
          f"{r['total_s']:8.2f} {r['denoise_speedup_vs_dense'] or 0:7.2f}x")
  print(f"peak GPU memory {record['peak_gib']} GiB" if record["peak_gib"] else "")
  return 0


if __name__ == "__main__":
  sys.exit(main())
