"""The ASTRAEA core (arXiv 2506.05096): budget schedules, token scoring and selection, the token
cache, and the accelerated Wan, OpenSora and HunyuanVideo forwards with their denoising-loop
adapters; beside it the peer methods (TeaCache, EasyCache, PAB, step skipping) on the same plumbing."""

from astraea_jax.acceleration.astraea import (
    AstraeaStepModel,
    StepStat,
    astraea_forward,
    compute_block,
    jit_astraea_step,
    num_video_tokens,
    selection_only_block,
)
from astraea_jax.acceleration.attention_broadcast import PABConfig, PABStepModel
from astraea_jax.acceleration.config import AstraeaConfig
from astraea_jax.acceleration.hunyuan_astraea import HunyuanAstraeaStepModel, hunyuan_astraea_forward
from astraea_jax.acceleration.opensora_astraea import (
    OpenSoraAstraeaStepModel,
    opensora_astraea_forward,
)
from astraea_jax.acceleration.schedule import (
    BudgetSchedule,
    load_schedules,
    num_selected_tokens,
    shipped_schedule,
)
from astraea_jax.acceleration.step_cache import (
    EasyCacheConfig,
    EasyCacheStepModel,
    TeaCacheConfig,
    TeaCacheStepModel,
)
from astraea_jax.acceleration.step_skip import StepSkipConfig, StepSkipStepModel
from astraea_jax.acceleration.token_cache import TokenCache, cache_bytes_per_token_per_block

__all__ = [
    "AstraeaConfig",
    "AstraeaStepModel",
    "BudgetSchedule",
    "EasyCacheConfig",
    "EasyCacheStepModel",
    "HunyuanAstraeaStepModel",
    "OpenSoraAstraeaStepModel",
    "PABConfig",
    "PABStepModel",
    "StepSkipConfig",
    "StepSkipStepModel",
    "StepStat",
    "TeaCacheConfig",
    "TeaCacheStepModel",
    "TokenCache",
    "astraea_forward",
    "cache_bytes_per_token_per_block",
    "compute_block",
    "hunyuan_astraea_forward",
    "jit_astraea_step",
    "load_schedules",
    "num_selected_tokens",
    "num_video_tokens",
    "opensora_astraea_forward",
    "selection_only_block",
    "shipped_schedule",
]
