"""The tiny config's super-resolution stage: 2x its height and width, on the base run's frozen VAE.

    python -m soraax.train --config configs/tiny.py --workdir runs/tiny
    python -m soraax.train --config configs/sr_tiny.py --workdir runs/sr --config.vae.checkpoint=runs/tiny/vae
    python -m soraax.sample --cascade runs/tiny,runs/sr --prompt "a red square moving left" --out x.mp4

The same DiT and train CLI as configs/tiny.py (soraax/cascade.py): it also sees each clip downscaled by
`sr.spatial_factor`, encoded and upsampled back onto its patch grid. `--config.sr.temporal_factor=2` adds
temporal SR (twice the frame rate: 1 + n latent frames -> 1 + 2n).
"""
import importlib.util
import os

import ml_collections


def get_config(arg=None):
    spec = importlib.util.spec_from_file_location("tiny", os.path.join(os.path.dirname(__file__), "tiny.py"))
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    c = tiny.get_config()
    c.task = "sr"                        # a super-resolution stage of a cascade
    c.batch_size = 2
    c.seq_len = 1024
    c.data.token_budget = 512            # 4x the base's 128: its clips at twice the height and width
    c.vae.checkpoint = "runs/tiny/vae"   # the BASE run's VAE: the stage conditions on, and samples in, its latents
    # An SR stage conditions on the low-res clip, never on held frames.
    c.data.cond_first_frame_rate = 0.0
    c.data.cond_past_frames_rate = 0.0
    c.data.cond_future_frames_rate = 0.0
    c.data.cond_ends_rate = 0.0

    c.sr = ml_collections.ConfigDict()
    c.sr.spatial_factor = 2              # height and width of the base's output are multiplied by this
    c.sr.temporal_factor = 1             # 2: twice the frame rate too (needs model.patch_size[0] == 1)
    c.sr.upsample = "trilinear"          # trilinear | nearest: how the low-res latent reaches the patch grid
    c.sr.max_aug = 0.5                   # training noises the low-res latent to a level in [0, max_aug] per clip
    c.sr.sample_aug = 0.1                # the fixed level at sampling: hides the base model's artefacts (CDM)
    return c
