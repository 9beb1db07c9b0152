"""Analytic FLOPs of a DiT train step: the numerator of MFU, and what --dry_run prints.

XLA's cost analysis counts a scanned layer stack's body once, not `depth` times, so the model's own
arithmetic is counted here from the param shapes: 2 FLOPs per multiply-add of every kernel on every token
it touches, plus the attention products (QK^T and PV). A train step is 3x the forward (the backward is
twice the forward); remat's recomputation is not counted, as MFU conventionally excludes it. Elementwise
work (norms, softmax, activations) is left out too: it is small next to the matmuls at real widths.
"""

from __future__ import annotations

import numpy as np
from flax import traverse_util

# DiT kernels that act on text tokens rather than video tokens.
_TEXT_SIDE = ("text_proj", "cross_attn/key", "cross_attn/value")
# DiT kernels of the conditioning path: per token, or per (clip, t) slot with model.adaln_slots.
_CONDITIONING_SIDE = ("t_embedder", "aug_embedder", "pooled_text_proj", "time_proj", "adaLN_modulation",
                      "final_modulation")


def _kernel_sizes(params) -> dict[str, int]:
    flat = traverse_util.flatten_dict(params, sep="/")
    return {path: int(np.prod(x.shape)) for path, x in flat.items()
            if path.endswith("kernel") and len(x.shape) >= 2}


def _encoder_forward(rows: int, l: int, kernels: dict[str, int], module) -> float:
    """Forward FLOPs of a text encoder on full rows: its kernels on every text token, plus attention."""
    inner = module.heads * getattr(module, "head_dim", module.width // module.heads)
    return 2.0 * rows * l * sum(kernels.values()) + 4.0 * rows * module.depth * inner * l * l


def dit_train_flops(cfg, params, frozen=None, text_module=None) -> dict[str, float]:
    """FLOPs of one DiT train step on full packed rows, from param shapes.

    `params` = {"dit": ..., "text": ...} when the text encoder is trained (bytes); a frozen encoder run in
    the step is `frozen["text"]` and costs its forward alone (nothing upstream of it is trained, so no
    backward); a cached one (in neither) costs the step nothing. `text_module` gives the encoder's depth and
    attention width (default: the config's byte encoder).

    The conditioning path (timestep MLP, adaLN) runs per (clip, t) slot of a row with `model.adaln_slots`
    (soraax/cond_slots.py), per token without. Self-attention is counted over each query block's window
    where model.local_attention applies (soraax/local_attention.py), else over the whole row (S x S), which
    is what the xla and chunked backends compute whatever the segments; splash skips cross-segment blocks.
    """
    rows, s, l = cfg.batch_size, cfg.seq_len, cfg.text_len
    m = cfg.model
    dit_kernels = _kernel_sizes(params["dit"])

    def side(names):
        return sum(n for p, n in dit_kernels.items() if any(t in p for t in names))
    text_side, conditioning_side = side(_TEXT_SIDE), side(_CONDITIONING_SIDE)
    video_side = sum(dit_kernels.values()) - text_side - conditioning_side
    conditioning_rows = s
    if m.get("adaln_slots", True):
        from soraax.cond_slots import slots_for
        conditioning_rows = slots_for(cfg.max_segments)
    # A scanned stack keeps the layer axis in the kernel's shape, so the sizes above already hold all layers.
    forward = 2.0 * rows * (s * video_side + l * text_side + conditioning_rows * conditioning_side)
    keys = s   # keys a query's self-attention computes: the whole row, or the window of model.local_attention
    from soraax.local_attention import applies
    blocking = applies(m.attn_impl, s, s, int(cfg.data.token_budget) if m.get("local_attention", True) else 0)
    if blocking is not None:
        keys = (2 * blocking[1] + 1) * blocking[0]
    cross_keys = l if m.get("cross_attn", True) else 0
    forward += 4.0 * rows * m.depth * m.width * (s * keys + s * cross_keys)   # self- and cross-attention
    if text_module is None:
        from soraax.models import build
        text_module = build(cfg).text_encoder
    total = 3.0 * forward
    if "text" in params:
        total += 3.0 * _encoder_forward(rows, l, _kernel_sizes(params["text"]), text_module)
    elif frozen and "text" in frozen:
        total += _encoder_forward(rows, l, _kernel_sizes(frozen["text"]), text_module)
    return {"flops_per_step": total, "flops_per_token": total / (rows * s)}
