"""Wan 2.1 text-to-video 14B: configs/wan21_t2v_1_3b.py at Wan's 14B size (40 heads of 128, 40 layers, FFN
13824), sampled at 720p as Wan does (flow shift 5.0: diffusion.base_tokens gives an 81-frame 1280x720 clip's
75600 tokens exactly that shift).

    python -m soraax.train --config configs/wan21_t2v_14b.py --dry_run       # 14,288,491,584 DiT params
    python -m soraax.train --config configs/wan21_t2v_14b.py --workdir runs/wan14 \\
        --config.init_from=/data/Wan2.1-T2V-14B-Diffusers
"""
import importlib.util
import os


def get_config(arg=None):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wan21_t2v_1_3b.py")
    spec = importlib.util.spec_from_file_location("wan21_t2v_1_3b", path)
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    c = base.get_config(arg)
    c.model.width = 5120
    c.model.depth = 40
    c.model.heads = 40
    c.model.mlp_dim = 13824
    c.seq_len = 75_600                   # an 81-frame 1280x720 clip: 21 x 45 x 80 patches
    c.data.token_budget = 75_600
    c.diffusion.base_tokens = 3_024      # 75600 tokens -> shift sqrt(75600 / 3024) = 5.0, Wan's 720p flow shift
    c.mesh.update(dict(data=1, fsdp=-1, context=1, tensor=1))
    # Measured on v5p-64 with one 32760-token row a chip (README, "Memory on TPU slices"): dots_no_batch
    # needs 191 GiB a chip, full remat 69.5 of 95 GiB.
    c.model.remat_policy = "full"
    return c
