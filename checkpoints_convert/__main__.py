"""`python -m checkpoints_convert FAMILY [args...]`: converts a checkpoint of one model family.

Each family module of this package with a `main(argv) -> int` is a sub-command (e.g. `wan`, `umt5`);
`python -m checkpoints_convert FAMILY --help` shows its options. A `CheckpointError` becomes one
line on stderr and exit status 1.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from collections.abc import Sequence

import checkpoints_convert
from checkpoints_convert.common import CheckpointError

_LIBRARIES = {"common", "safetensors_io", "pth_io"}


def families() -> list[str]:
  """Names of the converter sub-commands (package modules other than the shared libraries)."""
  return sorted(m.name for m in pkgutil.iter_modules(checkpoints_convert.__path__)
                if not m.name.startswith("_") and m.name not in _LIBRARIES)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  names = families()
  if not argv or argv[0] in ("-h", "--help"):
    print(f"usage: python -m checkpoints_convert {{{','.join(names)}}} [--help] ...\n\n"
          f"{__doc__.splitlines()[0]}")
    return 0 if argv else 2
  family, rest = argv[0], argv[1:]
  if family not in names:
    print(f"error: unknown model family {family!r}; choose from {', '.join(names)}",
          file=sys.stderr)
    return 2
  module = importlib.import_module(f"checkpoints_convert.{family}")
  try:
    return int(module.main(rest) or 0)
  except CheckpointError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
