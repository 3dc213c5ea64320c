"""The one error type for bad configuration, and range checks that name value and range."""

from __future__ import annotations

from typing import Iterable


class ConfigError(ValueError):
  """A configuration value is outside its allowed range or set."""


def check_choice(name: str, value: str, allowed: Iterable[str]) -> None:
  allowed = list(allowed)
  if value not in allowed:
    raise ConfigError(f"{name}={value!r} is not known; allowed values: {', '.join(allowed)}.")


def check_range(name: str, value: float, low: float | None = None, high: float | None = None,
                *, low_open: bool = False, high_open: bool = False) -> None:
  """Raise ConfigError unless low (<|<=) value (<|<=) high."""
  bad = value != value  # NaN
  if low is not None:
    bad |= value <= low if low_open else value < low
  if high is not None:
    bad |= value >= high if high_open else value > high
  if bad:
    lo = "-inf" if low is None else f"{low}"
    hi = "inf" if high is None else f"{high}"
    interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
    raise ConfigError(f"{name}={value!r} is outside the allowed range {interval}.")
