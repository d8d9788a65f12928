"""XLA flags the package sets by default on import, before JAX starts its backends.

`--xla_gpu_enable_triton_gemm=false`: with XLA's Triton GEMM path off, the GEMM rewriter fuses the
FFN's bias and GELU (tanh) into cuBLAS's epilogue (`..._gelubias_...` kernels) instead of running them
as a separate pass over the `[N, 8960]` hidden activations; the Wan2.1-1.3B dense forward at 480p x 81
frames took 478.2 ms instead of 489.6 ms on an H200 (benchmarks/NOTES-dense_forward.md).

A flag the user already names in `XLA_FLAGS` is left as the user set it, and
`ASTRAEA_DEFAULT_XLA_FLAGS=0` turns the defaults off. Flags are read when JAX initialises a backend,
so they only take effect when the package is imported before anything touches a device.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

__all__ = ["DEFAULT_XLA_FLAGS", "apply_default_xla_flags"]

DEFAULT_XLA_FLAGS: tuple[str, ...] = ("--xla_gpu_enable_triton_gemm=false",)


def _flag_name(flag: str) -> str:
  return flag.split("=", 1)[0].lstrip("-")


def apply_default_xla_flags(environ: MutableMapping[str, str] | None = None) -> str:
  """Appends each of `DEFAULT_XLA_FLAGS` the user's `XLA_FLAGS` does not name; returns the result."""
  env = os.environ if environ is None else environ
  current = env.get("XLA_FLAGS", "")
  if env.get("ASTRAEA_DEFAULT_XLA_FLAGS", "1").strip().lower() in ("0", "false", "no", "off"):
    return current
  named = {_flag_name(f) for f in current.split()}
  added = [f for f in DEFAULT_XLA_FLAGS if _flag_name(f) not in named]
  if added:
    env["XLA_FLAGS"] = " ".join([current, *added]).strip()
  return env.get("XLA_FLAGS", "")
