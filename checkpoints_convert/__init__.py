"""On-disk PyTorch/safetensors checkpoints -> Flax parameters (orbax) that `astraea_jax` loads.

One module per model family (`wan`, `umt5`, ...) exposes `main(argv)`, and
`python -m checkpoints_convert FAMILY ...` dispatches to it. Shared pieces: `safetensors_io`
(numpy-only reader), `common` (errors, atomic output directory, checked parameter tree).
"""
