"""astraea-jax: training-free token-wise acceleration of video diffusion transformers in JAX.

ASTRAEA: Chen et al., "A GPU-Oriented Token-wise Acceleration Framework for Video Diffusion Transformers",
arXiv 2506.05096 (ICLR 2026).
"""

__version__ = "0.1.0"
