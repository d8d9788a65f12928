"""astraea-jax: training-free token-wise acceleration of video diffusion transformers in JAX.

ASTRAEA: Chen et al., "A GPU-Oriented Token-wise Acceleration Framework for Video Diffusion Transformers",
arXiv 2506.05096 (ICLR 2026).
"""

from astraea_jax.xla_flags import apply_default_xla_flags as _apply_default_xla_flags

_apply_default_xla_flags()

__version__ = "0.1.0"
