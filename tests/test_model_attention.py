"""The package's one attention function: implementations agree, and the key mask hides exactly the masked keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from astraea_jax.models.attention import attention


@pytest.mark.parametrize("s,n", [(5, 7), (16, 3)])
def test_key_mask_equals_attention_over_the_kept_keys(s, n):
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(kq, (2, s, 2, 8), jnp.float32)
  k = jax.random.normal(kk, (2, n, 2, 8), jnp.float32)
  v = jax.random.normal(kv, (2, n, 2, 8), jnp.float32)
  lengths = [n, 2]
  mask = jnp.arange(n)[None, :] < jnp.asarray(lengths)[:, None]  # [B, N]
  out = attention(q, k, v, key_mask=mask, implementation="xla")
  for b, length in enumerate(lengths):
    want = attention(q[b:b + 1], k[b:b + 1, :length], v[b:b + 1, :length], implementation="xla")
    np.testing.assert_allclose(np.asarray(out[b:b + 1]), np.asarray(want), rtol=1e-5, atol=1e-6)
  # A mask that keeps every key changes nothing.
  full = attention(q, k, v, key_mask=jnp.ones((2, n), bool), implementation="xla")
  np.testing.assert_allclose(np.asarray(full), np.asarray(attention(q, k, v, implementation="xla")), rtol=1e-6)


def test_unknown_implementation_is_one_clear_error():
  x = jnp.zeros((1, 2, 1, 4), jnp.float32)
  with pytest.raises(ValueError, match="unknown attention"):
    attention(x, x, x, implementation="nope")


@pytest.mark.parametrize("s,n,lengths", [(5, 7, [7, 2]), (16, 3, [1, 3])])
def test_kv_len_equals_the_prefix_key_mask(s, n, lengths):
  kq, kk, kv = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(kq, (2, s, 2, 8), jnp.float32)
  k = jax.random.normal(kk, (2, n, 2, 8), jnp.float32)
  v = jax.random.normal(kv, (2, n, 2, 8), jnp.float32)
  mask = jnp.arange(n)[None, :] < jnp.asarray(lengths)[:, None]  # [B, N]
  want = attention(q, k, v, key_mask=mask, implementation="xla")
  got = attention(q, k, v, kv_len=jnp.asarray(lengths), implementation="xla")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)
  # The Pallas kernel path (the reference off GPU) takes the same key lengths.
  q16, k16, v16 = (a.astype(jnp.bfloat16) for a in (q, k, v))
  got16 = attention(q16, k16, v16, kv_len=jnp.asarray(lengths), implementation="pallas")
  np.testing.assert_allclose(np.asarray(got16, np.float32), np.asarray(want), rtol=0.05, atol=0.05)
