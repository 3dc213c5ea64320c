"""Flags shared by every driver (each defined here once) and the workdir protocol.

Workdir layout (SPEC section 11): config.json (flags, library versions, device), metrics.jsonl
(one JSON object per logged round), summary.json (final metrics; written last, so its presence
marks a finished run) and PNG plots.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import Any, Mapping

from absl import flags

from bilevel.metrics import write_json

WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config.json, metrics.jsonl, "
                              "summary.json and plots (created if missing).")
SEED = flags.DEFINE_integer("seed", 0, "The one seed every random stream is derived from.")


def versions() -> dict[str, str]:
  out = {"python": platform.python_version()}
  for pkg in ("jax", "jaxlib", "optax", "flax", "chex", "numpy"):
    try:
      out[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      out[pkg] = "missing"
  return out


def device_info() -> dict[str, Any]:
  import jax  # imported late so JAX_PLATFORMS set by a caller takes effect
  devices = jax.devices()
  return {"platform": devices[0].platform, "device_kind": devices[0].device_kind,
          "count": len(devices)}


def fail(message: str) -> None:
  """End the program with one clear error paragraph and exit code 2 (no traceback)."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def require_workdir() -> str:
  if not WORKDIR.value:
    fail("--workdir is required: the directory where results are written.")
  os.makedirs(WORKDIR.value, exist_ok=True)
  return WORKDIR.value


def write_config(workdir: str, config: Mapping[str, Any]) -> None:
  flag_values = {f.name: f.value for f in flags.FLAGS.get_flags_for_module(sys.argv[0])} \
      if sys.argv and sys.argv[0] else {}
  write_json(os.path.join(workdir, "config.json"),
             {"config": dict(config), "flags": flag_values, "versions": versions(),
              "device": device_info(), "argv": list(sys.argv)})


def write_summary(workdir: str, summary: Mapping[str, Any]) -> None:
  write_json(os.path.join(workdir, "summary.json"), summary)
