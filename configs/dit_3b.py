"""A ~3B-parameter DiT for TPU pods: DiT-XL's recipe (configs/dit_xl.py) at 2048 wide, 32 deep, 16 heads of 128.

    python -m soraax.train --config configs/dit_3b.py --dry_run                          # size and FLOPs
    python -m soraax.train --config configs/dit_3b.py --compile_only --topology v5p-64   # fits a slice?

Width 2048 with 128-wide heads keeps every matmul a multiple of the TPU MXU's 128 lanes. Params and
optimizer state (16 bytes a param: f32 params, EMA, Adam's two moments) are ~47 GiB, so they are sharded
over the whole slice (mesh.fsdp=-1) rather than replicated, and activations are rematerialised in full
(only the layer inputs are kept for the backward pass): the price is one more forward pass a step.
"""
import importlib.util
import os


def get_config(arg=None):
    spec = importlib.util.spec_from_file_location("dit_xl", os.path.join(os.path.dirname(__file__), "dit_xl.py"))
    dit_xl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dit_xl)
    c = dit_xl.get_config()
    c.mesh.data = 1
    c.mesh.fsdp = -1                     # ZeRO-3 style: every chip holds 1/N of params and optimizer state
    c.model.width = 2048
    c.model.depth = 32
    c.model.heads = 16
    c.model.remat_policy = "full"
    c.model.text_width = 1024            # a wider byte-level text encoder to feed the wider model
    c.model.text_depth = 6
    c.model.text_heads = 8
    return c
