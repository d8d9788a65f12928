"""Writing generated videos: mp4 through imageio-ffmpeg, a GIF preview, and atomic file creation.

A failed or interrupted write never leaves a partial file at the requested path: frames go to a temporary
sibling that is renamed into place only when the encoder has finished.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np


class OutputError(Exception):
  """The output path cannot be written."""


def to_uint8_frames(video: np.ndarray) -> np.ndarray:
  """`[C, T, Y, X]` or `[T, Y, X, C]` floats in [-1, 1] -> `[T, Y, X, 3]` uint8."""
  video = np.asarray(video, dtype=np.float32)
  if video.ndim != 4:
    raise ValueError(f"expected a 4-D video, got {video.shape=}")
  if video.shape[0] in (1, 3) and video.shape[-1] not in (1, 3):
    video = np.moveaxis(video, 0, -1)  # [C, T, Y, X] -> [T, Y, X, C]
  if video.shape[-1] == 1:
    video = np.repeat(video, 3, axis=-1)
  return np.round((np.clip(video, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def check_writable(path: str | os.PathLike) -> Path:
  """Fails early (before any generation work) when `path` cannot be created."""
  path = Path(path)
  parent = path.parent if str(path.parent) else Path(".")
  if path.is_dir():
    raise OutputError(f"output path {str(path)!r} is a directory")
  if not parent.exists():
    raise OutputError(f"output directory {str(parent)!r} does not exist")
  if not os.access(parent, os.W_OK):
    raise OutputError(f"output directory {str(parent)!r} is not writable")
  return path


def check_mp4_encoder() -> None:
  """Fails early when no H.264 encoder is at hand (imageio-ffmpeg and its ffmpeg binary)."""
  try:
    import imageio_ffmpeg  # pylint: disable=import-outside-toplevel
    imageio_ffmpeg.get_ffmpeg_exe()
  except (ImportError, RuntimeError, OSError) as e:
    raise OutputError(f"writing .mp4 needs imageio-ffmpeg (pip install imageio-ffmpeg): {e}") from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
  """Yields a temporary path beside `path`; renames it onto `path` on success, deletes it on failure."""
  path = check_writable(path)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent or ".")
  os.close(fd)
  tmp_path = Path(tmp)
  try:
    yield tmp_path
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
    os.replace(tmp_path, path)
  except BaseException:
    tmp_path.unlink(missing_ok=True)
    raise


def write_video(path: str | os.PathLike, frames: np.ndarray, *, fps: int = 16) -> Path:
  """Writes `[T, Y, X, 3]` uint8 frames as an mp4 (H.264, yuv420p) or, for a `.gif` path, a looping GIF."""
  import imageio.v3 as iio  # pylint: disable=import-outside-toplevel

  frames = np.asarray(frames)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f"expected [T, Y, X, 3] uint8 frames, got {frames.shape=} {frames.dtype=}")
  path = Path(path)
  with atomic_path(path) as tmp, warnings.catch_warnings():
    # The encoder is a subprocess; JAX's fork warning does not apply to a fork+exec of ffmpeg.
    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
    if path.suffix.lower() == ".gif":
      iio.imwrite(tmp, frames, extension=".gif", duration=1000.0 / fps, loop=0)
    else:
      # macro_block_size=1 keeps small odd test sizes encodable (no silent resize).
      iio.imwrite(tmp, frames, extension=".mp4", plugin="FFMPEG", fps=fps, codec="libx264",
                  macro_block_size=1)
  return path


def read_video(path: str | os.PathLike) -> np.ndarray:
  """Reads a video back as `[T, Y, X, 3]` uint8 (for tests and quality checks)."""
  import imageio.v3 as iio  # pylint: disable=import-outside-toplevel

  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
    return np.asarray(iio.imread(path, plugin="FFMPEG" if Path(path).suffix != ".gif" else None))
