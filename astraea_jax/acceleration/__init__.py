"""The ASTRAEA core (arXiv 2506.05096): budget schedules, token scoring and selection, the token
cache, and the accelerated Wan forward with its denoising-loop adapter."""

from astraea_jax.acceleration.astraea import (
    AstraeaStepModel,
    StepStat,
    astraea_forward,
    compute_block,
    jit_astraea_step,
    num_video_tokens,
    selection_only_block,
)
from astraea_jax.acceleration.config import AstraeaConfig
from astraea_jax.acceleration.schedule import BudgetSchedule, num_selected_tokens
from astraea_jax.acceleration.token_cache import TokenCache, cache_bytes_per_token_per_block

__all__ = [
    "AstraeaConfig",
    "AstraeaStepModel",
    "BudgetSchedule",
    "StepStat",
    "TokenCache",
    "astraea_forward",
    "cache_bytes_per_token_per_block",
    "compute_block",
    "jit_astraea_step",
    "num_selected_tokens",
    "num_video_tokens",
    "selection_only_block",
]
