"""Pallas GPU attention kernels with log-sum-exp, and their pure-JAX references.

`selected_query_attention` computes attention of selected queries against all keys and values and
returns each query's LSE, as ASTRAEA (arXiv 2506.05096) needs; `block_sparse_attention` restricts it
to listed key/value tiles. Implementations are chosen from `IMPLEMENTATIONS` /
`BLOCK_SPARSE_IMPLEMENTATIONS` (see `default_implementation`); tile sizes live in `AttentionTuning`.
"""

from pallas_kernels.attention import (
    BLOCK_SPARSE_IMPLEMENTATIONS,
    IMPLEMENTATIONS,
    SHORT_KEYS,
    block_sparse_attention,
    block_sparse_attention_reference,
    default_implementation,
    selected_query_attention,
    selected_query_attention_reference,
)
from pallas_kernels.tuning import TUNING_PRESETS, AttentionTuning, default_tuning, preset_override

__all__ = [
    "BLOCK_SPARSE_IMPLEMENTATIONS",
    "IMPLEMENTATIONS",
    "SHORT_KEYS",
    "TUNING_PRESETS",
    "AttentionTuning",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "default_implementation",
    "default_tuning",
    "preset_override",
    "selected_query_attention",
    "selected_query_attention_reference",
]
