"""soraax: Sora-style text-to-video diffusion transformers in JAX/Flax."""

__version__ = "0.1.0"
