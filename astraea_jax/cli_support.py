"""What the command-line tools share: loading a model by name and turning errors into one line.

`generate` and `search` take the same `--model` (the embedded default, a converted folder, or a
Wan2.1 release folder converted in memory) and report bad input the same way: one `error:` line on
stderr and exit status 1.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

COMPILE_CACHE_ENV = "ASTRAEA_COMPILE_CACHE"
COMPILE_CACHE_HELP = ("persistent XLA compilation cache: a later run of the same model, size and "
                      "schedule loads its compiled programs instead of compiling them (default: "
                      f"${COMPILE_CACHE_ENV}, else ~/.cache/astraea-jax/xla; 'none': off)")


def default_compile_cache() -> str:
  """`$ASTRAEA_COMPILE_CACHE`, else `$XDG_CACHE_HOME/astraea-jax/xla` (`~/.cache/...`)."""
  if os.environ.get(COMPILE_CACHE_ENV):
    return os.environ[COMPILE_CACHE_ENV]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "astraea-jax", "xla")


def enable_compile_cache(path: str | os.PathLike | None) -> Path | None:
  """Points jax's persistent compilation cache at `path` (None: `default_compile_cache()`;
  'none': off) before anything compiles; returns the folder in use, or None.

  A folder the user named that cannot be created is a ValueError; the default one is skipped
  quietly (a read-only home must not stop a run). `JAX_COMPILATION_CACHE_DIR`, where set, wins.
  Programs that compile in under a second are not stored
  (`JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS` changes that).
  """
  import jax  # pylint: disable=import-outside-toplevel

  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
  explicit = path is not None
  path = default_compile_cache() if path is None else str(path)
  if path.lower() == "none":
    return None
  folder = Path(path).expanduser()
  try:
    folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK):
      raise PermissionError("not writable")
  except OSError as e:
    if explicit:
      raise ValueError(f"--compile-cache {str(folder)!r}: cannot use it ({e})") from None
    return None
  jax.config.update("jax_compilation_cache_dir", str(folder))
  if not os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  return folder


def model_family(name: str) -> str:
  """Which pipeline `--model name` is, from the folder alone: 'default', 'opensora', 'hunyuan'
  or 'wan' (a converted or release Wan2.1 folder, or anything else, which the Wan loader rejects
  with its own message)."""
  if name == "default":
    return "default"
  from astraea_jax import pipeline_opensora  # pylint: disable=import-outside-toplevel
  from checkpoints_convert import hunyuan_t2v  # pylint: disable=import-outside-toplevel

  # An OpenSora folder has the same component folders as a converted Wan one, and a HunyuanVideo
  # release is a diffusers folder: ask both before Wan's.
  if pipeline_opensora.is_opensora_folder(name):
    return "opensora"
  if hunyuan_t2v.is_release(name):
    return "hunyuan"
  return "wan"


def load_model(name: str):
  """'default', a converted Wan2.1 folder, a Wan2.1 release folder (diffusers or original layout),
  a converted OpenSora v1.2 folder (`python -m checkpoints_convert opensora_t2v`) or a diffusers
  HunyuanVideo folder (converted in memory)."""
  family = model_family(name)
  if family == "default":
    from astraea_jax.default_model import load_default_pipeline  # pylint: disable=import-outside-toplevel
    return load_default_pipeline()
  if family == "opensora":
    from astraea_jax import pipeline_opensora  # pylint: disable=import-outside-toplevel
    return pipeline_opensora.load_opensora_pipeline(name)
  # The converters sit above the library; only the command-line layer reaches for them.
  from checkpoints_convert.common import CheckpointError  # pylint: disable=import-outside-toplevel

  if family == "hunyuan":
    from checkpoints_convert import hunyuan_t2v  # pylint: disable=import-outside-toplevel
    print(f"converting {name} (HunyuanVideo) in memory", file=sys.stderr)
    try:
      return hunyuan_t2v.load_pipeline(name)
    except CheckpointError as e:
      raise ValueError(str(e)) from None
  from astraea_jax.pipelines import folder_kind, load_wan_pipeline  # pylint: disable=import-outside-toplevel

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
