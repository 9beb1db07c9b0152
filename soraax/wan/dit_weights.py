"""Wan 2.1's transformer (diffusers' `WanTransformer3DModel` folder) in and out of soraax's DiT.

One table (`_entries`) says, for every soraax param, which diffusers tensor it is and how the two layouts
differ, and both directions use it, so what loads is exactly what exports. The layouts differ in three ways:
  * torch's Linear stores [out, in], Flax's Dense kernel [in, out];
  * the patch embedding is a Conv3d whose kernel equals its stride: a Dense over each patch, once its
    [D, C, pt, ph, pw] weight is ordered as soraax's patch vector (pt, ph, pw, C; soraax/patches.py);
  * diffusers keeps one module per block (`blocks.{i}.`); soraax scans over layers, so each block param is
    the blocks' tensors stacked (read lazily, layer by layer, for the shard a device holds).
The output projection needs no reordering: diffusers unpatchifies its output as (pt, ph, pw, C), as soraax.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from soraax import weights
from soraax.dit import DiT
from soraax.wan.table import CONFIG, WEIGHTS, get_path, read_part_config, set_path, shape_after

CLASS_NAME = "WanTransformer3DModel"
# What soraax's DiT builds in: a config asking for anything else is not a model this module can hold.
FIXED = {"cross_attn_norm": True, "eps": 1e-6, "image_dim": None, "added_kv_proj_dim": None,
         "pos_embed_seq_len": None}
QK_NORMS = ("rms_norm_across_heads", None)


@dataclasses.dataclass(frozen=True)
class WanTransformer:
    """A Wan transformer as soraax holds it: the DiT, its params (LazyTensors until placed), and what the DiT
    does not know itself (patch size, latent channels, text width), with the folder's config."""
    module: DiT
    params: Any
    patch_size: tuple[int, int, int]
    channels: int
    text_dim: int
    config: dict


@dataclasses.dataclass(frozen=True)
class StackedTensor(weights.LazyTensor):
    """One param of the scanned blocks, [N, ...]: the N blocks' tensors stacked, each read only for the
    layers (and slice) a device's shard asks for."""
    parts: tuple = ()

    def read(self, index: Any = ()) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        layers = range(len(self.parts))[index[0]] if index else range(len(self.parts))
        rest = index[1:]
        if isinstance(layers, int):
            return self.parts[layers].read(rest)
        return np.stack([self.parts[i].read(rest) for i in layers])


def dit_from_config(config: dict, *, where: str = CONFIG, **overrides) -> tuple[DiT, tuple[int, int, int], int, int]:
    """A diffusers Wan transformer config -> (DiT, patch size, latent channels, text width).

    `overrides` are the DiT fields a run chooses and the checkpoint does not fix (attn_impl, remat_policy,
    scan_layers, dtype).
    """
    if config.get("_class_name", CLASS_NAME) != CLASS_NAME:
        raise weights.WeightsError(f"{where}: _class_name is {config['_class_name']!r}; soraax loads {CLASS_NAME}")
    for key, value in FIXED.items():
        if config.get(key, value) != value:
            raise weights.WeightsError(f"{where}: {key}={config[key]!r}, soraax's DiT has {key}={value!r} "
                                       "(Wan 2.1 text-to-video; image-to-video's image embedding is not supported)")
    if config.get("qk_norm", QK_NORMS[0]) not in QK_NORMS:
        raise weights.WeightsError(f"{where}: qk_norm={config['qk_norm']!r}; soraax supports {list(QK_NORMS)}")
    try:
        patch_size = tuple(int(p) for p in config.get("patch_size", (1, 2, 2)))
        heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
        channels = int(config.get("in_channels", 16))
        out_channels = int(config.get("out_channels") or channels)
        text_dim, depth = int(config["text_dim"]), int(config["num_layers"])
        ffn_dim, freq_dim = int(config["ffn_dim"]), int(config.get("freq_dim", 256))
    except KeyError as error:
        raise weights.WeightsError(f"{where}: the key {error} is missing (a diffusers {CLASS_NAME} config.json "
                                   "names num_attention_heads, attention_head_dim, text_dim, num_layers, ffn_dim)")
    if len(patch_size) != 3 or out_channels != channels:
        raise weights.WeightsError(f"{where}: soraax needs a 3D patch_size and out_channels == in_channels; "
                                   f"got patch_size={patch_size}, in {channels}, out {out_channels}")
    dit = DiT(patch_dim=math.prod(patch_size) * channels, width=heads * head_dim, depth=depth, heads=heads,
              mlp_dim=ffn_dim, freq_dim=freq_dim, cross_attn=True, modulation="shared",
              qk_norm=config.get("qk_norm", QK_NORMS[0]) is not None, text_mlp=True, **overrides)
    return dit, patch_size, channels, text_dim


def abstract_params(dit: DiT, text_dim: int):
    """The DiT's params as ShapeDtypeStructs (nothing allocated): what a loaded tree must match."""
    tokens = jnp.zeros((1, 2, dit.patch_dim))
    coords, ids = jnp.zeros((1, 2, 3), jnp.int32), jnp.ones((1, 2), jnp.int32)
    text = jnp.zeros((1, 2, text_dim))
    boxed = jax.eval_shape(dit.init, jax.random.PRNGKey(0), tokens, coords, ids, jnp.zeros((1, 2)), text, ids)
    return nn.meta.unbox(boxed["params"])


# --------------------------------------------------------------------------------------------- the table
# An entry: (soraax path within its scope, diffusers name, diffusers shape, to_soraax, to_diffusers).

def _linear(path, name, d_in, d_out):
    return [(path + ("kernel",), f"{name}.weight", (d_out, d_in), lambda w: w.T, lambda k: k.T),
            (path + ("bias",), f"{name}.bias", (d_out,), None, None)]


def _vector(path, name, n):
    return [(path, name, (n,), None, None)]


def _table(path, name, rows, width):
    return [(path, name, (1, rows, width), lambda w: w.reshape(rows, width), lambda p: p.reshape(1, rows, width))]


def _top_entries(dit: DiT, patch_size, channels: int, text_dim: int):
    d, p = dit.width, dit.patch_dim
    pt, ph, pw = patch_size
    return [
        # Conv3d [D, C, pt, ph, pw] -> Dense [(pt, ph, pw, C), D]: soraax's patch vector has channels last.
        (("patch_embed", "kernel"), "patch_embedding.weight", (d, channels, pt, ph, pw),
         lambda w: w.transpose(2, 3, 4, 1, 0).reshape(p, d),
         lambda k: k.reshape(pt, ph, pw, channels, d).transpose(4, 3, 0, 1, 2)),
        (("patch_embed", "bias"), "patch_embedding.bias", (d,), None, None),
        *_linear(("t_embedder", "fc1"), "condition_embedder.time_embedder.linear_1", dit.freq_dim, d),
        *_linear(("t_embedder", "fc2"), "condition_embedder.time_embedder.linear_2", d, d),
        *_linear(("time_proj",), "condition_embedder.time_proj", d, 6 * d),
        *_linear(("text_proj",), "condition_embedder.text_embedder.linear_1", text_dim, d),
        *_linear(("text_proj_out",), "condition_embedder.text_embedder.linear_2", d, d),
        *_table(("final_scale_shift_table",), "scale_shift_table", 2, d),
        *_linear(("final_proj",), "proj_out", d, p),
    ]


def _block_entries(dit: DiT, i: int):
    d, f, b = dit.width, dit.mlp_dim, f"blocks.{i}."
    entries = [*_table(("scale_shift_table",), b + "scale_shift_table", 6, d),
               *_vector(("norm_cross", "scale"), b + "norm2.weight", d),
               *_vector(("norm_cross", "bias"), b + "norm2.bias", d),
               *_linear(("mlp", "fc1"), b + "ffn.net.0.proj", d, f),
               *_linear(("mlp", "fc2"), b + "ffn.net.2", f, d)]
    for ours, theirs in (("self_attn", "attn1"), ("cross_attn", "attn2")):
        for proj, name in (("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("out", "to_out.0")):
            entries += _linear((ours, proj), f"{b}{theirs}.{name}", d, d)
        if dit.qk_norm:
            entries += _vector((ours, "norm_query", "scale"), f"{b}{theirs}.norm_q.weight", d)
            entries += _vector((ours, "norm_key", "scale"), f"{b}{theirs}.norm_k.weight", d)
    return entries


# --------------------------------------------------------------------------------------------- load / save

def read_config(folder: str) -> dict:
    return read_part_config(folder, "transformer")


def load_wan_transformer(folder: str, **overrides) -> WanTransformer:
    """A diffusers `transformer/` folder -> WanTransformer with lazy params (`weights.place` them into
    shardings, or `weights.materialise` for a small model). Every tensor is checked by name and shape, and a
    tensor the DiT has no place for is an error."""
    config = read_config(folder)
    dit, patch_size, channels, text_dim = dit_from_config(config, where=os.path.join(folder, CONFIG), **overrides)
    taker = weights.Taker(folder)

    def take(entry):
        path, name, shape, to_soraax, _ = entry
        return path, taker.take(name, shape_after(to_soraax, shape), to_soraax, source_shape=shape)

    params: dict = {}
    for path, tensor in map(take, _top_entries(dit, patch_size, channels, text_dim)):
        set_path(params, path, tensor)
    per_layer = [dict(map(take, _block_entries(dit, i))) for i in range(dit.depth)]
    if dit.scan_layers:
        for path in per_layer[0]:
            parts = tuple(layer[path] for layer in per_layer)
            set_path(params, ("blocks",) + path, StackedTensor(None, (dit.depth, *parts[0].shape), parts=parts))
    else:
        for i, layer in enumerate(per_layer):
            for path, tensor in layer.items():
                set_path(params, (f"blocks_{i}",) + path, tensor)
    # diffusers' own loader ignores a stray `norm_added_q` (an old export's typo); so does soraax.
    taker.check_all_used(ignore=lambda name: "norm_added_q" in name)
    weights.check_tree(params, abstract_params(dit, text_dim), folder)
    return WanTransformer(dit, params, patch_size, channels, text_dim, config)


def diffusers_config(dit: DiT, patch_size, channels: int, text_dim: int, rope_max_seq_len: int = 1024) -> dict:
    return {"_class_name": CLASS_NAME, "patch_size": list(patch_size),
            "num_attention_heads": dit.heads, "attention_head_dim": dit.width // dit.heads,
            "in_channels": channels, "out_channels": channels, "text_dim": text_dim, "freq_dim": dit.freq_dim,
            "ffn_dim": dit.mlp_dim or int(dit.width * dit.mlp_ratio), "num_layers": dit.depth,
            "qk_norm": QK_NORMS[0] if dit.qk_norm else None, "rope_max_seq_len": rope_max_seq_len, **FIXED}


def check_exportable(dit: DiT) -> None:
    wan = dict(modulation="shared", text_mlp=True, cross_attn=True, pooled_text=False, lowres_dim=0)
    wrong = {k: getattr(dit, k) for k, v in wan.items() if getattr(dit, k) != v}
    if wrong or not dit.mlp_dim:
        raise ValueError(f"only a Wan-shaped DiT exports to {CLASS_NAME}; this one has {wrong or 'mlp_dim=0'} "
                         f"where Wan has {wan} and an explicit mlp_dim")


def save_wan_transformer(folder: str, wan: WanTransformer, params=None, *,
                         max_shard_bytes: int = 10 * 2**30, dtype=np.float32) -> None:
    """Writes `params` (default wan.params: numpy, jax or lazy arrays) of a Wan-shaped DiT as a diffusers
    `transformer/` folder: config.json and diffusion_pytorch_model.safetensors, or shards over
    `max_shard_bytes` with their index, as diffusers' save_pretrained writes them."""
    dit = wan.module
    check_exportable(dit)
    params = weights.materialise(wan.params if params is None else params, dtype)
    weights.check_tree(params, abstract_params(dit, wan.text_dim), "params to export")
    tensors: dict[str, np.ndarray] = {}

    def put(entry, value):
        _, name, shape, _, to_diffusers = entry
        tensor = np.ascontiguousarray(value if to_diffusers is None else to_diffusers(value))
        assert tensor.shape == shape, (name, tensor.shape, shape)
        tensors[name] = tensor

    for entry in _top_entries(dit, wan.patch_size, wan.channels, wan.text_dim):
        put(entry, get_path(params, entry[0]))
    for i in range(dit.depth):
        for entry in _block_entries(dit, i):
            put(entry, get_path(params, ("blocks",) + entry[0])[i] if dit.scan_layers
                else get_path(params, (f"blocks_{i}",) + entry[0]))

    os.makedirs(folder, exist_ok=True)
    config = diffusers_config(dit, wan.patch_size, wan.channels, wan.text_dim,
                              wan.config.get("rope_max_seq_len", 1024))
    with open(os.path.join(folder, CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        if shards[-1] and size + tensors[name].nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += tensors[name].nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(folder, WEIGHTS), metadata={"format": "pt"})
        return
    stem = WEIGHTS[:-len(".safetensors")]
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        file = f"{stem}-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    with open(os.path.join(folder, WEIGHTS + ".index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map},
                  f, indent=2, sort_keys=True)
        f.write("\n")
