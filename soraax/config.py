"""Loading and checking configs: every problem is reported with its key, before anything compiles.

Configs are Python files whose `get_config()` returns an `ml_collections.ConfigDict`; command lines
override keys with `--config.KEY=VALUE` (ml_collections refuses unknown keys and wrong types itself).
`validate` checks what those rules let through (None, bools for ints, nan, tuples of the wrong length)
and what types cannot say: ranges, choices, how keys fit together and, given a device count, the mesh.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import os

import ml_collections

from soraax import curriculum, sharding
from soraax.attention import IMPLS
from soraax.cascade import UPSAMPLE_METHODS, sr_budget
from soraax.data.synthetic import IMAGE_FRACTION
from soraax.dit import REMAT_POLICIES
from soraax.matmul import MATMUL_DTYPES
from soraax.sharding import MESH_AXES
from soraax.vae import RESAMPLES, TIME_PADDINGS, stage_plan  # stage_plan: how widths follow from the factors

TASKS = ("dit", "vae", "sr")
SOURCES = ("synthetic", "folder", "tfds")
PACKERS = ("best_fit", "first_fit")
DTYPES = ("float32", "bfloat16")
VAE_NORMS = ("group", "rms")
TEXT_ENCODERS = ("bytes", "bert", "t5")


class ConfigError(ValueError):
    """A config key has a value that cannot work; the message names the key."""


def load(path: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
    """Reads `get_config()` from a config file and applies `{"a.b": value}` overrides (for scripts/tests).

    An override must name an existing key and keep its type (ml_collections' rule, as on the command line);
    either mistake is a ConfigError naming the key.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} has no get_config()")
    cfg = module.get_config()
    for key, value in (overrides or {}).items():
        _override(cfg, key, value)
    return cfg


def _override(cfg: ml_collections.ConfigDict, key: str, value) -> None:
    parent, _, leaf = key.rpartition(".")
    node = cfg
    for part in filter(None, parent.split(".")):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ConfigError(f"unknown config key {key!r}")
        node = node[part]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise ConfigError(f"unknown config key {key!r}")
    old = node[leaf]
    if isinstance(old, ml_collections.ConfigDict):
        raise ConfigError(f"config.{key} is a group of keys; override them one at a time, "
                          f"e.g. config.{key}.{next(iter(old.keys()), 'KEY')}=...")
    try:
        node[leaf] = value
    except (TypeError, ValueError) as error:  # ml_collections keeps each key's type
        raise ConfigError(f"config.{key}: {value!r} ({type(value).__name__}) cannot replace {old!r} "
                          f"({type(old).__name__})") from error


def _require(ok: bool, key: str, message: str):
    if not ok:
        raise ConfigError(f"config.{key}: {message}")


# ------------------------------------------------------------------------------------- typed reads

_REQUIRED = object()


def _value(cfg, key: str, default=_REQUIRED):
    node = cfg
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            _require(default is not _REQUIRED, key, "is missing; the config file must set it (see configs/tiny.py)")
            return default
        node = node[part]
    return node


def _is_int(value) -> bool:
    # A bool is an int to Python, but `seq_len=True` is a typo, not 1.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int(cfg, key: str, minimum: int = 1, default=_REQUIRED) -> int:
    value = _value(cfg, key, default)
    _require(_is_int(value), key, f"must be an int, got {value!r}")
    _require(value >= minimum, key, f"must be {'> 0' if minimum == 1 else f'>= {minimum}'}, got {value}")
    return int(value)


def _number(cfg, key: str, low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
            high_open: bool = False, default=_REQUIRED) -> float:
    """A finite real in the interval; nan and inf are refused everywhere (nan compares False to any bound)."""
    value = _value(cfg, key, default)
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    _require(real and (_is_int(value) or math.isfinite(value)), key, f"must be a finite number, got {value!r}")
    inside = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if high == math.inf:
        interval = f"{'>' if low_open else '>='} {low:g}"
    else:
        interval = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    _require(inside, key, f"must be {interval}, got {value!r}")
    return float(value)


def _choice(cfg, key: str, choices, default=_REQUIRED) -> str:
    value = _value(cfg, key, default)
    _require(isinstance(value, str) and value in choices, key, f"must be one of {tuple(choices)}, got {value!r}")
    return value


def _bool(cfg, key: str, default=_REQUIRED) -> bool:
    value = _value(cfg, key, default)
    _require(isinstance(value, bool), key, f"must be True or False, got {value!r}")
    return value


def _text(cfg, key: str, default=_REQUIRED) -> str:
    value = _value(cfg, key, default)
    _require(isinstance(value, str), key, f"must be a str ('' for none), got {value!r}")
    return value


def _ints(cfg, key: str, length: int | None, what: str) -> tuple[int, ...]:
    """A tuple (or list) of positive ints, of `length` if given."""
    value = _value(cfg, key)
    ok = (isinstance(value, (tuple, list)) and len(value) >= 1 and (length is None or len(value) == length)
          and all(_is_int(v) and v >= 1 for v in value))
    _require(ok, key, f"must be {what}, got {tuple(value) if isinstance(value, (tuple, list)) else value!r}")
    return tuple(int(v) for v in value)


def _aspect_ratios(cfg, key: str) -> None:
    """Absent, or a non-empty tuple of (width, height) pairs of positive ints."""
    value = _value(cfg, key, None)
    ok = value is None or (isinstance(value, (tuple, list)) and len(value) >= 1 and all(
        isinstance(pair, (tuple, list)) and len(pair) == 2 and all(_is_int(v) and v >= 1 for v in pair)
        for pair in value))
    _require(ok, key, f"must be a tuple of (width, height) pairs of positive ints, e.g. ((1, 1), (16, 9)), "
                      f"got {value!r}")


def _validate_curriculum(cfg) -> None:
    """curriculum.* (soraax/curriculum.py): its keys known, its values as valid as the keys they override."""
    group = _value(cfg, "curriculum", None)
    if group is None:
        return
    for key in group:
        _require(key == "steps" or key in curriculum.OVERRIDES, f"curriculum.{key}",
                 f"is not a curriculum key; those are steps, {', '.join(curriculum.OVERRIDES)}")
    _int(cfg, "curriculum.steps", minimum=0, default=0)
    _aspect_ratios(cfg, "curriculum.aspect_ratios")
    _int(cfg, "curriculum.min_frames", minimum=5, default=5)
    _number(cfg, "curriculum.image_fraction", 0.0, 1.0, default=0.0)
    _number(cfg, "curriculum.high_noise_rate", 0.0, 1.0, default=0.0)
    steps = curriculum.steps(cfg)  # 0 for every task but the text-to-video DiT's
    if steps == 0:
        return
    _require(_value(cfg, "data.source") == "synthetic", "curriculum.steps",
             f"the curriculum draws its clips from the synthetic source; with data.source="
             f"{_value(cfg, 'data.source')!r} set curriculum.steps=0")
    _require(steps < _value(cfg, "total_steps"), "curriculum.steps",
             f"{steps} leaves none of total_steps={_value(cfg, 'total_steps')} to the configured data: set it "
             f"below total_steps, or 0 for no curriculum")


# ------------------------------------------------------------------------------------------ checks

_POSITIVE_INTS = (
    "total_steps", "batch_size", "seq_len", "text_len", "max_segments", "log_every", "checkpoint_every",
    "keep_checkpoints", "model.width", "model.depth", "model.heads", "model.text_width", "model.text_depth",
    "model.text_heads", "vae.train_steps", "vae.batch_size", "vae.latent_channels", "vae.num_res_blocks",
    "vae.norm_groups", "vae.spatial_factor", "vae.temporal_factor", "data.max_frames", "data.packing_bins",
    "data.num_examples", "diffusion.base_tokens", "diffusion.sample_steps")


def _validate_text_encoder(cfg) -> None:
    """The text encoder a config names exists and fits the text row: checked from its config and headers
    (nothing is read but them), so a missing package or folder is one line, before anything compiles."""
    m = cfg.model
    kind = _choice(cfg, "model.text_encoder", TEXT_ENCODERS, default="bytes")
    text_cache = _bool(cfg, "model.text_cache", default=False)
    path = _text(cfg, "model.text_encoder_path", default="")
    _require(not path or os.path.isdir(path), "model.text_encoder_path", f"folder {path!r} does not exist")
    layers = _value(cfg, "model.text_layers", default=(-1,))
    _require(isinstance(layers, (tuple, list)) and layers and all(_is_int(i) for i in layers), "model.text_layers",
             f"must be a non-empty tuple of hidden-state indices (0: the embeddings, -1: the last layer), "
             f"got {layers!r}")
    from soraax.text.encoders import build_text_model, hidden_layers
    try:
        hidden_layers(m)
    except ValueError as error:
        raise ConfigError(f"config.model.text_layers: {error}") from error
    if kind == "bytes":
        _require(not path, "model.text_encoder_path",
                 "is for a pretrained encoder (model.text_encoder 'bert' or 't5'); the byte encoder has no weights")
        _require(not text_cache, "model.text_cache",
                 "caches a frozen encoder's states; the byte encoder is trained with the DiT")
        return
    from soraax.wan.folder import wan_text_encoder_path
    from soraax.weights import WeightsError
    try:
        text = build_text_model(m, text_len=cfg.text_len, dtype=m.dtype, default_path=wan_text_encoder_path(cfg))
    except (FileNotFoundError, ValueError, KeyError, WeightsError) as error:
        raise ConfigError(f"config.model.text_encoder={kind!r}: {error}") from error
    if kind == "bert":
        from soraax.text.bert import check_hidden_layers
        try:
            check_hidden_layers(layers, text.module.depth)
        except ValueError as error:
            raise ConfigError(f"config.model.text_layers={tuple(layers)!r}: {error}") from error
    limit = getattr(text.module, "max_positions", None)
    _require(limit is None or cfg.text_len <= limit, "text_len",
             f"{cfg.text_len} text tokens a row exceed the {kind} encoder's {limit} positions")


def _validate_types_and_ranges(cfg) -> None:
    """Every key the code reads holds a value of its type in its range (None is never one)."""
    _choice(cfg, "task", TASKS)
    seed = _int(cfg, "seed", minimum=0)
    _require(seed < 2**32, "seed", f"must be < 2**32 (Grain's seeds are 32-bit), got {seed}")
    for key in _POSITIVE_INTS:
        _int(cfg, key)
    _int(cfg, "max_nonfinite_steps", default=20)
    _int(cfg, "warmup_steps", minimum=0)
    _int(cfg, "data.workers", minimum=0)
    budget = _value(cfg, "data.token_budget")
    _require(_is_int(budget) and budget >= 1, "data.token_budget",
             f"must be an int >= 1 (a clip costs at least one patch, one token), got {budget!r}")
    for key in ("learning_rate", "vae.learning_rate", "model.mlp_ratio", "diffusion.t_std"):
        _number(cfg, key, 0.0, low_open=True)
    for key in ("weight_decay", "vae.kl_weight"):
        _number(cfg, key, 0.0)
    grad_clip = _value(cfg, "grad_clip")
    _require(isinstance(grad_clip, numbers.Real) and not isinstance(grad_clip, bool) and grad_clip >= 0
             and (_is_int(grad_clip) or math.isfinite(grad_clip)), "grad_clip",
             f"must be >= 0 (0 disables clipping), got {grad_clip!r}")
    _number(cfg, "ema_decay", 0.0, 1.0, high_open=True)
    _number(cfg, "diffusion.text_dropout", 0.0, 1.0, high_open=True)
    _number(cfg, "data.detailed_caption_rate", 0.0, 1.0)
    kinds = ("first_frame", "past_frames", "future_frames", "ends")
    rates = {kind: _number(cfg, f"data.cond_{kind}_rate", 0.0, 1.0, default=0.0) for kind in kinds}
    # Named by the largest share (the likeliest to have been set), the message giving all four.
    _require(sum(rates.values()) <= 1.0, f"data.cond_{max(rates, key=rates.get)}_rate",
             "the four data.cond_*_rate keys are shares of the clips and must sum to at most 1, got "
             + " + ".join(f"{kind} {rate:g}" for kind, rate in rates.items()) + f" = {sum(rates.values()):g}")
    for key in ("diffusion.t_mean", "diffusion.guidance"):
        _number(cfg, key)
    _bool(cfg, "model.scan_layers")
    pooled = _bool(cfg, "model.pooled_text", default=False)
    if not _bool(cfg, "model.cross_attn", default=True):
        _require(pooled, "model.cross_attn",
                 "False leaves model.pooled_text as the caption's only way in; with both off the model "
                 "never sees its caption: set model.pooled_text=True")
    _bool(cfg, "model.adaln_slots", default=True)
    _bool(cfg, "model.local_attention", default=True)
    _bool(cfg, "model.clip_position", default=False)
    if _bool(cfg, "model.clip_position_pairs", default=False):
        _require(_value(cfg, "model.clip_position", False), "model.clip_position_pairs",
                 "multiplies model.clip_position's per-axis features, so it needs model.clip_position=True")
    _number(cfg, "diffusion.high_noise_rate", 0.0, 1.0, default=0.0)
    _number(cfg, "diffusion.high_noise_min", 0.0, 1.0, high_open=True, default=0.9)
    _int(cfg, "data.synthetic_min_frames", minimum=5, default=5)   # above data.max_frames: max_frames only
    _aspect_ratios(cfg, "data.synthetic_aspect_ratios")
    _number(cfg, "data.synthetic_image_fraction", 0.0, 1.0, default=IMAGE_FRACTION)
    for key in ("data.manifest", "data.tfds_dir", "data.tfds_name", "vae.checkpoint"):
        _text(cfg, key)


def _validate_mesh(cfg) -> None:
    sizes = {}
    for axis in MESH_AXES:
        size = sizes[axis] = _value(cfg, f"mesh.{axis}")
        _require(_is_int(size) and (size >= 1 or size == -1), f"mesh.{axis}",
                 f"must be a positive int or -1 (the rest of the devices), got {size!r}")
    _require(list(sizes.values()).count(-1) <= 1, "mesh",
             f"at most one axis may be -1 (the rest of the devices), got {sizes}")
    if "dcn" in cfg.mesh:
        for axis in MESH_AXES:
            size = _value(cfg, f"mesh.dcn.{axis}")
            _require(_is_int(size) and size >= 1, f"mesh.dcn.{axis}",
                     f"must be a positive int (slices this axis spans), got {size!r}")


def validate_devices(cfg, num_devices: int) -> tuple[int, ...]:
    """The mesh's axis sizes on `num_devices` devices; ConfigError if config.mesh cannot use exactly
    them or the batch rows (the DiT's, and the VAE's if this run trains one) do not split over its data x
    fsdp axes. A validated config is assumed."""
    dcn = sharding.dcn_shape(cfg.mesh)
    slices = math.prod(dcn)
    _require(num_devices % slices == 0, "mesh.dcn",
             f"{dict(zip(MESH_AXES, dcn))} spans {slices} slices, which do not divide the {num_devices} devices")
    try:
        per_slice = sharding.mesh_shape(cfg.mesh, num_devices // slices)
    except ValueError as error:  # its message starts "config.mesh"
        raise ConfigError(f"{error} (set config.mesh.* to sizes whose product is the device count, "
                          "or one of them to -1)") from error
    shape = tuple(a * b for a, b in zip(per_slice, dcn))
    axes = dict(zip(MESH_AXES, shape))
    splits = axes["data"] * axes["fsdp"]
    batches = ["batch_size"] if cfg.task in ("dit", "sr") else []
    if cfg.task == "vae" or not cfg.vae.checkpoint:  # a DiT config without a VAE trains one first
        batches.append("vae.batch_size")
    for key in batches:
        rows = _value(cfg, key)
        _require(rows % splits == 0, key, f"{rows} rows do not split over data x fsdp = {splits} devices of mesh "
                 f"{axes}; use a multiple of {splits}")
    return shape


def validate(cfg: ml_collections.ConfigDict, num_devices: int | None = None) -> ml_collections.ConfigDict:
    """Raises ConfigError naming the first key that cannot work; returns cfg unchanged otherwise.

    With `num_devices` (a training run passes jax.device_count()) also checks that config.mesh fits
    exactly that many devices; without it only what holds on any machine (a TPU topology compiled from
    a CPU host has devices of its own).
    """
    _validate_types_and_ranges(cfg)
    _validate_mesh(cfg)
    m = cfg.model
    _choice(cfg, "model.attn_impl", IMPLS)
    _choice(cfg, "model.remat_policy", tuple(REMAT_POLICIES))
    _choice(cfg, "model.dtype", DTYPES)
    _choice(cfg, "model.matmul_dtype", MATMUL_DTYPES, default=m.dtype)
    _require(m.width % m.heads == 0, "model.width", f"{m.width} is not divisible by model.heads={m.heads}")
    head_dim = m.width // m.heads
    _require(head_dim % 2 == 0 and head_dim >= 6, "model.heads",
             f"width/heads = {head_dim} must be even and >= 6 for 3D rotary embeddings")
    _require(int(m.width * m.mlp_ratio) >= 1, "model.mlp_ratio",
             f"model.width * mlp_ratio = {m.width * m.mlp_ratio:g} leaves the MLP without a unit")
    _require(m.text_width % m.text_heads == 0, "model.text_width",
             f"{m.text_width} is not divisible by model.text_heads={m.text_heads}")
    _require(cfg.text_len >= 2, "text_len", f"must hold at least a caption's BOS and EOS (>= 2), got {cfg.text_len}")
    _require(cfg.max_segments <= cfg.seq_len, "max_segments",
             f"{cfg.max_segments} clips a row cannot fit seq_len={cfg.seq_len} tokens (a clip takes at least one)")
    _validate_text_encoder(cfg)
    _validate_wan(cfg)
    _ints(cfg, "model.patch_size", 3, "three positive ints (time, height, width)")
    v = cfg.vae
    for key in ("spatial_factor", "temporal_factor"):
        f = v[key]
        _require(f >= 1 and f & (f - 1) == 0, f"vae.{key}", f"must be a power of two, got {f}")
    patch = _value(cfg, "vae.patch_size", 1)
    _require(_is_int(patch) and patch >= 1 and patch & (patch - 1) == 0 and patch <= v.spatial_factor,
             "vae.patch_size", f"must be a power of two <= vae.spatial_factor={v.spatial_factor}, got {patch!r}")
    norm = _choice(cfg, "vae.norm", VAE_NORMS, default="group")
    shortcuts = _bool(cfg, "vae.shortcuts", default=False)
    _require(not shortcuts or v.latent_channels >= 3, "vae.shortcuts",
             f"the pixel shortcut needs vae.latent_channels >= 3, got {v.latent_channels}")
    widths = _ints(cfg, "vae.widths", None, "a tuple of positive ints (channels per resolution level)")
    # Wan 2.1's layout switches (soraax.vae.VAE_WAN21); absent keys keep soraax's own VAE.
    _choice(cfg, "vae.time_padding", TIME_PADDINGS, default="replicate")
    resample = _choice(cfg, "vae.resample", RESAMPLES, default="conv3d")
    _require(not shortcuts or resample == "conv3d", "vae.shortcuts", "the shortcuts need vae.resample='conv3d'")
    _require(resample != "separable" or all(w % 2 == 0 for w in widths[1:]), "vae.widths",
             f"separable resampling halves the channels of each upsample: widths {widths} must be even after "
             "the first")
    for key in ("vae.mid_attention", "vae.quant_convs"):
        _bool(cfg, key, default=False)
    _number(cfg, "vae.norm_eps", 0.0, default=1e-6)
    if _value(cfg, "vae.decoder_res_blocks", None) is not None:
        _int(cfg, "vae.decoder_res_blocks")
    temporal_stages = _value(cfg, "vae.temporal_stages", None)
    _require(temporal_stages is None or (isinstance(temporal_stages, (tuple, list))
                                         and all(isinstance(t, bool) for t in temporal_stages)),
             "vae.temporal_stages", f"must be None or a tuple of bools (one a down stage), got {temporal_stages!r}")
    if shortcuts:
        sizes = [*widths, v.latent_channels]
        _require(all(a % b == 0 or b % a == 0 for a, b in zip(sizes, sizes[1:])), "vae.widths",
                 f"with vae.shortcuts each of widths {widths} and then latent_channels={v.latent_channels} "
                 "must divide its neighbour or be a multiple of it (shortcuts average or repeat channels)")
    try:
        stage_plan(widths, v.spatial_factor, v.temporal_factor, patch, temporal_stages)
    except ValueError as error:
        raise ConfigError(f"config.vae.widths: {error}") from error
    _require(norm != "group" or all(w % v.norm_groups == 0 for w in widths), "vae.norm_groups",
             f"GroupNorm needs every width of vae.widths={widths} divisible by norm_groups={v.norm_groups}")
    crop = _ints(cfg, "vae.crop", 3, "(frames, height, width)")
    _require((crop[0] - 1) % v.temporal_factor == 0, "vae.crop",
             f"frames {crop[0]} must be 1 + {v.temporal_factor}*n")
    _require(crop[1] % v.spatial_factor == 0 and crop[2] % v.spatial_factor == 0, "vae.crop",
             f"height and width must be multiples of vae.spatial_factor={v.spatial_factor}")
    d = cfg.data
    _choice(cfg, "data.source", SOURCES)
    _require(d.source != "folder" or bool(d.manifest), "data.manifest", "is required when data.source='folder'")
    _require(d.source != "folder" or os.path.isfile(d.manifest), "data.manifest",
             f"file {d.manifest!r} does not exist")
    _require(d.source != "tfds" or bool(d.tfds_dir and d.tfds_name), "data.tfds_dir",
             "data.tfds_dir and data.tfds_name are required when data.source='tfds'")
    _choice(cfg, "data.packing", PACKERS)
    _require(d.token_budget <= cfg.seq_len, "data.token_budget",
             f"{d.token_budget} tokens a clip cannot fit a packed row of seq_len={cfg.seq_len}")
    _validate_curriculum(cfg)
    if cfg.task == "sr":
        _validate_sr(cfg)
    if num_devices is not None:
        validate_devices(cfg, num_devices)
    return cfg


def _validate_wan(cfg) -> None:
    """Wan 2.1's DiT switches (soraax/dit.py) and `init_from`, a diffusers Wan folder whose transformer must be
    the DiT model.* describes: checked from its config.json, before anything is read or compiled."""
    from soraax.dit import MODULATIONS
    _choice(cfg, "model.modulation", MODULATIONS, default="per_block")
    _bool(cfg, "model.qk_norm", default=False)
    _bool(cfg, "model.text_mlp", default=False)
    _int(cfg, "model.mlp_dim", minimum=0, default=0)
    freq_dim = _int(cfg, "model.freq_dim", minimum=2, default=256)
    _require(freq_dim % 2 == 0, "model.freq_dim", f"must be even (cos and sin halves), got {freq_dim}")
    pad = _int(cfg, "model.text_pad_len", minimum=0, default=0)
    _require(pad <= cfg.text_len, "model.text_pad_len",
             f"{pad} text slots a caption cannot fit text_len={cfg.text_len}")
    init_from = _text(cfg, "init_from", default="")
    if not init_from:
        return
    from soraax import patches
    from soraax.wan import dit_weights
    from soraax.wan.folder import TRANSFORMER, is_wan_folder
    _require(cfg.task == "dit", "init_from", f"starts a text-to-video DiT from Wan weights; task is {cfg.task!r}")
    _require(is_wan_folder(init_from), "init_from",
             f"{init_from!r} is not a diffusers Wan folder (it needs {TRANSFORMER}/config.json)")
    try:
        wan, patch_size, channels, text_dim = dit_weights.dit_from_config(
            dit_weights.read_config(os.path.join(init_from, TRANSFORMER)))
    except ValueError as error:
        raise ConfigError(f"config.init_from: {error}") from error
    m = cfg.model
    ours = {"model.width": m.width, "model.depth": m.depth, "model.heads": m.heads,
            "model.mlp_dim": m.get("mlp_dim", 0) or int(m.width * m.mlp_ratio), "model.freq_dim": freq_dim,
            "model.patch_size": tuple(m.patch_size), "vae.latent_channels": cfg.vae.latent_channels,
            "model.modulation": m.get("modulation", "per_block"), "model.qk_norm": m.get("qk_norm", False),
            "model.text_mlp": m.get("text_mlp", False)}
    theirs = {"model.width": wan.width, "model.depth": wan.depth, "model.heads": wan.heads,
              "model.mlp_dim": wan.mlp_dim, "model.freq_dim": wan.freq_dim, "model.patch_size": patch_size,
              "vae.latent_channels": channels, "model.modulation": wan.modulation, "model.qk_norm": wan.qk_norm,
              "model.text_mlp": wan.text_mlp}
    for key in ours:
        _require(ours[key] == theirs[key], key, f"is {ours[key]!r} but the Wan transformer in {init_from} has "
                 f"{theirs[key]!r} (configs/wan21_t2v_*.py set every key to its checkpoint)")
    _require(patches.patch_dim(patch_size, channels) == wan.patch_dim, "model.patch_size", "does not fit the latent")
    _validate_wan_vae(cfg)


def _validate_wan_vae(cfg) -> None:
    """vae.* must describe init_from's vae/ (when it has one and no vae.checkpoint is named): the run encodes
    with that VAE, while everything made from the config alone (latent shapes for --dry_run/--compile_only, a
    later `models.build` without the folder) follows vae.*, so the two must agree."""
    import json

    from soraax.models import build_vae
    from soraax.wan.folder import wan_vae_path
    from soraax.wan.vae_weights import CONFIG, vae_from_config
    folder = wan_vae_path(cfg)
    if not folder:
        return
    try:
        with open(os.path.join(folder, CONFIG)) as f:
            theirs = vae_from_config(json.load(f), where=os.path.join(folder, CONFIG))
    except ValueError as error:
        raise ConfigError(f"config.init_from: {error}") from error
    ours = build_vae(cfg.vae)
    # Every layout field; the latent statistics come from the folder itself, the dtype from the run.
    for field in ("widths", "num_res_blocks", "decoder_res_blocks", "latent_channels", "spatial_factor",
                  "temporal_factor", "temporal_stages", "norm", "norm_groups", "norm_eps", "time_padding",
                  "resample", "mid_attention", "quant_convs", "patch_size", "shortcuts"):
        a, b = getattr(ours, field), getattr(theirs, field)
        _require(a == b, f"vae.{field}", f"is {a!r} but the Wan VAE in {folder} has {b!r} "
                 f"(configs/wan21_t2v_*.py describe Wan 2.1's VAE)")


def _validate_sr(cfg) -> None:
    """A super-resolution stage (soraax/cascade.py): its factors, noise augmentation and base VAE."""
    spatial = _int(cfg, "sr.spatial_factor")
    temporal = _int(cfg, "sr.temporal_factor")
    _require(spatial > 1 or temporal > 1, "sr.spatial_factor",
             "and sr.temporal_factor are both 1: the stage would not raise the resolution; set one to 2")
    _require(temporal == 1 or cfg.model.patch_size[0] == 1, "sr.temporal_factor",
             f"temporal SR makes 1 + {temporal}*n latent frames, which fill whole time patches only with "
             f"model.patch_size[0] == 1, got {cfg.model.patch_size[0]}")
    _choice(cfg, "sr.upsample", UPSAMPLE_METHODS)
    max_aug = _number(cfg, "sr.max_aug", 0.0, 1.0, high_open=True)
    _number(cfg, "sr.sample_aug", 0.0, max_aug)  # a level the stage was trained at
    _require(bool(cfg.vae.checkpoint), "vae.checkpoint",
             "an SR stage encodes with its base run's frozen VAE and samples in its latents: set it to that "
             "VAE's workdir (e.g. runs/tiny/vae)")
    for kind in ("first_frame", "past_frames", "future_frames", "ends"):
        _require(_value(cfg, f"data.cond_{kind}_rate", 0.0) == 0, f"data.cond_{kind}_rate",
                 "must be 0 for an SR stage: it is conditioned on the low-res clip, not on held frames")
    budget = sr_budget(cfg)
    _require(budget["token_budget"] >= 1, "data.token_budget",
             f"{cfg.data.token_budget} tokens cannot hold one clip of whole latents at sr.spatial_factor={spatial} "
             f"and sr.temporal_factor={temporal}; raise it")
