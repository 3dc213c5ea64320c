"""Test-wide JAX settings: CPU only and no silent rank promotion (WORKSPACE.md)."""
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA:CPU's newer fusion emitters compile ~3x slower on these small programs; the suite compiles
# hundreds of rounds, so tests (and the subprocesses they start, which inherit the environment)
# use the classic emitters. Numbers are unaffected beyond float rounding.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_use_fusion_emitters=false")
# Compilation dominates the suite (hundreds of small round programs, each run for a few rounds):
# XLA compiles with most optimisations off, for the tests and the driver processes they start.
# The tests compare results (dense against compact to 1e-12, vmap against loop, oracles), which
# optimisation must not change; tests of what an optimised program does (XLA's FLOP counts,
# float rounding bounds, runs that blow up or hold) use the `xla_optimised` fixture below.
# Speed is measured by experiments.benchmark, never here.
_NO_OPT = "JAX_DISABLE_MOST_OPTIMIZATIONS"
os.environ.setdefault(_NO_OPT, "true")
# Many tests build the same round program again (same seed twice, a killed run and its resumption,
# subprocess drivers): a persistent compilation cache for this session compiles each once. The
# pytest-xdist workers inherit the folder the main process made here, so they share it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="bilevel_jax_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
# Float32 comparisons in the suite assume full-precision matmuls: on a GPU, the default precision
# may run float32 matmuls in TF32 (10-bit mantissa) and break them. No effect on CPU.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def xla_optimised():
  """XLA with its optimisations on, as a run compiles: this process and the ones it starts."""
  before, env = jax.config.read("jax_disable_most_optimizations"), os.environ.pop(_NO_OPT, None)
  jax.config.update("jax_disable_most_optimizations", False)
  yield
  jax.config.update("jax_disable_most_optimizations", before)
  if env is not None:
    os.environ[_NO_OPT] = env
