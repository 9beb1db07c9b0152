"""The tiny config's VAE, trained on its own: `python -m soraax.train --config configs/vae_tiny.py --workdir runs/vae`.

Point a DiT config at the result with `--config.vae.checkpoint=runs/vae`.
"""
import importlib.util
import os


def get_config(arg=None):
    spec = importlib.util.spec_from_file_location("tiny", os.path.join(os.path.dirname(__file__), "tiny.py"))
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    c = tiny.get_config()
    c.task = "vae"
    c.checkpoint_every = 400
    return c
