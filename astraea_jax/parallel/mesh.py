"""Device mesh and sharding rules for multi-device ASTRAEA inference.

ASTRAEA (arXiv 2506.05096) does not say how it parallelizes. Ours: one mesh with a data axis
"data" (independent prompts or search candidates), a classifier-free-guidance axis "cfg" (the cond /
uncond halves of B) and a sequence axis "seq" (video tokens N); attention re-shards from tokens to
heads with an all-to-all as in DeepSpeed-Ulysses (arXiv 2309.14509), see `parallel.sequence`.

Every array of the sharded forward is laid out by naming its dimensions with the logical names of
`RULES` (`spec("layers", "batch", "tokens", "channels")` for the token cache `[L, B, N, C]`), so the
mapping from logical axes to mesh axes lives in this one table.
"""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

AXES = ("data", "cfg", "seq")

# Logical axis name -> mesh axes (None: replicated). B holds [cond rows; uncond rows], so "cfg" is
# the major part of its sharding: the first half of B goes to cfg index 0, the second to index 1.
RULES: dict[str, str | tuple[str, ...] | None] = {
  "batch": ("cfg", "data"),  # B
  "tokens": "seq",  # N, and S (selected tokens are taken per shard)
  "layers": None,  # L
  "channels": None,  # C, and the sketch width of the token cache
  "heads": None,  # H
  "head_dim": None,  # D, and D/2 of the RoPE tables
  "text": None,  # M: every device holds all text tokens of its rows
  "modulation": None,  # the 6 rows of the block modulation
  "latent": None,  # C_in, T, Y, X of the latents
}


def spec(*logical: str | None) -> P:
  """PartitionSpec of an array whose dimensions have these logical names (None: replicated)."""
  for name in logical:
    if name is not None and name not in RULES:
      raise ValueError(f"logical axis {name=} is not one of {sorted(RULES)}")
  return P(*(None if name is None else RULES[name] for name in logical))


def sharding(mesh: jax.sharding.Mesh, *logical: str | None) -> NamedSharding:
  """`NamedSharding(mesh, spec(*logical))`; no names means fully replicated."""
  return NamedSharding(mesh, spec(*logical))


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """How many devices and how they split between the data, CFG and sequence axes.

  Attributes:
    num_devices: devices used (the first ones of `jax.devices()`); None = all visible.
    guidance: whether the batch holds [cond; uncond] rows; then cfg = 2 if the devices left after
      the data axis are even (the halves need no communication until the guidance combine).
    data: size of the data axis (prompts or candidates); must divide the device count.
  """
  num_devices: int | None = None
  guidance: bool = True
  data: int = 1

  def __post_init__(self):
    if self.num_devices is not None and self.num_devices < 1:
      raise ValueError(f"{self.num_devices=} must be >= 1")
    if self.data < 1:
      raise ValueError(f"{self.data=} must be >= 1")
    if self.num_devices is not None and self.num_devices % self.data:
      raise ValueError(f"{self.data=} must divide {self.num_devices=}")

  def axis_sizes(self, num_devices: int) -> tuple[int, int, int]:
    """(data, cfg, seq) for `num_devices` devices."""
    if num_devices % self.data:
      raise ValueError(f"{self.data=} must divide {num_devices=}")
    rest = num_devices // self.data
    cfg = 2 if self.guidance and rest % 2 == 0 else 1
    return self.data, cfg, rest // cfg


def make_mesh(config: MeshConfig = MeshConfig()) -> jax.sharding.Mesh:
  """One mesh with axes ("data", "cfg", "seq") over the first `config.num_devices` devices."""
  devices = jax.devices()
  n = len(devices) if config.num_devices is None else config.num_devices
  if n > len(devices):
    raise ValueError(f"{n=} devices asked for, {len(devices)} visible")
  # Auto axes: the code outside shard_map (patch embedding, head) is partitioned by the compiler.
  return jax.make_mesh(config.axis_sizes(n), AXES, axis_types=(AxisType.Auto,) * len(AXES),
                       devices=devices[:n])


def seq_size(mesh: jax.sharding.Mesh) -> int:
  """P, the number of token shards."""
  return mesh.shape["seq"]


def batch_shards(mesh: jax.sharding.Mesh) -> int:
  """How many parts the batch B is split into (cfg x data)."""
  return mesh.shape["cfg"] * mesh.shape["data"]


def fitting_num_devices(max_devices: int, num_tokens: int, batch: int,
                        config: MeshConfig = MeshConfig()) -> int:
  """The largest device count <= `max_devices` whose mesh splits N tokens and B rows evenly.

  Token shards must be equal (per-shard top-k computes the same count on every device), so the seq
  axis must divide N; an uneven split would need padded, masked tokens.
  """
  for n in range(max_devices, 0, -1):
    if n % config.data:
      continue
    data, cfg, seq = config.axis_sizes(n)
    if num_tokens % seq == 0 and batch % (data * cfg) == 0:
      return n
  raise ValueError(f"no device count <= {max_devices} splits {num_tokens=} and {batch=} with "
                   f"{config=}")
