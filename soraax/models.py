"""From a config to the modules it names: the one place where config keys become module fields."""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import ml_collections

from soraax import patches
from soraax.cond_slots import slots_for
from soraax.dit import DiT
from soraax.text.encoders import TextModel, build_text_model
from soraax.vae import VideoVAE
from soraax.wan.folder import wan_text_encoder_path, wan_vae_path


@dataclass(frozen=True)
class Models:
    """The modules of one text-to-video model; params live elsewhere (TrainState / checkpoints, and for a
    frozen pretrained text encoder its own folder)."""
    dit: DiT
    text: TextModel
    vae: VideoVAE
    patch_size: tuple[int, int, int]

    @property
    def text_encoder(self):
        return self.text.module

    @property
    def tokenizer(self):
        return self.text.tokenizer

    @property
    def latent_channels(self) -> int:
        return self.vae.latent_channels


def build_vae(vae_cfg, latent_mean=0.0, latent_std=1.0) -> VideoVAE:
    return VideoVAE(widths=tuple(vae_cfg.widths), num_res_blocks=vae_cfg.num_res_blocks,
                    latent_channels=vae_cfg.latent_channels, spatial_factor=vae_cfg.spatial_factor,
                    temporal_factor=vae_cfg.temporal_factor, norm_groups=vae_cfg.norm_groups,
                    # .get: runs written before these keys existed keep their architecture
                    patch_size=vae_cfg.get("patch_size", 1), shortcuts=vae_cfg.get("shortcuts", False),
                    norm=vae_cfg.get("norm", "group"), norm_eps=vae_cfg.get("norm_eps", 1e-6),
                    # Wan 2.1's layout switches (soraax.vae.VAE_WAN21), all off by default
                    time_padding=vae_cfg.get("time_padding", "replicate"),
                    resample=vae_cfg.get("resample", "conv3d"), mid_attention=vae_cfg.get("mid_attention", False),
                    quant_convs=vae_cfg.get("quant_convs", False),
                    decoder_res_blocks=vae_cfg.get("decoder_res_blocks", None),
                    temporal_stages=None if vae_cfg.get("temporal_stages", None) is None
                    else tuple(bool(t) for t in vae_cfg.temporal_stages),
                    latent_mean=latent_mean, latent_std=latent_std)


def build(cfg: ml_collections.ConfigDict, latent_mean=0.0, latent_std=1.0) -> Models:
    m = cfg.model
    dtype = jnp.dtype(m.dtype)
    patch_size = tuple(int(p) for p in m.patch_size)
    patch_dim = patches.patch_dim(patch_size, cfg.vae.latent_channels)
    # A super-resolution stage (task "sr") encodes with its base's VAE and sees the base's latent upsampled
    # onto its own patch grid (soraax/cascade.py), so its conditioning tokens have the patch dim of its own.
    lowres_dim = patch_dim if cfg.task == "sr" else 0
    dit = DiT(patch_dim=patch_dim, lowres_dim=lowres_dim, width=m.width, depth=m.depth,
              heads=m.heads, mlp_ratio=m.mlp_ratio, pooled_text=m.get("pooled_text", False),
              cross_attn=m.get("cross_attn", True),
              attn_impl=m.attn_impl, remat_policy=m.remat_policy, scan_layers=m.scan_layers, dtype=dtype,
              matmul_dtype=m.get("matmul_dtype", m.dtype),
              # Wan 2.1's switches (soraax/dit.py); .get: configs without them are the DiT they always were.
              mlp_dim=m.get("mlp_dim", 0), freq_dim=m.get("freq_dim", 256),
              modulation=m.get("modulation", "per_block"), qk_norm=m.get("qk_norm", False),
              text_mlp=m.get("text_mlp", False), clip_position=m.get("clip_position", False),
              clip_position_pairs=m.get("clip_position_pairs", False),
              # adaLN once per (clip, t) of a row, not per token: the same function for ~1/3 fewer FLOPs.
              cond_slots=slots_for(cfg.max_segments) if m.get("adaln_slots", True) else 0,
              # Training clips hold at most data.token_budget tokens: attention skips the blocks none reaches.
              clip_tokens=int(cfg.data.token_budget) if m.get("local_attention", True) else 0)
    text = build_text_model(m, text_len=cfg.text_len, dtype=dtype, default_path=wan_text_encoder_path(cfg))
    vae_folder = wan_vae_path(cfg)
    if vae_folder:
        # A run from Wan weights encodes with Wan's VAE, its layout and latent statistics from its config.json.
        from soraax.wan.vae_weights import load_wan_vae
        vae = load_wan_vae(vae_folder).module
    else:
        vae = build_vae(cfg.vae, latent_mean, latent_std)
    return Models(dit=dit, text=text, vae=vae, patch_size=patch_size)
