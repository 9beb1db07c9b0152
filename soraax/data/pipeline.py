"""The input pipeline: native-aspect clips -> token budget -> latents -> spacetime patches -> packed rows.

    source -> shuffle(seed) -> this host's shard -> decode -> temporal crop + resize to the token budget
    (aspect kept, rounded to the patch grid; never a square crop) -> [Grain worker processes end here]
    -> VAE encode (frozen, jitted once per clip shape) -> patches + coords
    -> [frozen text encoder, each caption once, when model.text_cache] -> Patch n' Pack -> batch

Decode and resize are numpy and run in Grain worker processes (`data.workers`); the VAE runs in the
training process, where JAX lives. An unusable file travels past the workers as a small marker record
and is counted and dropped in the training process (`skip_summary`), so the counts are exact for any
number of workers. Every random choice comes from Grain's per-element seeds, so the sequence of batches
is a function of `seed` and the iterator state alone, and a resumed run sees the batches an
uninterrupted one would.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Callable

import grain
import numpy as np
import threadpoolctl
from absl import flags

from soraax import cascade, packing, patches
from soraax.config import ConfigError
from soraax.data import conditioning, folder, synthetic
from soraax.data.folder import ManifestSource, decode_clip
from soraax.data.synthetic import SyntheticClips
from soraax.text import ByteTokenizer

EncodeFn = Callable[[np.ndarray], np.ndarray]  # video float32 [T, H, W, 3] in [-1, 1] -> latent [t, h, w, C]
EncodeTextFn = Callable[[np.ndarray], np.ndarray]  # caption ids int32 [n] -> text states float32 [n, width]


# ------------------------------------------------------------------------------------------- sizing


def fit_to_budget(num_frames: int, height: int, width: int, *, token_budget: int, max_frames: int,
                  spatial_factor: int, temporal_factor: int, patch_size) -> tuple[int, int, int]:
    """(T, H, W) to crop and resize a clip to so that it costs at most `token_budget` tokens.

    Duration first, since motion is what a video model must learn: the clip keeps up to `max_frames`
    frames (in the VAE's `1 + ft*n` steps), then its resolution shrinks, aspect ratio kept and rounded to
    whole patches (within one patch of the native aspect), until the tokens fit; never upscaled. Only when
    even a one-patch frame cannot carry all frames are frames dropped. An image gets the whole budget.
    """
    pt, ph, pw = patch_size
    cell_h, cell_w = spatial_factor * ph, spatial_factor * pw
    latent_frames = 1 + (min(num_frames, max_frames) - 1) // temporal_factor
    latent_frames = max(pt, latent_frames - latent_frames % pt)
    time_patches = min(latent_frames // pt, token_budget)
    if time_patches < 1:
        raise ValueError(f"data.token_budget={token_budget} cannot hold one {pt}x1x1 patch")
    per_frame = token_budget // time_patches
    grid_h, grid_w = height / cell_h, width / cell_w
    scale = min(1.0, math.sqrt(per_frame / (grid_h * grid_w)))
    # Flooring both sides keeps the product within budget and each side within one patch of the native
    # aspect; a side raised to one patch (a 1x4000 strip) caps the other instead, and is never capped
    # to zero itself (an empty grid).
    gh, gw = max(1, math.floor(grid_h * scale)), max(1, math.floor(grid_w * scale))
    gh, gw = min(gh, max(1, per_frame // gw)), min(gw, max(1, per_frame // gh))
    return 1 + temporal_factor * (time_patches * pt - 1), gh * cell_h, gw * cell_w


def _resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of a triangle filter, widened when shrinking so it averages (antialiasing)."""
    scale = out_size / in_size
    support = max(1.0, 1.0 / scale)
    centres = (np.arange(out_size) + 0.5) / scale - 0.5
    distance = np.abs(np.arange(in_size)[None, :] - centres[:, None]) / support
    weights = np.maximum(0.0, 1.0 - distance)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


@functools.cache
def _one_blas_thread(pid: int) -> None:
    """NumPy's BLAS runs on one thread in this process from now on (`pid` keys the cache: a Grain worker
    process applies it once for itself).

    The pipeline's matmuls are small (a clip's resize) and run from several pipeline threads while XLA's own
    threads run the VAE encode or the train step. OpenBLAS would give each call its threads, which spin
    waiting for work after it, against each other and against XLA: on 2 cores the tiny default's loader ran
    1.54x faster with one BLAS thread (7233 -> 11117 real tokens/s) and its training 1.32-1.47x more steps a
    second, with bit-identical losses (benchmarks/README.md, 2026-12-03).
    """
    del pid
    threadpoolctl.threadpool_limits(limits=1, user_api="blas")


def resize_video(video_uint8_THWC: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [T, H, W, 3] -> float32 [T, height, width, 3] in [-1, 1], antialiased bilinear.

    The first call in a process sets NumPy's BLAS to one thread for the process (`_one_blas_thread`)."""
    video = video_uint8_THWC.astype(np.float32) * (2.0 / 255.0) - 1.0
    if video.shape[1:3] == (height, width):
        return video
    _one_blas_thread(os.getpid())
    rows = _resize_matrix(video.shape[1], height)
    cols = _resize_matrix(video.shape[2], width)
    # Rows of the resize matrices sum to 1 only to rounding: a white pixel can come out at 1 + 1 ulp.
    return np.clip(np.einsum("yh,thwc,xw->tyxc", rows, video, cols, optimize=True), -1.0, 1.0)


def crop_time(video_THWC: np.ndarray, num_frames: int, rng: np.random.Generator) -> np.ndarray:
    start = int(rng.integers(0, video_THWC.shape[0] - num_frames + 1))
    return video_THWC[start:start + num_frames]


# ------------------------------------------------------------------------------------------- sources


def clip_source(data_cfg, *, seed: int, split: str = "train"):
    """(random-access source, decode map or None) for config.data.source.

    The decode map returns a clip or a skip marker (folder.decode_clip) and counts nothing: `_count_skips`
    counts in the training process.
    """
    if data_cfg.source == "synthetic":
        # 2..4 frames would crop to one frame still captioned as moving: images are 1 frame, videos >= 5
        # (data.synthetic_min_frames raises that: longer clips carry more of the motion the captions name).
        first = max(5, min(int(data_cfg.get("synthetic_min_frames", 5)), data_cfg.max_frames))
        durations = (1,) + tuple(range(first, data_cfg.max_frames + 1))
        return SyntheticClips(num_examples=data_cfg.num_examples, seed=seed, split=split, durations=durations,
                              aspect_ratios=data_cfg.get("synthetic_aspect_ratios", synthetic.ASPECT_RATIOS),
                              image_fraction=data_cfg.get("synthetic_image_fraction", synthetic.IMAGE_FRACTION)), None
    if data_cfg.source == "folder":
        return ManifestSource(data_cfg.manifest), decode_clip
    if data_cfg.source == "tfds":
        from soraax.data.tfds_source import open_tfds_source
        return open_tfds_source(data_cfg.tfds_dir, data_cfg.tfds_name, split="train"), decode_clip
    raise ValueError(f"config.data.source={data_cfg.source!r} is not one of synthetic, folder, tfds")


def _examples(cfg, *, process_index: int, process_count: int, split: str = "train"):
    """(this host's examples in reading order, undecoded, repeated forever; decode map or None; examples
    a host reads per epoch)."""
    source, decode = clip_source(cfg.data, seed=cfg.seed, split=split)
    if len(source) < process_count:
        raise ValueError(f"the dataset has {len(source)} examples, fewer than the {process_count} hosts")
    # Shard before repeating: every epoch reshuffles, and each host still reads a disjoint share of it.
    ds = grain.MapDataset.source(source).shuffle(seed=cfg.seed)[process_index::process_count]
    return ds.repeat(), decode, len(ds)


def _decoded_clips(cfg, *, process_index: int, process_count: int, split: str = "train"):
    """(clips or skip markers, examples a host reads per epoch)."""
    ds, decode, per_epoch = _examples(cfg, process_index=process_index, process_count=process_count,
                                      split=split)
    if decode is not None:
        ds = ds.map(decode)  # a marker, not None, for a bad file: the training process counts it
    return ds, per_epoch


class _PrepareForDiT(grain.transforms.RandomMap):
    """Caption choice and tokens, temporal crop and resize to the token budget (numpy, worker-safe)."""

    def __init__(self, cfg, tokenizer):
        self.budget = dict(token_budget=cfg.data.token_budget, max_frames=cfg.data.max_frames,
                           spatial_factor=cfg.vae.spatial_factor, temporal_factor=cfg.vae.temporal_factor,
                           patch_size=tuple(cfg.model.patch_size))
        self.detailed_rate = cfg.data.detailed_caption_rate
        self.text_len = cfg.text_len
        self.tokenizer = tokenizer
        self.time_patch = int(cfg.model.patch_size[0])
        self.cond_rates = conditioning_rates(cfg.data)

    def random_map(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        if folder.is_skipped(example):
            return example
        video = example["video"]
        frames, height, width = fit_to_budget(*video.shape[:3], **self.budget)
        if frames > video.shape[0]:  # a time patch of several latent frames cannot hold an image
            return folder.skip_marker(example.get(folder.PATH, "<unnamed example>"), "too_short",
                                      f"{video.shape[0]} frame(s); a time patch of model.patch_size="
                                      f"{self.budget['patch_size']} needs {frames}")
        caption = example["caption"]
        if example.get("caption_detailed") and rng.random() < self.detailed_rate:
            caption = example["caption_detailed"]
        latent_frames = 1 + (frames - 1) // self.budget["temporal_factor"]
        held = conditioning.held_time_patches(latent_frames // self.time_patch, rng, **self.cond_rates)
        return {"video": resize_video(crop_time(video, frames, rng), height, width),
                "text_tokens": self.tokenizer.encode(caption, self.text_len), "held_time_patches": held,
                **folder.bookkeeping(example)}


def conditioning_rates(data_cfg) -> dict[str, float]:
    """data.cond_*_rate -> soraax.data.conditioning's rates (0 for a config without the keys)."""
    return {f"{kind}_rate": float(data_cfg.get(f"cond_{kind}_rate", 0.0)) for kind in conditioning.KINDS}


def _encode_and_patchify(encode: EncodeFn, patch_size, encode_text: EncodeTextFn | None) -> Callable[[dict], dict]:
    def fn(example):
        latent = np.asarray(encode(example["video"]))
        tokens, coords = patches.patchify(latent, patch_size)
        held = example["held_time_patches"]  # whole time patches, patchify's time-major token order
        out = {"tokens": tokens.astype(np.float32), "coords": coords,
               "cond_mask": np.repeat(held, tokens.shape[0] // len(held)), "text_tokens": example["text_tokens"]}
        if encode_text is not None:
            out["text_states"] = encode_text(example["text_tokens"])
        return out
    return fn


class _CountSkips(grain.transforms.Filter):
    """Counts each record into folder.SKIPS and keeps the clips (in the training process, after workers).

    Refuses to loop forever over a dataset with nothing usable: more skips in a row than two epochs hold
    (every epoch reshuffles, so one good example an epoch bounds a run of skips by that) means none is.
    Neither the counts nor the run are in the iterator state: a resumed run counts from its restart.
    """

    def __init__(self, examples_per_epoch: int, data_cfg):
        self.limit = 2 * examples_per_epoch
        self.dataset = _dataset_name(data_cfg)
        self.skips_in_a_row = 0

    def filter(self, example: dict[str, Any]) -> bool:
        if folder.SKIPS.record_example(example):
            self.skips_in_a_row = 0
            return True
        self.skips_in_a_row += 1
        if self.skips_in_a_row > self.limit:
            raise ConfigError(f"{self.dataset}: no example is usable ({self.skips_in_a_row} skipped in a row, "
                              f"two passes over this host's {self.limit // 2}; skipped so far: "
                              f"{folder.SKIPS.counts()}); see the warnings above")
        return False


def _dataset_name(data_cfg) -> str:
    if data_cfg.source == "folder":
        return f"config.data.manifest={data_cfg.manifest!r}"
    if data_cfg.source == "tfds":
        return f"config.data.tfds_dir={data_cfg.tfds_dir!r} (data.tfds_name={data_cfg.tfds_name!r})"
    return f"config.data.source={data_cfg.source!r}"


def _count_skips(ds: grain.IterDataset, examples_per_epoch: int, data_cfg) -> grain.IterDataset:
    """Skip markers counted and dropped, caption fixes counted, bookkeeping keys removed."""
    return ds.filter(_CountSkips(examples_per_epoch, data_cfg)).map(folder.without_bookkeeping)


def skip_summary(since: dict[str, int] | None = None) -> dict[str, int]:
    """What the input pipelines of this process have read since it started (or since the summary
    `since`, e.g. taken when a training stage began), for the trainer to log.

    {"examples": examples read (kept or skipped), "skipped": examples skipped, then per kind: skips
    (folder.SKIP_KINDS, e.g. "corrupt") and normalised captions (folder.CAPTION_FIXES, e.g. "empty_caption",
    whose examples were kept)}. Exact whatever data.workers is: counted in the training process as clips
    leave the worker processes, so it includes the few a prefetch buffer has read ahead of the step. Per
    host: each host counts its own share.
    """
    examples, counts, fixes = folder.SKIPS.snapshot()
    summary = {"examples": examples, "skipped": sum(counts.values()), **dict(sorted(counts.items())),
               **dict(sorted(fixes.items()))}
    since = since or {}
    return {k: v - since.get(k, 0) for k, v in summary.items() if k in ("examples", "skipped") or v > since.get(k, 0)}


def format_skip_summary(summary: dict[str, int]) -> str:
    """One log line: "read 30 examples, skipped 10 (corrupt=4, missing=6); normalised 2 captions (...)"."""
    kinds = {k: v for k, v in summary.items() if k not in ("examples", "skipped")}
    skipped = ", ".join(f"{k}={v}" for k, v in kinds.items() if k in folder.SKIP_KINDS)
    fixed = ", ".join(f"{k}={v}" for k, v in kinds.items() if k in folder.CAPTION_FIXES)
    line = f"read {summary.get('examples', 0)} examples, skipped {summary.get('skipped', 0)}"
    line += f" ({skipped})" if skipped else ""
    if fixed:
        line += f"; normalised {sum(kinds[k] for k in folder.CAPTION_FIXES if k in kinds)} captions ({fixed})"
    return line


def _worker_processes(ds: grain.IterDataset, workers: int) -> grain.IterDataset:
    if workers <= 0:
        return ds
    # Grain's workers read absl flags; outside an absl app (a notebook, a test) nothing has parsed them.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))


def dit_batches(cfg, encode: EncodeFn, *, process_index: int = 0, process_count: int = 1, tokenizer=None,
                encode_text: EncodeTextFn | None = None) -> grain.IterDataset:
    """This host's share of the packed batches: dicts of [batch_size / hosts, ...] arrays (DESIGN.md).

    `tokenizer` is the text encoder's (default: bytes); with `encode_text` (a frozen encoder's cache) the
    batches also carry `text_states` [rows, text_len, width], packed like `text_tokens`.
    """
    prepare = _PrepareForDiT(cfg, ByteTokenizer() if tokenizer is None else tokenizer)
    return _packed_batches(cfg, prepare, _encode_and_patchify(encode, tuple(cfg.model.patch_size), encode_text),
                           process_index=process_index, process_count=process_count,
                           with_text_states=encode_text is not None)


def _packed_batches(cfg, prepare, to_tokens, *, process_index, process_count, with_text_states,
                    after_packing=None) -> grain.IterDataset:
    if cfg.batch_size % process_count:
        raise ValueError(f"config.batch_size={cfg.batch_size} must divide evenly over {process_count} hosts")
    ds, per_epoch = _decoded_clips(cfg, process_index=process_index, process_count=process_count)
    ds = _worker_processes(ds.random_map(prepare, seed=cfg.seed).to_iter_dataset(), cfg.data.workers)
    ds = _count_skips(ds, per_epoch, cfg.data)
    ds = ds.map(to_tokens)
    ds = packing.pack_clips(ds, seq_len=cfg.seq_len, text_len=cfg.text_len, max_segments=cfg.max_segments,
                            num_packing_bins=cfg.data.packing_bins, strategy=cfg.data.packing, seed=cfg.seed,
                            with_text_states=with_text_states,
                            # Wan: captions padded as its sampler pads them (soraax.sampling.text_pad_len)
                            text_pad_len=int(cfg.model.get("text_pad_len", 0)))
    if after_packing is not None:
        ds = ds.map(after_packing)
    ds = ds.batch(cfg.batch_size // process_count, drop_remainder=True)
    # The VAE encode above is host work: a thread keeps the next batches coming while the step runs.
    return grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=2)


# ------------------------------------------------------------------------------- super-resolution


class _PrepareForSR(_PrepareForDiT):
    """As for the DiT, with the high-res clip sized so that it downscales to whole latents
    (cascade.sr_budget), and its low-res version alongside: the same crop downscaled by sr.spatial_factor
    and sr.temporal_factor (cascade.downscale_video). An SR stage holds no frames (config: data.cond_*_rate
    are 0): its conditioning is the low-res clip."""

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.budget = cascade.sr_budget(cfg)
        self.factors = cascade.factors(cfg)
        self.vae_temporal = int(cfg.vae.temporal_factor)

    def random_map(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        out = super().random_map(example, rng)
        if folder.is_skipped(out):
            return out
        latent_frames = 1 + (len(out["video"]) - 1) // self.vae_temporal
        return {**out, "lowres_video": cascade.downscale_video(out["video"], *self.factors),
                "held_time_patches": np.zeros(latent_frames // self.time_patch, bool)}


def _encode_for_sr(encode: EncodeFn, cfg, encode_text: EncodeTextFn | None) -> Callable[[dict], dict]:
    patch_size = tuple(int(p) for p in cfg.model.patch_size)
    to_tokens = _encode_and_patchify(encode, patch_size, encode_text)

    def fn(example):
        out = to_tokens(example)
        lowres_NxQ, grid = cascade.lowres_tokens(cfg, np.asarray(encode(example["lowres_video"])))
        if lowres_NxQ.shape[0] != out["tokens"].shape[0] or grid != patches.grid_from_coords(out["coords"]):
            raise ValueError(f"the low-res clip {example['lowres_video'].shape} upsamples to patch grid {grid}, "
                             f"not the high-res clip's {patches.grid_from_coords(out['coords'])} "
                             f"({example['video'].shape})")
        # The conditioning rides in the same feature row as the token it conditions: Grain's packer then
        # places it, pads it and cuts rows exactly as it does the tokens; `split` takes it out again.
        return {**out, "tokens": np.concatenate([out["tokens"], lowres_NxQ.astype(np.float32)], axis=-1)}
    return fn


def sr_batches(cfg, encode: EncodeFn, *, process_index: int = 0, process_count: int = 1, tokenizer=None,
               encode_text: EncodeTextFn | None = None) -> grain.IterDataset:
    """A super-resolution stage's packed batches: `dit_batches`' rows (at the high resolution) that also
    carry `lowres_tokens` [rows, seq_len, Q], aligned token for token with `tokens` (0 on padding): each
    clip's low-res version encoded by the same frozen VAE and upsampled onto its patch grid
    (soraax/cascade.py). Noise augmentation happens in the train step, not here."""
    patch_dim = patches.patch_dim(tuple(cfg.model.patch_size), cfg.vae.latent_channels)

    def split(row):
        tokens = row["tokens"]
        return {**row, "tokens": tokens[..., :patch_dim], "lowres_tokens": tokens[..., patch_dim:]}

    prepare = _PrepareForSR(cfg, ByteTokenizer() if tokenizer is None else tokenizer)
    return _packed_batches(cfg, prepare, _encode_for_sr(encode, cfg, encode_text), process_index=process_index,
                           process_count=process_count, with_text_states=encode_text is not None,
                           after_packing=split)


class _CropForVAE(grain.transforms.RandomMap):
    """A fixed-size random crop (frames, height, width) after a resize that keeps the aspect ratio."""

    def __init__(self, crop):
        self.frames, self.height, self.width = (int(c) for c in crop)

    def random_map(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        if folder.is_skipped(example):
            return example
        video = example["video"]
        t, h, w = video.shape[:3]
        if t < self.frames:
            return folder.skip_marker(example.get(folder.PATH, "<unnamed example>"), "too_short",
                                      f"{t} frame(s); vae.crop needs {self.frames}")
        scale = max(self.height / h, self.width / w)
        video = resize_video(crop_time(video, self.frames, rng), max(self.height, round(h * scale)),
                             max(self.width, round(w * scale)))
        y = int(rng.integers(0, video.shape[1] - self.height + 1))
        x = int(rng.integers(0, video.shape[2] - self.width + 1))
        return {"video": video[:, y:y + self.height, x:x + self.width], **folder.bookkeeping(example)}


def vae_batches(cfg, *, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Batches of fixed-size crops `{"video": float32 [B, *vae.crop, 3]}` for training the VAE.

    A conv VAE needs no packing, so crops of one size batch densely; clips shorter than the crop are
    skipped and counted as "too_short" (every crop still teaches the first-frame-alone image path).
    """
    if cfg.vae.batch_size % process_count:
        raise ValueError(f"config.vae.batch_size={cfg.vae.batch_size} must divide evenly over {process_count} hosts")
    ds, per_epoch = _decoded_clips(cfg, process_index=process_index, process_count=process_count)
    ds = _worker_processes(ds.random_map(_CropForVAE(cfg.vae.crop), seed=cfg.seed).to_iter_dataset(),
                           cfg.data.workers)
    ds = _count_skips(ds, per_epoch, cfg.data)
    return ds.batch(cfg.vae.batch_size // process_count, drop_remainder=True)
