"""Test-wide settings: CPU only, float32 matmuls, and rank promotion as an error."""
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same small programs (a train step before and after a resume, the same sampler),
# and CLI tests run them again in subprocesses: one persistent cache, set in the environment so that the
# subprocesses (which inherit it, and whose CLIs defer to it) compile each program once too.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "soraax-test-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "float32")
