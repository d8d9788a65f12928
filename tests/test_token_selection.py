"""Token scoring and selection against float64 numpy, and the ranking properties of the method."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from astraea_jax.acceleration.config import AstraeaConfig
from astraea_jax.acceleration.token_selection import (
    gather_rows,
    input_change,
    reduce_heads,
    scatter_rows,
    select_top_k,
    sketch_matrix,
    summarize_inputs,
    token_scores,
)


def _ranks(a):
  return np.argsort(np.argsort(a)).astype(np.float64)


def _spearman(a, b):
  return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def test_reduce_heads():
  lse = np.random.default_rng(0).normal(size=(2, 3, 5)).astype(np.float32)
  np.testing.assert_allclose(reduce_heads(jnp.asarray(lse), "mean"), lse.mean(1), rtol=1e-6)
  np.testing.assert_array_equal(reduce_heads(jnp.asarray(lse), "max"), lse.max(1))
  with pytest.raises(ValueError, match="head reduction"):
    reduce_heads(jnp.asarray(lse), "sum")
  with pytest.raises(ValueError, match=r"\[B, H, S\]"):
    reduce_heads(jnp.asarray(lse[0]), "mean")


def test_token_scores_formula():
  rng = np.random.default_rng(1)
  lse = rng.uniform(5, 12, size=(2, 7)).astype(np.float32)
  delta = rng.uniform(0, 0.5, size=(2, 7)).astype(np.float32)
  skips = rng.integers(0, 100, size=(2, 7)).astype(np.int32)
  config = AstraeaConfig(w_a=1.3, w_b=0.25, staleness_cap=40)
  got = token_scores(jnp.asarray(lse), jnp.asarray(delta), jnp.asarray(skips), config)
  want = (1.3 * lse.astype(np.float64) * delta
          + 0.25 * np.exp(np.minimum(skips, 40).astype(np.float64)))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
  assert np.isfinite(np.asarray(token_scores(jnp.asarray(lse), jnp.asarray(delta),
                                             jnp.full((2, 7), 10**6, jnp.int32)))).all()


def test_input_change_exact_against_numpy():
  rng = np.random.default_rng(2)
  xc = rng.normal(size=(2, 6, 16)).astype(np.float32)
  x = (xc + rng.normal(scale=0.1, size=xc.shape)).astype(np.float32)
  ref = summarize_inputs(jnp.asarray(xc), None)
  cur = summarize_inputs(jnp.asarray(x), None)
  want_abs = np.linalg.norm(x.astype(np.float64) - xc, axis=-1)
  want_rel = want_abs / np.linalg.norm(xc.astype(np.float64), axis=-1)
  np.testing.assert_allclose(input_change(cur, ref, relative=True), want_rel, rtol=1e-5)
  np.testing.assert_allclose(input_change(cur, ref, relative=False), want_abs, rtol=1e-5)


@pytest.mark.parametrize("mode", ["exact", "sketch"])
def test_token_whose_input_changed_more_ranks_higher(mode):
  # All else equal (same LSE, same skip count, same cached input norm), the token whose block input
  # moved more must score higher and be the one selected.
  rng = np.random.default_rng(3)
  n, c = 8, 32
  xc = rng.normal(size=(1, n, c)).astype(np.float32)
  xc /= np.linalg.norm(xc, axis=-1, keepdims=True)  # equal cached norms
  x = xc.copy()
  x[0, 5] += 0.3 * rng.normal(size=c).astype(np.float32) / np.sqrt(c)  # small change
  x[0, 2] += 3.0 * rng.normal(size=c).astype(np.float32) / np.sqrt(c)  # large change
  proj = None if mode == "exact" else sketch_matrix(c, 64, seed=0)
  delta = input_change(summarize_inputs(jnp.asarray(x), proj),
                       summarize_inputs(jnp.asarray(xc), proj))
  lse = jnp.full((1, n), 9.0, jnp.float32)
  skips = jnp.ones((1, n), jnp.int32)
  scores = np.asarray(token_scores(lse, delta, skips))
  assert scores[0, 2] > scores[0, 5] > scores[0, 0]
  np.testing.assert_array_equal(select_top_k(jnp.asarray(scores), 1), [[2]])
  np.testing.assert_array_equal(select_top_k(jnp.asarray(scores), 2), [[2, 5]])  # by score


def test_stale_token_is_forced_back():
  lse = jnp.full((1, 4), 9.0, jnp.float32)
  delta = jnp.asarray([[0.5, 0.5, 0.0, 0.5]], jnp.float32)
  skips = jnp.asarray([[0, 0, 8, 0]], jnp.int32)
  np.testing.assert_array_equal(select_top_k(token_scores(lse, delta, skips), 1), [[2]])


def test_sketch_ranks_like_exact():
  # JL: ||P(x - x_c)|| / ||x_c|| estimates the relative change well enough to rank tokens.
  rng = np.random.default_rng(4)
  n, c = 512, 256
  xc = rng.normal(size=(1, n, c)).astype(np.float32)
  scale = np.exp(rng.uniform(np.log(1e-3), np.log(1.0), size=(1, n, 1)))
  x = (xc + scale * rng.normal(size=xc.shape)).astype(np.float32)
  proj = sketch_matrix(c, 64, seed=0)
  exact = np.asarray(input_change(jnp.asarray(x), jnp.asarray(xc)))[0]
  sketch = np.asarray(input_change(summarize_inputs(jnp.asarray(x), proj),
                                   summarize_inputs(jnp.asarray(xc), proj)))[0]
  assert _spearman(exact, sketch) > 0.98
  ratio = sketch / exact
  assert np.median(np.abs(ratio - 1)) < 0.15  # ~ 1 / sqrt(64) typical error of the ratio
  # The same top-40% set, up to the tokens near the threshold.
  k = int(0.4 * n)
  top_exact = set(np.argsort(-exact)[:k])
  top_sketch = set(np.argsort(-sketch)[:k])
  assert len(top_exact & top_sketch) / k > 0.9


def test_sketch_matrix_is_seeded_and_norm_preserving():
  a = sketch_matrix(128, 64, seed=7)
  np.testing.assert_array_equal(a, sketch_matrix(128, 64, seed=7))
  assert not np.array_equal(a, sketch_matrix(128, 64, seed=8))
  v = np.random.default_rng(5).normal(size=(4000, 128)).astype(np.float32)
  gain = np.sum(np.square(v @ np.asarray(a)), -1) / np.sum(np.square(v), -1)
  assert abs(gain.mean() - 1) < 0.1
  assert sketch_matrix(128, 64, dtype=jnp.bfloat16).dtype == jnp.bfloat16


def test_sketch_of_bf16_inputs_accumulates_in_f32():
  x = jax.random.normal(jax.random.key(0), (1, 4, 64), jnp.float32)
  proj = sketch_matrix(64, 16, dtype=jnp.bfloat16)
  ref = summarize_inputs(x.astype(jnp.bfloat16), proj)
  assert ref.dtype == jnp.float32
  want = np.asarray(x.astype(jnp.bfloat16), np.float64) @ np.asarray(proj, np.float64)
  np.testing.assert_allclose(np.asarray(ref), want, rtol=1e-4, atol=1e-4)


def test_select_top_k_matches_numpy():
  scores = np.random.default_rng(6).normal(size=(3, 50)).astype(np.float32)
  idx = np.asarray(select_top_k(jnp.asarray(scores), 17))
  assert idx.dtype == np.int32 and idx.shape == (3, 17)
  for row, s in zip(idx, scores):
    np.testing.assert_array_equal(row, np.argsort(-s, kind="stable")[:17])
  for k in (0, 51):
    with pytest.raises(ValueError, match="k="):
      select_top_k(jnp.asarray(scores), k)


@pytest.mark.parametrize("shape, k", [((3, 50), 17), ((2, 1000), 400), ((1, 7), 7), ((2, 33), 1)])
@pytest.mark.parametrize("kind", ["normal", "ties", "signed_zeros"])
def test_radix_select_picks_the_top_k_set(shape, k, kind):
  rng = np.random.default_rng(k)
  scores = rng.normal(size=shape).astype(np.float32)
  if kind == "ties":
    scores = np.round(scores * 2) / 2  # many equal scores: ties go to the lower index
  elif kind == "signed_zeros":
    scores = -np.abs(scores)
    scores[:, ::3], scores[:, 1::5] = 0.0, -0.0
  want = np.asarray(select_top_k(jnp.asarray(scores), k))
  got = np.asarray(select_top_k(jnp.asarray(scores), k, method="radix"))
  assert got.shape == want.shape and got.dtype == np.int32
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, np.sort(w))  # the same set, in ascending index order


def test_gather_and_scatter_rows():
  rng = np.random.default_rng(7)
  base = rng.normal(size=(2, 9, 3)).astype(np.float32)
  idx = np.stack([rng.permutation(9)[:4], rng.permutation(9)[:4]]).astype(np.int32)
  rows = rng.normal(size=(2, 4, 3)).astype(np.float32)
  np.testing.assert_array_equal(gather_rows(jnp.asarray(base), jnp.asarray(idx)),
                                base[np.arange(2)[:, None], idx])
  want = base.copy()
  want[np.arange(2)[:, None], idx] = rows
  np.testing.assert_array_equal(scatter_rows(jnp.asarray(base), jnp.asarray(idx),
                                             jnp.asarray(rows)), want)


@pytest.mark.parametrize("kwargs, match", [
    ({"head_reduction": "median"}, "head_reduction"),
    ({"delta_norm": "l1"}, "delta_norm"),
    ({"delta_mode": "full"}, "delta_mode"),
    ({"sketch_dim": 0}, "sketch_dim"),
    ({"staleness_cap": 100}, "staleness_cap"),
    ({"w_a": float("nan")}, "w_a"),
])
def test_config_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    AstraeaConfig(**kwargs)
