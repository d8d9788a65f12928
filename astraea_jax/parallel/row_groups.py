"""Batch rows split over devices: classifier-free guidance and several prompts on several GPUs.

Every ASTRAEA step model selects, caches and computes each batch row on its own (the top-k is per
row, the token cache has a row axis), and so does the dense model. The rows of a step -- the cond
and uncond halves that classifier-free guidance stacks, and one row per prompt -- can therefore run
on different devices with no communication inside the step: `RowGroupStepModel` keeps one step
model per group of rows, each with its own copy of the weights, text and token cache on its own
device, dispatches every group's step before waiting for any (jax runs them concurrently), and
gathers the outputs on the first device for the sampler. This is the CFG-parallel scheme of xDiT
(arXiv 2411.01738) without a mesh; it is exact: each device runs the same program on fewer rows.

Wan's pipeline shards over a mesh instead (`parallel.sharded`: a CFG axis and a token axis); the
OpenSora and HunyuanVideo pipelines split rows this way, so their speedup is bounded by the rows
of a request (2 per prompt with guidance; HunyuanVideo embeds its guidance: 1 per prompt).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["RowGroupStepModel", "fitting_row_groups", "split_rows", "to_device"]


def fitting_row_groups(num_devices: int | None, rows: int, visible: int) -> int:
  """How many devices (= row groups) a request of `rows` batch rows runs on.

  `num_devices` None: the most of the `visible` devices that split the rows evenly; else exactly
  that many (ValueError where they do not split them or are not visible).
  """
  if num_devices is None:
    return max(d for d in range(1, min(visible, rows) + 1) if rows % d == 0)
  if not 1 <= num_devices <= visible:
    raise ValueError(f"{num_devices=} must lie in [1, {visible}] (the visible devices)")
  if rows % num_devices:
    fits = max(d for d in range(1, min(num_devices, rows) + 1) if rows % d == 0)
    raise ValueError(f"{num_devices} devices do not split the request's {rows} batch rows evenly "
                     f"(rows run whole on one device); try --devices {fits}")
  return num_devices


def to_device(tree: Any, device: jax.Device) -> Any:
  """`tree` with every array committed to `device` (None leaves stay None)."""
  return jax.tree.map(lambda a: jax.device_put(a, device), tree)


class RowGroupStepModel:
  """A `denoise` step model whose batch rows run in equal groups, one group per device.

  Args:
    make: `make(rows, device) -> step_model` builds the step model of the batch rows
      `rows` (a slice of the loop's rows) with everything it holds on `device`.
    rows: the loop's batch rows B' (with guidance, twice the prompts).
    devices: one device per group; must divide `rows`.

  The carry is a tuple of the groups' carries. `records`, `stats`, `num_selected` and
  `num_layers` are the first group's (every group takes the same decisions).
  """

  def __init__(self, make: Callable[[slice, jax.Device], Any], rows: int,
               devices: Sequence[jax.Device]):
    if not devices or rows % len(devices):
      raise ValueError(f"{len(devices)} devices do not split {rows} rows evenly")
    per = rows // len(devices)
    self.devices = tuple(devices)
    self.rows = rows
    self.groups = tuple((slice(g * per, (g + 1) * per), make(slice(g * per, (g + 1) * per), d))
                        for g, d in enumerate(self.devices))
    first = self.groups[0][1]
    for name in ("records", "stats", "num_selected", "num_layers"):
      if hasattr(first, name):
        setattr(self, name, getattr(first, name))

  def __call__(self, latents: jax.Array, timestep: jax.Array, carry: tuple | None,
               step_index: int) -> tuple[jax.Array, tuple]:
    if latents.shape[0] != self.rows:
      raise ValueError(f"latents batch {latents.shape[0]} does not match the {self.rows} rows "
                       "this step model was built for")
    carry = (None,) * len(self.groups) if carry is None else carry
    timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (self.rows,))
    outs, carries = [], []
    # Dispatch every group before reading any result: the devices run concurrently.
    for (rows, model), device, c in zip(self.groups, self.devices, carry):
      out, c = model(jax.device_put(latents[rows], device),
                     jax.device_put(timestep[rows], device), c, step_index)
      outs.append(out)
      carries.append(c)
    home = self.devices[0]
    return jnp.concatenate([jax.device_put(o, home) for o in outs], axis=0), tuple(carries)


def split_rows(model: nnx.Module, make: Callable[..., Any], row_args: Sequence[jax.Array | None],
               groups: int) -> RowGroupStepModel:
  """`make(model, *row_args)`'s step model with its batch rows in `groups` groups on this host's
  first devices: group g gets a copy of `model` and rows g of every array of `row_args` (each
  `[B', ...]`, B' the loop's rows; None stays None) on device g."""
  graphdef, state = nnx.split(model)
  rows = next(a.shape[0] for a in row_args if a is not None)

  def build(r: slice, device: jax.Device):
    return make(nnx.merge(graphdef, to_device(state, device)),
                *(None if a is None else to_device(a[r], device) for a in row_args))

  return RowGroupStepModel(build, rows, jax.local_devices()[:groups])
