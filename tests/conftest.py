"""Test-wide settings: CPU only, float32 matmuls, and rank promotion as an error."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "float32")

# Many tests compile the same small programs (a train step before and after a resume, the same sampler):
# a per-session persistent cache compiles each once.
import tempfile  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "soraax-test-jax-cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
