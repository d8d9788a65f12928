"""Procedural captioned video clips: the training data of the project's small default model."""

from astraea_jax.data.clips import (
    Background,
    ClipConfig,
    ClipDescription,
    ClipParams,
    ObjectTrack,
    caption,
    clip_params,
    make_clip,
    render,
    sample_batch,
    sample_description,
    sample_descriptions,
)
from astraea_jax.data.grammar import VOCABULARY

__all__ = [
    "Background",
    "ClipConfig",
    "ClipDescription",
    "ClipParams",
    "ObjectTrack",
    "VOCABULARY",
    "caption",
    "clip_params",
    "make_clip",
    "render",
    "sample_batch",
    "sample_description",
    "sample_descriptions",
]
