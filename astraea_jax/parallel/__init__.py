"""Several devices and hosts: the device mesh, sequence-parallel attention, the sharded dense and
ASTRAEA (arXiv 2506.05096) forwards, and the multi-host start through `jax.distributed`."""

from astraea_jax.parallel.distributed import check_together, is_multi_process, maybe_initialize
from astraea_jax.parallel.mesh import MeshConfig, make_mesh, sharding, spec
from astraea_jax.parallel.sequence import sequence_parallel_attention
from astraea_jax.parallel.sharded import (
    ShardedAstraeaStepModel,
    ShardedDenseStepModel,
    default_num_devices,
    jit_sharded_astraea_step,
    jit_sharded_dense,
    mesh_for_request,
    place_inputs,
    replicate,
    round_num_selected,
    sharded_astraea_forward,
    sharded_dense_forward,
)

__all__ = [
    "MeshConfig",
    "ShardedAstraeaStepModel",
    "ShardedDenseStepModel",
    "check_together",
    "default_num_devices",
    "is_multi_process",
    "jit_sharded_astraea_step",
    "jit_sharded_dense",
    "make_mesh",
    "maybe_initialize",
    "mesh_for_request",
    "place_inputs",
    "replicate",
    "round_num_selected",
    "sequence_parallel_attention",
    "sharded_astraea_forward",
    "sharded_dense_forward",
    "sharding",
    "spec",
]
