"""What the command-line tools share: loading a model by name and turning errors into one line.

`generate` and `search` take the same `--model` (the embedded default, a converted folder, or a
Wan2.1 release folder converted in memory) and report bad input the same way: one `error:` line on
stderr and exit status 1.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


def load_model(name: str):
  """'default', a converted Wan2.1 folder, a Wan2.1 release folder (diffusers or original layout),
  a converted OpenSora v1.2 folder (`python -m checkpoints_convert opensora_t2v`) or a diffusers
  HunyuanVideo folder (converted in memory)."""
  if name == "default":
    from astraea_jax.default_model import load_default_pipeline  # pylint: disable=import-outside-toplevel
    return load_default_pipeline()
  from astraea_jax.pipelines import folder_kind, load_wan_pipeline  # pylint: disable=import-outside-toplevel
  from astraea_jax import pipeline_opensora  # pylint: disable=import-outside-toplevel

  # An OpenSora folder has the same component folders as a converted Wan one: ask it first.
  if pipeline_opensora.is_opensora_folder(name):
    return pipeline_opensora.load_opensora_pipeline(name)
  # The converters sit above the library; only the command-line layer reaches for them.
  from checkpoints_convert import hunyuan_t2v  # pylint: disable=import-outside-toplevel
  from checkpoints_convert.common import CheckpointError  # pylint: disable=import-outside-toplevel

  if hunyuan_t2v.is_release(name):  # a diffusers folder too: ask before Wan's
    print(f"converting {name} (HunyuanVideo) in memory", file=sys.stderr)
    try:
      return hunyuan_t2v.load_pipeline(name)
    except CheckpointError as e:
      raise ValueError(str(e)) from None
  if folder_kind(name) == "converted":
    return load_wan_pipeline(name)
  from checkpoints_convert.wan_t2v import load_pipeline  # pylint: disable=import-outside-toplevel

  print(f"converting {name} in memory (convert once with `python -m checkpoints_convert wan_t2v` "
        "to start faster)", file=sys.stderr)
  try:
    return load_pipeline(name)
  except CheckpointError as e:
    raise ValueError(str(e)) from None


def run_main(run: Callable[[list[str] | None], int], argv: list[str] | None, *,
             interrupted: str = "interrupted") -> int:
  """Calls `run(argv)`; bad input becomes one `error:` line and exit 1, Ctrl-C exit 130."""
  from astraea_jax.parallel.distributed import PeerProcessError  # pylint: disable=import-outside-toplevel
  from astraea_jax.pipeline import GenerationError  # pylint: disable=import-outside-toplevel
  from astraea_jax.pipelines import ModelLoadError  # pylint: disable=import-outside-toplevel
  from astraea_jax.video import OutputError  # pylint: disable=import-outside-toplevel

  try:
    return run(argv)
  except (GenerationError, ModelLoadError, OutputError, PeerProcessError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print(interrupted, file=sys.stderr)
    return 130
