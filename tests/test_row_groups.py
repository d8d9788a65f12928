"""`parallel.row_groups`: batch rows split over devices (OpenSora's and HunyuanVideo's several GPUs)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from astraea_jax.parallel.row_groups import RowGroupStepModel, fitting_row_groups


def test_fitting_row_groups():
  assert fitting_row_groups(None, 2, 8) == 2  # CFG halves of one prompt
  assert fitting_row_groups(None, 6, 4) == 3  # the most devices that split the rows evenly
  assert fitting_row_groups(None, 1, 8) == 1
  assert fitting_row_groups(None, 4, 1) == 1
  assert fitting_row_groups(4, 8, 8) == 4
  with pytest.raises(ValueError, match="3 devices do not split the request's 4 batch rows evenly "
                     r".*try --devices 2"):
    fitting_row_groups(3, 4, 8)
  with pytest.raises(ValueError, match=r"must lie in \[1, 2\]"):
    fitting_row_groups(4, 8, 2)


def test_groups_run_on_their_devices_and_keep_their_carries():
  calls = []

  def make(rows, device):
    def step(latents, timestep, carry, step_index):
      calls.append((rows, latents.devices(), timestep.devices(), step_index))
      count = 0 if carry is None else carry
      return latents * (rows.start + 1) + timestep[:, None], count + 1
    return step

  devices = jax.devices()[:2]
  model = RowGroupStepModel(make, 4, devices)
  latents = jnp.arange(8, dtype=jnp.float32).reshape(4, 2)
  out, carry = model(latents, jnp.float32(0.5), None, 0)
  assert [(c[0], c[1], c[2]) for c in calls] == [(slice(0, 2), {devices[0]}, {devices[0]}),
                                               (slice(2, 4), {devices[1]}, {devices[1]})]
  expected = np.asarray(latents) * np.array([[1], [1], [3], [3]]) + 0.5
  np.testing.assert_array_equal(np.asarray(out), expected)
  assert out.devices() == {devices[0]} and carry == (1, 1)
  _, carry = model(latents, jnp.float32(0.5), carry, 1)
  assert carry == (2, 2)
  with pytest.raises(ValueError, match="latents batch 2 does not match the 4 rows"):
    model(latents[:2], jnp.float32(0.5), None, 0)
  with pytest.raises(ValueError, match="3 devices do not split 4 rows"):
    RowGroupStepModel(make, 4, jax.devices()[:3])
