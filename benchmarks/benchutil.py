"""Pieces every GPU benchmark shares: the results folder, the device's name, random Wan weights on device.

Benchmarks run as scripts (`PYTHONPATH=. python3 benchmarks/NAME.py`), so this sits beside them.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
from flax import nnx

from astraea_jax.models.wan import WanConfig, WanTransformer3DModel

RESULTS = Path(__file__).resolve().parent / "results"


def device_slug() -> str:
  """The first device's kind as a file-name part, e.g. `nvidia-h100-80gb-hbm3`."""
  return re.sub(r"[^a-z0-9]+", "-", jax.devices()[0].device_kind.lower()).strip("-")


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


def init_on_device(make):
  """`(graphdef, state)` of the module `make()` builds, its random parameters initialised on the
  device (no host copy of the weights)."""
  graphdef, _ = nnx.split(nnx.eval_shape(make))
  return graphdef, jax.jit(lambda: nnx.split(make())[1])()


def build_state(config: WanConfig):
  """graphdef and random parameters of a Wan transformer, initialised on the device."""
  return init_on_device(lambda: WanTransformer3DModel(config, rngs=nnx.Rngs(0)))
