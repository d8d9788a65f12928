"""Time and peak memory of HunyuanVideo's VAE decode at full size: tiled, frame-wise, whole clip.

`HunyuanPipeline` decodes as diffusers' `vae.decode` does after `enable_tiling()`: chunks of 5 latent
frames every 3, each in 32x32-latent tiles every 24 (`astraea_jax/models/hunyuan_vae_tiling.py`).
This script decodes random latents with the released VAE configuration (random fp32 weights, as
the pipeline loads it) in one mode per process, since jax cannot reset the peak-memory counter:

    PYTHONPATH=.:benchmarks python3 benchmarks/vae_decode.py --mode tiled --size 1280x720 --frames 129
    PYTHONPATH=.:benchmarks python3 benchmarks/vae_decode.py --mode framewise --size 960x544 --frames 129
    PYTHONPATH=.:benchmarks python3 benchmarks/vae_decode.py --mode whole --size 960x544 --frames 129

`tiled`: frame-wise chunks and 256 px tiles (the pipeline's default); `framewise`: chunks only
(diffusers' default decode); `whole`: the whole clip at once. The first call includes compiling
every tile shape; the second is timed alone. An out-of-memory error is recorded, not raised.
Prints one line and appends a JSON record to `--out` (default results/vae_decode-<device>.jsonl).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from astraea_jax.models import hunyuan_vae as hv
from astraea_jax.models.hunyuan_vae_tiling import num_tiles
from benchutil import append_record, init_on_device, run_fields  # (script dir)

MODES = {
    "tiled": hv.VAETiling(spatial=True),
    "framewise": hv.VAETiling(),
    "whole": hv.VAETiling(framewise=False),
}


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--mode", choices=sorted(MODES), required=True)
  p.add_argument("--size", default="1280x720", help="video WxH")
  p.add_argument("--frames", type=int, default=129)
  p.add_argument("--out", type=Path, default=None)
  args = p.parse_args(argv)

  config = hv.PRESETS["hunyuan-video"]
  w, h = (int(v) for v in args.size.lower().split("x"))
  s, ts = config.spatial_compression_ratio, config.temporal_compression_ratio
  shape = (1, config.latent_channels, (args.frames - 1) // ts + 1, h // s, w // s)
  graphdef, state = init_on_device(lambda: hv.HunyuanVAEDecoder(config, rngs=nnx.Rngs(0)))
  vae = nnx.merge(graphdef, state)
  z = jnp.asarray(np.random.default_rng(0).standard_normal(shape, np.float32))
  tiling = MODES[args.mode]
  tiles = num_tiles(shape, tiling, s, ts)

  record = {"benchmark": "vae_decode", "model": "hunyuan-video VAE (random fp32 weights)",
            "mode": args.mode, "tiling": tiling.__dict__, "video": f"{w}x{h}x{args.frames}",
            "latents": list(shape), "decoder_calls": tiles,
            **run_fields(), "env": {k: v for k, v in os.environ.items() if k.startswith(("JAX_", "XLA_"))}}
  try:
    start = time.perf_counter()
    video = jax.block_until_ready(hv.decode_tiled(vae, z, tiling, progress=True))
    record["first_call_s"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    video = jax.block_until_ready(hv.decode_tiled(vae, z, tiling))
    record["decode_s"] = round(time.perf_counter() - start, 2)
    record["output"] = list(video.shape)
    record["finite"] = bool(jnp.isfinite(video).all())
  except Exception as e:  # pylint: disable=broad-except
    if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
      raise
    record["error"] = str(e).strip().splitlines()[0][:300]
  stats = jax.devices()[0].memory_stats() or {}
  record["peak_gib"] = round(stats.get("peak_bytes_in_use", 0) / 2**30, 2)
  append_record(record, args.out, "vae_decode")
  print(f"{args.mode:9s} {record['video']:14s} calls {tiles:4d}  "
        + (f"decode {record['decode_s']:.2f} s (first {record['first_call_s']:.1f} s)"
           if "decode_s" in record else f"FAILED: {record['error'][:80]}")
        + f"  peak {record['peak_gib']:.2f} GiB")
  return 0


if __name__ == "__main__":
  sys.exit(main())
