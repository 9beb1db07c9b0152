"""Loading and checking configs: every problem is reported with its key, before anything compiles.

Configs are Python files whose `get_config()` returns an `ml_collections.ConfigDict`; command lines
override keys with `--config.KEY=VALUE` (ml_collections refuses unknown keys and wrong types itself).
`validate` checks what the types cannot: ranges, choices and how keys fit together.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

from soraax.attention import IMPLS
from soraax.dit import REMAT_POLICIES
from soraax.sharding import MESH_AXES

TASKS = ("dit", "vae")
SOURCES = ("synthetic", "folder", "tfds")
PACKERS = ("best_fit", "first_fit")
DTYPES = ("float32", "bfloat16")
VAE_NORMS = ("group", "rms")
TEXT_ENCODERS = ("bytes", "bert", "t5")


class ConfigError(ValueError):
    """A config key has a value that cannot work; the message names the key."""


def load(path: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
    """Reads `get_config()` from a config file and applies `{"a.b": value}` overrides (for scripts/tests)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} has no get_config()")
    cfg = module.get_config()
    for key, value in (overrides or {}).items():
        parent, _, leaf = key.rpartition(".")
        node = cfg
        for part in filter(None, parent.split(".")):
            if part not in node:
                raise ConfigError(f"unknown config key {key!r}")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"unknown config key {key!r}")
        node[leaf] = value
    return cfg


def _require(ok: bool, key: str, message: str):
    if not ok:
        raise ConfigError(f"config.{key}: {message}")


def _positive(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    _require(isinstance(node, (int, float)) and node > 0, key, f"must be > 0, got {node!r}")


def _validate_text_encoder(cfg) -> None:
    """The text encoder a config names exists and fits the text row: checked from its config and headers
    (nothing is read but them), so a missing package or folder is one line, before anything compiles."""
    m = cfg.model
    kind = m.get("text_encoder", "bytes")
    _require(kind in TEXT_ENCODERS, "model.text_encoder", f"must be one of {TEXT_ENCODERS}, got {kind!r}")
    _require(isinstance(m.get("text_cache", False), bool), "model.text_cache", "must be True or False")
    path = m.get("text_encoder_path", "")
    _require(not path or os.path.isdir(path), "model.text_encoder_path", f"folder {path!r} does not exist")
    if kind == "bytes":
        _require(not path, "model.text_encoder_path",
                 "is for a pretrained encoder (model.text_encoder 'bert' or 't5'); the byte encoder has no weights")
        _require(not m.get("text_cache", False), "model.text_cache",
                 "caches a frozen encoder's states; the byte encoder is trained with the DiT")
        return
    from soraax.text.encoders import build_text_model
    from soraax.weights import WeightsError
    try:
        text = build_text_model(m, text_len=cfg.text_len, dtype=m.dtype)
    except (FileNotFoundError, ValueError, KeyError, WeightsError) as error:
        raise ConfigError(f"config.model.text_encoder={kind!r}: {error}") from error
    limit = getattr(text.module, "max_positions", None)
    _require(limit is None or cfg.text_len <= limit, "text_len",
             f"{cfg.text_len} text tokens a row exceed the {kind} encoder's {limit} positions")


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Raises ConfigError naming the first key that cannot work; returns cfg unchanged otherwise."""
    _require(cfg.task in TASKS, "task", f"must be one of {TASKS}, got {cfg.task!r}")
    for key in ("total_steps", "batch_size", "seq_len", "text_len", "max_segments", "learning_rate",
                "log_every", "checkpoint_every", "keep_checkpoints", "model.width", "model.depth",
                "model.heads", "model.text_width", "model.text_depth", "model.text_heads",
                "vae.train_steps", "vae.batch_size", "vae.learning_rate", "data.token_budget",
                "data.max_frames", "data.packing_bins", "diffusion.base_tokens", "diffusion.sample_steps"):
        _positive(cfg, key)
    _require(cfg.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {cfg.warmup_steps}")
    _require(0.0 <= cfg.ema_decay < 1.0, "ema_decay", f"must be in [0, 1), got {cfg.ema_decay}")
    _require(cfg.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables clipping)")
    for axis in MESH_AXES:
        size = cfg.mesh[axis]
        _require(isinstance(size, int) and (size >= 1 or size == -1), f"mesh.{axis}",
                 f"must be a positive int or -1 (the rest of the devices), got {size!r}")
    if "dcn" in cfg.mesh:
        for axis in MESH_AXES:
            size = cfg.mesh.dcn[axis]
            _require(isinstance(size, int) and size >= 1, f"mesh.dcn.{axis}",
                     f"must be a positive int (slices this axis spans), got {size!r}")
    m = cfg.model
    _require(m.attn_impl in IMPLS, "model.attn_impl", f"must be one of {IMPLS}, got {m.attn_impl!r}")
    _require(m.remat_policy in REMAT_POLICIES, "model.remat_policy",
             f"must be one of {tuple(REMAT_POLICIES)}, got {m.remat_policy!r}")
    _require(m.dtype in DTYPES, "model.dtype", f"must be one of {DTYPES}, got {m.dtype!r}")
    _require(m.width % m.heads == 0, "model.width", f"{m.width} is not divisible by model.heads={m.heads}")
    head_dim = m.width // m.heads
    _require(head_dim % 2 == 0 and head_dim >= 6, "model.heads",
             f"width/heads = {head_dim} must be even and >= 6 for 3D rotary embeddings")
    _require(m.text_width % m.text_heads == 0, "model.text_width",
             f"{m.text_width} is not divisible by model.text_heads={m.text_heads}")
    _validate_text_encoder(cfg)
    _require(len(m.patch_size) == 3 and all(int(p) >= 1 for p in m.patch_size), "model.patch_size",
             f"must be three positive ints (time, height, width), got {tuple(m.patch_size)}")
    v = cfg.vae
    for key in ("spatial_factor", "temporal_factor"):
        f = v[key]
        _require(f >= 1 and f & (f - 1) == 0, f"vae.{key}", f"must be a power of two, got {f}")
    patch = v.get("patch_size", 1)
    _require(isinstance(patch, int) and patch >= 1 and patch & (patch - 1) == 0 and patch <= v.spatial_factor,
             "vae.patch_size", f"must be a power of two <= vae.spatial_factor={v.spatial_factor}, got {patch!r}")
    _require(v.get("norm", "group") in VAE_NORMS, "vae.norm", f"must be one of {VAE_NORMS}, got {v.get('norm')!r}")
    _require(not v.get("shortcuts", False) or v.latent_channels >= 3, "vae.shortcuts",
             f"the pixel shortcut needs vae.latent_channels >= 3, got {v.latent_channels}")
    if v.get("shortcuts", False):
        sizes = [*v.widths, v.latent_channels]
        _require(all(a % b == 0 or b % a == 0 for a, b in zip(sizes, sizes[1:])), "vae.widths",
                 f"with vae.shortcuts each of widths {tuple(v.widths)} and then latent_channels={v.latent_channels} "
                 "must divide its neighbour or be a multiple of it (shortcuts average or repeat channels)")
    _require(len(v.crop) == 3, "vae.crop", f"must be (frames, height, width), got {tuple(v.crop)}")
    _require((v.crop[0] - 1) % v.temporal_factor == 0, "vae.crop",
             f"frames {v.crop[0]} must be 1 + {v.temporal_factor}*n")
    _require(v.crop[1] % v.spatial_factor == 0 and v.crop[2] % v.spatial_factor == 0, "vae.crop",
             f"height and width must be multiples of vae.spatial_factor={v.spatial_factor}")
    d = cfg.data
    _require(d.source in SOURCES, "data.source", f"must be one of {SOURCES}, got {d.source!r}")
    _require(d.source != "folder" or bool(d.manifest), "data.manifest", "is required when data.source='folder'")
    _require(d.source != "folder" or os.path.isfile(d.manifest), "data.manifest",
             f"file {d.manifest!r} does not exist")
    _require(d.source != "tfds" or bool(d.tfds_dir and d.tfds_name), "data.tfds_dir",
             "data.tfds_dir and data.tfds_name are required when data.source='tfds'")
    _require(d.packing in PACKERS, "data.packing", f"must be one of {PACKERS}, got {d.packing!r}")
    _require(0.0 <= d.detailed_caption_rate <= 1.0, "data.detailed_caption_rate", "must be in [0, 1]")
    _require(0.0 <= cfg.diffusion.text_dropout < 1.0, "diffusion.text_dropout", "must be in [0, 1)")
    _require(d.workers >= 0, "data.workers", "must be >= 0")
    _require(d.token_budget <= cfg.seq_len, "data.token_budget",
             f"{d.token_budget} tokens a clip cannot fit a packed row of seq_len={cfg.seq_len}")
    return cfg
