"""Test-wide JAX settings: CPU only and no silent rank promotion (STYLE.md)."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
