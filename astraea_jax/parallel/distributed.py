"""Multi-host start of sharded ASTRAEA (arXiv 2506.05096) inference through `jax.distributed`.

Every host runs the same command; `jax.distributed.initialize()` connects the processes, after which
`jax.devices()` lists the devices of all hosts and the mesh of `astraea_jax.parallel.mesh` spans
them. A single-process run must not call it (it would wait for a coordinator that never comes), so
`maybe_initialize` calls it only when the environment describes one process of several:

- explicit: `JAX_COORDINATOR_ADDRESS=host:port`, `JAX_NUM_PROCESSES` > 1 and `JAX_PROCESS_ID`
  (`JAX_LOCAL_DEVICE_IDS` optional, read by JAX itself);
- SLURM with more than one task (`SLURM_NTASKS` > 1 inside a job, e.g. `srun`);
- Open MPI with more than one rank (`OMPI_COMM_WORLD_SIZE` > 1, e.g. `mpirun`).

For SLURM and Open MPI, JAX's own cluster detection then finds the coordinator, the process count
and the process id.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import numpy as np

__all__ = ["PeerProcessError", "check_together", "is_multi_process", "maybe_initialize"]

_initialized = False


class PeerProcessError(RuntimeError):
  """Another process of a multi-process run failed a check (`check_together`)."""


def _count(env: Mapping[str, str], name: str) -> int:
  try:
    return int(env.get(name, "1"))
  except ValueError:
    return 1


def is_multi_process(environ: Mapping[str, str] | None = None) -> bool:
  """Whether the environment describes one process of a multi-process launch."""
  env = os.environ if environ is None else environ
  if env.get("JAX_COORDINATOR_ADDRESS") and _count(env, "JAX_NUM_PROCESSES") > 1:
    return True
  if "SLURM_JOB_ID" in env and _count(env, "SLURM_NTASKS") > 1:
    return True
  return _count(env, "OMPI_COMM_WORLD_SIZE") > 1


def maybe_initialize(environ: Mapping[str, str] | None = None) -> bool:
  """Calls `jax.distributed.initialize()` once if multi-process; returns whether it was called.

  Call it before anything else touches the devices (`jax.devices()` and any array creation).
  """
  global _initialized  # pylint: disable=global-statement
  env = os.environ if environ is None else environ
  if not _initialized and is_multi_process(env):
    kwargs = {}
    if env.get("JAX_COORDINATOR_ADDRESS"):
      kwargs = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                    num_processes=_count(env, "JAX_NUM_PROCESSES"),
                    process_id=int(env.get("JAX_PROCESS_ID", "0")))
    if jax.config.jax_cpu_collectives_implementation is None:
      # CPU processes need a cross-process collectives backend (the default of recent JAX).
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    _initialized = True
  return _initialized


def check_together(check) -> None:
  """Runs `check()` (which raises on bad input) so that all processes stop together.

  With several processes, a check that fails on some of them only (an output directory that one
  host lacks, a file only process 0 writes) would leave the others waiting in the next collective
  for ever. Here every process learns whether any failed: the failing ones raise their own error,
  the others a `PeerProcessError` naming the failed processes. One process: `check()` as it is.
  """
  if jax.process_count() == 1:
    check()
    return
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  error = None
  try:
    check()
  except Exception as e:  # pylint: disable=broad-except
    error = e
  failed = np.asarray(multihost_utils.process_allgather(np.int32(error is not None))).ravel()
  if error is not None:
    raise error
  if failed.any():
    raise PeerProcessError(f"process(es) {np.flatnonzero(failed).tolist()} failed a check "
                           "(their error says which); stopping with them")
