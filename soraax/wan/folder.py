"""A diffusers Wan 2.1 text-to-video folder (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers, downloaded by the user):
the parts soraax loads from it, each lazily, each checked tensor by tensor."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax.numpy as jnp

from soraax.text.pretrained import PretrainedText
from soraax.text.t5 import load_t5_encoder
from soraax.wan.dit_weights import WanTransformer, load_wan_transformer

TRANSFORMER, TEXT_ENCODER, TOKENIZER, VAE = "transformer", "text_encoder", "tokenizer", "vae"


@dataclasses.dataclass(frozen=True)
class WanFolder:
    transformer: WanTransformer
    text: PretrainedText | None
    vae: Any  # soraax.wan.vae_weights.WanVAE, or None
    folder: str


def is_wan_folder(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, TRANSFORMER, "config.json"))


def wan_text_encoder_path(cfg) -> str:
    """`init_from/text_encoder` when the config starts from a Wan folder and uses a T5 encoder, else ''."""
    init_from = cfg.get("init_from", "")
    if init_from and cfg.model.get("text_encoder", "bytes") == "t5" and is_wan_folder(init_from):
        return os.path.join(init_from, TEXT_ENCODER)
    return ""


def wan_vae_path(cfg) -> str:
    """`init_from/vae` when the config starts from a Wan folder that has one and names no VAE run, else ''."""
    init_from = cfg.get("init_from", "")
    if init_from and not cfg.vae.checkpoint and os.path.isfile(os.path.join(init_from, VAE, "config.json")):
        return os.path.join(init_from, VAE)
    return ""


def load_wan_folder(folder: str, *, text: bool = True, vae: bool = True, **dit_overrides) -> WanFolder:
    """`folder/transformer`, and with `text` `folder/text_encoder` + `folder/tokenizer`, with `vae`
    `folder/vae`; all lazy. `dit_overrides` are the run's DiT choices (attn_impl, remat_policy, scan_layers,
    dtype)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"Wan folder {folder!r} does not exist")
    if not is_wan_folder(folder):
        raise FileNotFoundError(f"{folder} is not a diffusers Wan folder: it has no {TRANSFORMER}/config.json "
                                f"(expected {TRANSFORMER}/, {TEXT_ENCODER}/, {TOKENIZER}/, vae/)")
    transformer = load_wan_transformer(os.path.join(folder, TRANSFORMER), **dit_overrides)
    encoder = None
    if text:
        encoder = load_t5_encoder(os.path.join(folder, TEXT_ENCODER), dtype=dit_overrides.get("dtype", jnp.float32))
        if encoder.width != transformer.text_dim:
            raise ValueError(f"{folder}: the text encoder is {encoder.width} wide but the transformer's text_dim "
                             f"is {transformer.text_dim}: they are not parts of one model")
    autoencoder = None
    if vae:
        from soraax.wan.vae_weights import load_wan_vae
        autoencoder = load_wan_vae(os.path.join(folder, VAE))
    return WanFolder(transformer, encoder, autoencoder, folder)
