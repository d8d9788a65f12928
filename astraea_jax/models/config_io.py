"""Named presets and a JSON dict round trip for the models' frozen config dataclasses.

`WanConfig`, `STDiT3Config` and `HunyuanConfig` mix this in; each names its family and returns its
preset table, so the lookup, the error message and the dict conversion live in one place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, Self

__all__ = ["PresetConfig"]


class PresetConfig:
  """Mixin for a frozen dataclass config: `preset(name, **overrides)`, `to_dict`, `from_dict`."""

  family: ClassVar[str] = "model"  # the name the "unknown preset" error uses

  @classmethod
  def presets(cls) -> Mapping[str, Self]:
    raise NotImplementedError(f"{cls.__name__} has no preset table")

  @classmethod
  def preset(cls, name: str, **overrides: Any) -> Self:
    """A named preset (see `presets()`) with optional field overrides."""
    table = cls.presets()
    try:
      base = table[name]
    except KeyError:
      raise ValueError(f"unknown {cls.family} preset {name!r}; choose from {sorted(table)}") from None
    return dataclasses.replace(base, **overrides)

  def to_dict(self) -> dict[str, Any]:
    """JSON-serialisable field dict (inverse of `from_dict`); tuples become lists."""
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(self).items()}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> Self:
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    return cls(**d)
