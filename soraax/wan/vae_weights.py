"""Wan 2.1's VAE (diffusers' AutoencoderKLWan, a folder's `vae/`) as soraax's VideoVAE with Wan's switches.

`load_wan_vae(folder)` reads `config.json` and the safetensors (one file or shards with an index) with
soraax.weights' lazy numpy reader: every tensor is checked by name and shape against one table, and a tensor
that is missing, mis-shaped, or has no place in the model is an error that names it. `save_wan_vae` writes
params back through the same table, so a VAE trained or fine-tuned in soraax opens in diffusers.

Layouts: torch Conv3d [out, in, kt, kh, kw] -> Flax [kt, kh, kw, in, out]; Wan's per-frame Conv2d
[out, in, kh, kw] -> [1, kh, kw, in, out]; its 1x1 Conv2d (attention) [out, in, 1, 1] -> Dense [in, out];
RMS gammas [C, 1, 1(, 1)] -> [C]. The latent statistics `latents_mean`/`latents_std` of config.json become
the VideoVAE's `latent_mean`/`latent_std`, so `encode` returns what Wan's pipeline feeds its DiT,
(mean - latents_mean) / latents_std, and `decode` takes it. Wan's decode also clamps to [-1, 1]; soraax's
`decode` returns the unclamped frames (writers clip).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from soraax import weights
from soraax.vae import VAE_WAN21, VideoVAE, stage_plan
from soraax.wan.table import CONFIG, WEIGHTS, get_path, read_part_config, set_path, shape_after

# The config.json fields of a Wan 2.1 VAE that soraax maps; any other value of these is refused by name.
_FIXED = dict(is_residual=False, patch_size=None, attn_scales=[], in_channels=3, out_channels=3)


@dataclasses.dataclass(frozen=True)
class WanVAE:
    """A loaded Wan VAE: the module, its params as a tree of `weights.LazyTensor` (read when placed:
    `weights.place` into shardings, or `weights.materialise`; use as `{"params": ...}`), the config."""
    module: VideoVAE
    params: Any
    config: dict
    folder: str


def vae_from_config(config: dict, *, where: str = CONFIG, dtype=jnp.float32) -> VideoVAE:
    """diffusers' AutoencoderKLWan config -> VideoVAE with Wan 2.1's switches; anything soraax cannot
    express (Wan 2.2's residual blocks and patching, attention outside the mid block) is an error."""
    def get(key, default=None):
        return config.get(key, default)

    for key, value in _FIXED.items():
        if get(key, value) != value and not (key == "patch_size" and get(key) == 1):
            raise weights.WeightsError(f"{where}: {key}={get(key)!r} is not supported (Wan 2.1's VAE has "
                                       f"{key}={value!r}; Wan 2.2's VAE is not this one)")
    base, mults = int(get("base_dim", 96)), [int(m) for m in get("dim_mult", [1, 2, 4, 4])]
    if get("decoder_base_dim") not in (None, base):
        raise weights.WeightsError(f"{where}: decoder_base_dim={get('decoder_base_dim')} differs from "
                                   f"base_dim={base}; soraax's decoder mirrors its encoder")
    if mults[0] != 1:
        raise weights.WeightsError(f"{where}: dim_mult={mults} must start with 1 (the encoder's first level "
                                   "keeps conv_in's width)")
    temporal = tuple(bool(t) for t in get("temperal_downsample", [False, True, True]))
    if len(temporal) != len(mults) - 1:
        raise weights.WeightsError(f"{where}: temperal_downsample={list(temporal)} needs one entry per down "
                                   f"stage, {len(mults) - 1} for dim_mult={mults}")
    spatial_factor, temporal_factor = 2 ** (len(mults) - 1), 2 ** sum(temporal)
    for key, implied in (("scale_factor_spatial", spatial_factor), ("scale_factor_temporal", temporal_factor)):
        if get(key) not in (None, implied):
            raise weights.WeightsError(f"{where}: {key}={get(key)} but dim_mult and temperal_downsample give "
                                       f"{implied}")
    z_dim = int(get("z_dim", 16))
    mean, std = get("latents_mean"), get("latents_std")
    for key, value in (("latents_mean", mean), ("latents_std", std)):
        if value is not None and len(value) != z_dim:
            raise weights.WeightsError(f"{where}: {key} has {len(value)} values, z_dim is {z_dim}")
    fields = {**VAE_WAN21, "widths": tuple(base * m for m in mults),
              "num_res_blocks": int(get("num_res_blocks", 2)), "latent_channels": z_dim,
              "spatial_factor": spatial_factor, "temporal_factor": temporal_factor,
              "decoder_res_blocks": int(get("num_res_blocks", 2)) + 1, "temporal_stages": temporal}
    return VideoVAE(**fields, latent_mean=tuple(float(m) for m in mean) if mean is not None else 0.0,
                    latent_std=tuple(float(s) for s in std) if std is not None else 1.0, dtype=dtype)


def abstract_params(vae: VideoVAE):
    """The VAE's params as ShapeDtypeStructs (nothing allocated), boxes removed: what a loaded tree must match."""
    video = jnp.zeros((1, 1, vae.spatial_factor, vae.spatial_factor, 3))
    return nn.meta.unbox(jax.eval_shape(vae.init, jax.random.PRNGKey(0), video)["params"])


# --------------------------------------------------------------------------------------------- the table
# An entry: (soraax param path, diffusers name, diffusers shape, to_soraax, to_diffusers).

def _conv3d(path, name, c_in, c_out, kernel=(3, 3, 3)):
    return [(path + ("Conv_0", "kernel"), f"{name}.weight", (c_out, c_in, *kernel),
             lambda w: w.transpose(2, 3, 4, 1, 0), lambda k: k.transpose(4, 3, 0, 1, 2)),
            (path + ("Conv_0", "bias"), f"{name}.bias", (c_out,), None, None)]


def _conv2d(path, name, c_in, c_out):
    """Wan's per-frame 3x3 Conv2d, a (1, 3, 3) CausalConv3d here."""
    return [(path + ("Conv_0", "kernel"), f"{name}.weight", (c_out, c_in, 3, 3),
             lambda w: w.transpose(2, 3, 1, 0)[None], lambda k: k[0].transpose(3, 2, 0, 1)),
            (path + ("Conv_0", "bias"), f"{name}.bias", (c_out,), None, None)]


def _dense1x1(path, name, c_in, c_out):
    return [(path + ("kernel",), f"{name}.weight", (c_out, c_in, 1, 1),
             lambda w: w[:, :, 0, 0].T, lambda k: k.T[:, :, None, None]),
            (path + ("bias",), f"{name}.bias", (c_out,), None, None)]


def _gamma(path, name, channels, spatial_dims):
    shape = (channels,) + (1,) * spatial_dims
    return [(path + ("scale",), f"{name}.gamma", shape, lambda g: g.reshape(channels), lambda s: s.reshape(shape))]


def _res_block(path, name, c_in, c_out):
    entries = [*_gamma(path + ("FrameNorm_0",), f"{name}.norm1", c_in, 3),
               *_conv3d(path + ("CausalConv3d_0",), f"{name}.conv1", c_in, c_out),
               *_gamma(path + ("FrameNorm_1",), f"{name}.norm2", c_out, 3),
               *_conv3d(path + ("CausalConv3d_1",), f"{name}.conv2", c_out, c_out)]
    if c_in != c_out:
        entries += _conv3d(path + ("CausalConv3d_2",), f"{name}.conv_shortcut", c_in, c_out, (1, 1, 1))
    return entries


def _attention(path, name, channels):
    return [*_gamma(path + ("FrameNorm_0",), f"{name}.norm", channels, 2),
            *_dense1x1(path + ("to_qkv",), f"{name}.to_qkv", channels, 3 * channels),
            *_dense1x1(path + ("proj",), f"{name}.proj", channels, channels)]


def _mid_block(scope, name, channels, first_res: int):
    return [*_res_block((scope, f"ResBlock_{first_res}"), f"{name}.resnets.0", channels, channels),
            *_attention((scope, "FrameAttention_0"), f"{name}.attentions.0", channels),
            *_res_block((scope, f"ResBlock_{first_res + 1}"), f"{name}.resnets.1", channels, channels)]


def _check_layout(vae: VideoVAE) -> None:
    """The switches this table assumes; a VideoVAE without them has no Wan layout to load or save."""
    wanted = {k: v for k, v in VAE_WAN21.items()
              if k not in ("widths", "num_res_blocks", "latent_channels", "spatial_factor", "temporal_factor",
                           "norm_groups", "decoder_res_blocks", "temporal_stages")}
    wrong = {k: getattr(vae, k) for k, v in wanted.items() if getattr(vae, k) != v}
    if vae.decoder_res_blocks != vae.num_res_blocks + 1:
        wrong["decoder_res_blocks"] = vae.decoder_res_blocks
    if vae.patch_size != 1 or vae.shortcuts:
        wrong.update(patch_size=vae.patch_size, shortcuts=vae.shortcuts)
    if wrong:
        raise ValueError(f"this VideoVAE is not in Wan 2.1's layout: {wrong} (Wan's: {wanted}, "
                         "decoder_res_blocks = num_res_blocks + 1, patch_size 1, no shortcuts)")


def _entries(vae: VideoVAE):
    _check_layout(vae)
    widths, n, z = tuple(vae.widths), vae.num_res_blocks, vae.latent_channels
    levels = len(widths)
    plan = [t for _, t in _plan(vae)]
    entries = [*_conv3d(("encoder", "CausalConv3d_0"), "encoder.conv_in", 3, widths[0])]
    block, c_in = 0, widths[0]
    for level, width in enumerate(widths):
        for r in range(n):
            entries += _res_block(("encoder", f"ResBlock_{level * n + r}"), f"encoder.down_blocks.{block}",
                                  c_in, width)
            block, c_in = block + 1, width
        if level < levels - 1:
            path, name = ("encoder", f"SeparableDownsample_{level}"), f"encoder.down_blocks.{block}"
            entries += _conv2d(path + ("spatial_conv",), f"{name}.resample.1", width, width)
            if plan[level]:
                entries += _conv3d(path + ("time_conv",), f"{name}.time_conv", width, width, (3, 1, 1))
            block += 1
    entries += _mid_block("encoder", "encoder.mid_block", widths[-1], levels * n)
    entries += [*_gamma(("encoder", "FrameNorm_0"), "encoder.norm_out", widths[-1], 3),
                *_conv3d(("encoder", "CausalConv3d_1"), "encoder.conv_out", widths[-1], 2 * z),
                *_conv3d(("encoder", "quant_conv"), "quant_conv", 2 * z, 2 * z, (1, 1, 1)),
                *_conv3d(("decoder", "post_quant_conv"), "post_quant_conv", z, z, (1, 1, 1)),
                *_conv3d(("decoder", "CausalConv3d_0"), "decoder.conv_in", z, widths[-1])]
    entries += _mid_block("decoder", "decoder.mid_block", widths[-1], 0)
    res, c_in = 2, widths[-1]
    for up, level in enumerate(reversed(range(levels))):
        width, name = widths[level], f"decoder.up_blocks.{up}"
        for r in range(n + 1):
            entries += _res_block(("decoder", f"ResBlock_{res}"), f"{name}.resnets.{r}", c_in, width)
            res, c_in = res + 1, width
        if level > 0:
            path = ("decoder", f"SeparableUpsample_{up}")
            if plan[level - 1]:
                entries += _conv3d(path + ("time_conv",), f"{name}.upsamplers.0.time_conv", width, 2 * width,
                                   (3, 1, 1))
            entries += _conv2d(path + ("spatial_conv",), f"{name}.upsamplers.0.resample.1", width, width // 2)
            c_in = width // 2
    entries += [*_gamma(("decoder", "FrameNorm_0"), "decoder.norm_out", widths[0], 3),
                *_conv3d(("decoder", "CausalConv3d_1"), "decoder.conv_out", widths[0], 3)]
    return entries


def _plan(vae: VideoVAE):
    return stage_plan(vae.widths, vae.spatial_factor, vae.temporal_factor, vae.patch_size, vae.temporal_stages)


def expected_tensors(vae: VideoVAE) -> dict[str, tuple[int, ...]]:
    """diffusers name -> shape of every tensor a Wan-layout VideoVAE's checkpoint holds."""
    return {name: tuple(shape) for _, name, shape, _, _ in _entries(vae)}


# --------------------------------------------------------------------------------------------- load / save

def read_config(folder: str) -> dict:
    return read_part_config(folder, "vae")


def load_wan_vae(folder: str, *, dtype=jnp.float32) -> WanVAE:
    """A diffusers `vae/` folder (AutoencoderKLWan) -> WanVAE with lazy params; every tensor checked by name
    and shape, and a tensor the VAE has no place for is an error."""
    config = read_config(folder)
    vae = vae_from_config(config, where=os.path.join(folder, CONFIG), dtype=dtype)
    taker = weights.Taker(folder)
    params: dict = {}
    for path, name, shape, to_soraax, _ in _entries(vae):
        set_path(params, path, taker.take(name, shape_after(to_soraax, shape), to_soraax, source_shape=shape))
    taker.check_all_used()
    weights.check_tree(params, abstract_params(vae), folder)
    return WanVAE(vae, params, config, folder)


def diffusers_config(vae: VideoVAE) -> dict:
    """The AutoencoderKLWan config.json of a Wan-layout VideoVAE."""
    _check_layout(vae)
    base = vae.widths[0]
    if any(w % base for w in vae.widths):
        raise ValueError(f"widths {tuple(vae.widths)} are not multiples of the first, {base} (diffusers' "
                         "dim_mult)")
    z = vae.latent_channels

    def stats(value):
        return [float(v) for v in np.broadcast_to(np.asarray(value, np.float64), (z,))]
    return {"_class_name": "AutoencoderKLWan", "base_dim": base, "decoder_base_dim": None, "z_dim": z,
            "dim_mult": [w // base for w in vae.widths], "num_res_blocks": vae.num_res_blocks, "attn_scales": [],
            "temperal_downsample": [bool(t) for _, t in _plan(vae)], "dropout": 0.0,
            "latents_mean": stats(vae.latent_mean), "latents_std": stats(vae.latent_std), "is_residual": False,
            "in_channels": 3, "out_channels": 3, "patch_size": None,
            "scale_factor_temporal": vae.temporal_factor, "scale_factor_spatial": vae.spatial_factor}


def save_wan_vae(folder: str, vae: VideoVAE, params) -> None:
    """Writes `vae` with `params` (the param tree, or `{"params": tree}` as `init` returns it; boxed or not)
    as a diffusers `vae/` folder: config.json and one float32 diffusion_pytorch_model.safetensors."""
    from safetensors.numpy import save_file

    _check_layout(vae)
    tree = nn.meta.unbox(params)
    tree = tree.get("params", tree) if isinstance(tree, dict) else tree
    weights.check_tree(tree, abstract_params(vae), "the params to save")
    tensors = {}
    for path, name, shape, _, to_diffusers in _entries(vae):
        value = np.asarray(jax.device_get(get_path(tree, path)), np.float32)
        value = value if to_diffusers is None else np.asarray(to_diffusers(value))
        if value.shape != tuple(shape):
            raise ValueError(f"{name}: export gave shape {value.shape}, diffusers needs {tuple(shape)}")
        tensors[name] = np.ascontiguousarray(value)
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(folder, CONFIG), "w") as f:
        json.dump(diffusers_config(vae), f, indent=2)
        f.write("\n")
