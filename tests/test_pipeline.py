"""The input pipeline: native aspect kept, token budget respected, rows packed tightly, order reproducible."""
import json
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from soraax import packing, patches
from soraax.data import pipeline
from soraax.data.video_io import write_video
from helpers import micro_config

SIZING = dict(spatial_factor=4, temporal_factor=4, patch_size=(1, 2, 2))


@settings(max_examples=200, deadline=None)
@given(frames=st.integers(1, 40), height=st.integers(8, 720), width=st.integers(8, 1280),
       budget=st.integers(1, 512))
def test_budget_respected_and_aspect_kept_within_one_patch(frames, height, width, budget):
    t, h, w = pipeline.fit_to_budget(frames, height, width, token_budget=budget, max_frames=17, **SIZING)
    cell = 8  # spatial_factor * patch
    assert (t - 1) % 4 == 0 and 1 <= t <= max(1, min(frames, 17))
    assert h % cell == 0 and w % cell == 0
    tokens = (1 + (t - 1) // 4) * (h // cell) * (w // cell)
    assert tokens <= budget
    assert h <= max(cell, height + cell) and w <= max(cell, width + cell)  # never upscaled beyond rounding
    # Aspect within one patch: the native aspect, scaled to the chosen height, rounds to the chosen width.
    gh, gw = h // cell, w // cell
    if gh > 1 and gw > 1 and (h, w) != (height // cell * cell, width // cell * cell):
        # Both sides are floors of the same scaling of the native grid: each within one patch of it.
        scale = max(gh / (height / cell), gw / (width / cell))
        assert height / cell * scale - gh < 1 + 1e-6 and width / cell * scale - gw < 1 + 1e-6


@settings(max_examples=200, deadline=None)
@given(frames=st.integers(1, 40), height=st.integers(1, 5000), width=st.integers(1, 5000),
       budget=st.integers(1, 512), patch=st.sampled_from([(1, 1, 1), (1, 2, 2), (2, 2, 2)]))
def test_any_frame_size_fits_a_whole_grid_within_budget(frames, height, width, budget, patch):
    # 1x4000 strips, 1x1 pixels: at least one patch a side (never an empty grid), never over budget.
    sizing = {**SIZING, "patch_size": patch}
    t, h, w = pipeline.fit_to_budget(frames, height, width, token_budget=budget, max_frames=17, **sizing)
    cell_h, cell_w = 4 * patch[1], 4 * patch[2]
    grid = ((1 + (t - 1) // 4) // patch[0], h // cell_h, w // cell_w)
    assert h % cell_h == 0 and w % cell_w == 0 and min(grid) >= 1
    assert (1 + (t - 1) // 4) % patch[0] == 0 and int(np.prod(grid)) <= budget


@pytest.mark.parametrize("height, width", [(1, 4000), (4000, 1), (1, 1), (3, 5)])
def test_tiny_and_absurd_frames_resize_to_a_whole_patch_grid(height, width):
    cfg = micro_config()
    prepare = pipeline._PrepareForDiT(cfg, pipeline.ByteTokenizer())
    out = prepare.random_map({"video": np.full((1, height, width, 3), 128, np.uint8), "caption": "x"},
                             np.random.default_rng(0))
    t, h, w, _ = out["video"].shape
    cell = cfg.vae.spatial_factor * cfg.model.patch_size[1]
    assert t == 1 and h >= cell and w >= cell and h % cell == 0 and w % cell == 0
    assert (h // cell) * (w // cell) <= cfg.data.token_budget
    np.testing.assert_allclose(out["video"], 128 / 255 * 2 - 1, atol=1e-5)  # a flat frame stays flat


def test_a_clip_shorter_than_a_time_patch_is_skipped_not_crashed():
    cfg = micro_config(**{"model.patch_size": (2, 2, 2)})
    prepare = pipeline._PrepareForDiT(cfg, pipeline.ByteTokenizer())
    image = {"video": np.zeros((1, 32, 32, 3), np.uint8), "caption": "x", "_path": "still.png"}
    marker = prepare.random_map(image, np.random.default_rng(0))
    assert marker["_skipped"] == "too_short" and marker["_path"] == "still.png"
    assert prepare.random_map(marker, np.random.default_rng(0)) is marker  # markers pass through untouched
    clip = prepare.random_map({**image, "video": np.zeros((5, 32, 32, 3), np.uint8)}, np.random.default_rng(0))
    assert clip["video"].shape[0] == 5 and clip["_path"] == "still.png"  # bookkeeping travels along


def test_a_huge_caption_costs_text_len_tokens():
    cfg = micro_config()
    prepare = pipeline._PrepareForDiT(cfg, pipeline.ByteTokenizer())
    clip = {"video": np.zeros((1, 16, 16, 3), np.uint8), "caption": "a dog runs " * 100_000}  # 1.1 MB
    start = time.perf_counter()
    tokens = prepare.random_map(clip, np.random.default_rng(0))["text_tokens"]
    assert time.perf_counter() - start < 1.0
    assert len(tokens) == cfg.text_len and tokens[-1] == pipeline.ByteTokenizer.eos_id


def test_duration_kept_before_resolution():
    # A 17-frame 1280x720 clip at 128 tokens keeps all 5 latent frames and shrinks to 16:9 at 25 tokens a frame.
    t, h, w = pipeline.fit_to_budget(17, 720, 1280, token_budget=128, max_frames=17, **SIZING)
    assert t == 17 and (h // 8) * (w // 8) <= 25 and w > h
    # An image gets the whole budget.
    t, h, w = pipeline.fit_to_budget(1, 720, 1280, token_budget=128, max_frames=17, **SIZING)
    assert t == 1 and 100 <= (h // 8) * (w // 8) <= 128


def test_resize_preserves_flat_colour_and_range():
    video = np.full((2, 30, 50, 3), 200, np.uint8)
    out = pipeline.resize_video(video, 16, 24)
    assert out.shape == (2, 16, 24, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, 200 / 255 * 2 - 1, atol=1e-5)


def test_resizing_leaves_numpys_blas_on_one_thread_and_the_values_unchanged():
    # The pipeline's small matmuls run beside XLA's threads: OpenBLAS's spinning threads cost the tiny
    # default's training a third of its steps (pipeline._one_blas_thread).
    import threadpoolctl
    video = np.random.default_rng(0).integers(0, 256, (3, 37, 53, 3), dtype=np.uint8)
    rows, cols = pipeline._resize_matrix(37, 16), pipeline._resize_matrix(53, 24)
    expected = np.einsum("yh,thwc,xw->tyxc", rows.astype(np.float64),
                         video.astype(np.float64) * (2 / 255) - 1, cols.astype(np.float64))
    out = pipeline.resize_video(video, 16, 24)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    blas = [lib for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]
    assert blas and all(lib["num_threads"] == 1 for lib in blas)


def _write_manifest(folder, *, clips: int, frames: int, broken: bool = False) -> str:
    """A manifest of small random mp4 clips (and one undecodable file if `broken`) in `folder`."""
    rng = np.random.default_rng(clips)
    lines = []
    for i in range(clips):
        write_video(folder / f"c{i}.mp4", rng.integers(0, 255, (frames, 32, 48, 3), dtype=np.uint8))
        lines.append({"path": f"c{i}.mp4", "caption": f"clip {i}"})
    if broken:
        (folder / "bad.mp4").write_bytes(b"not a video at all")
        lines.append({"path": "bad.mp4", "caption": "broken"})
    manifest = folder / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in lines))
    return str(manifest)


def _fake_encode(cfg):
    """A VAE-shaped encoder without a VAE: average-pools to the latent grid (fast, deterministic)."""
    f, s, c = cfg.vae.temporal_factor, cfg.vae.spatial_factor, cfg.vae.latent_channels

    def encode(video):
        t, h, w, _ = video.shape
        first = video[:1]
        rest = video[1:].reshape(-1, f, h, w, 3).mean(1) if t > 1 else video[:0]
        frames = np.concatenate([first, rest])
        pooled = frames.reshape(len(frames), h // s, s, w // s, s, 3).mean((2, 4))
        return np.concatenate([pooled] * 3, axis=-1)[..., :c].astype(np.float32)
    return encode


def test_synthetic_batches_are_packed_tightly_and_follow_the_batch_format():
    cfg = micro_config(seq_len=256, text_len=512, data__token_budget=64, max_segments=16, data__packing_bins=16)
    batches = pipeline.dit_batches(cfg, _fake_encode(cfg))
    rows = [b for _, b in zip(range(12), batches)]
    first = rows[0]
    assert set(first) == set(packing.BATCH_KEYS)
    assert first["tokens"].shape == (2, 256, 4 * cfg.vae.latent_channels)
    segment_ids = np.stack([b["segment_ids"] for b in rows])
    assert packing.packing_stats(segment_ids)["efficiency"] > 0.9
    # Every packed clip unpacks to a whole grid within the budget.
    for batch in rows[:3]:
        for r in range(2):
            row = {k: v[r] for k, v in batch.items()}
            for clip in packing.unpack_row(row):
                assert int(np.prod(clip["grid"])) <= 64
                assert clip["text_tokens"][0] == 1  # BOS: the caption travelled with its clip


def test_clips_are_conditioned_on_whole_time_patches_at_the_configured_rates():
    # Every clip holds either nothing or whole time patches, never all of them; with the rates at 0 none does.
    cfg = micro_config(data__cond_first_frame_rate=0.4, data__cond_past_frames_rate=0.3,
                       data__cond_future_frames_rate=0.0, data__cond_ends_rate=0.0)
    held = conditioned = 0
    for batch in [b for _, b in zip(range(10), pipeline.dit_batches(cfg, _fake_encode(cfg)))]:
        for row in range(batch["segment_ids"].shape[0]):
            for clip in packing.unpack_row({k: v[row] for k, v in batch.items()}):
                t, h, w = clip["grid"]
                per_time = clip["cond_mask"].reshape(t, h * w)
                assert (per_time.all(axis=1) | ~per_time.any(axis=1)).all()  # whole time patches
                assert not per_time.all()
                if per_time.any():
                    assert per_time[0].all()  # first-frame and past-frame kinds both start at time patch 0
                    conditioned += 1
                held += t > 1
    assert 0.4 < conditioned / held < 0.9  # 70% of clips with two or more time patches, drawn at random
    off = micro_config(data__cond_first_frame_rate=0.0, data__cond_past_frames_rate=0.0,
                       data__cond_future_frames_rate=0.0, data__cond_ends_rate=0.0)
    batch = next(iter(pipeline.dit_batches(off, _fake_encode(off))))
    assert not batch["cond_mask"].any()


def test_batches_are_a_function_of_the_seed_and_resume_from_iterator_state():
    cfg = micro_config()
    encode = _fake_encode(cfg)
    it = iter(pipeline.dit_batches(cfg, encode))
    first = [next(it) for _ in range(3)]
    state = it.get_state()
    rest = [next(it) for _ in range(2)]
    again = iter(pipeline.dit_batches(cfg, encode))
    for a, b in zip(first, [next(again) for _ in range(3)]):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
    resumed = iter(pipeline.dit_batches(cfg, encode))
    resumed.set_state(state)
    for a, b in zip(rest, [next(resumed) for _ in range(2)]):
        np.testing.assert_array_equal(a["segment_ids"], b["segment_ids"])
        np.testing.assert_array_equal(a["tokens"], b["tokens"])


def test_hosts_read_disjoint_shards():
    cfg = micro_config()
    encode = _fake_encode(cfg)
    a = next(iter(pipeline.dit_batches(cfg, encode, process_index=0, process_count=2)))
    b = next(iter(pipeline.dit_batches(cfg, encode, process_index=1, process_count=2)))
    assert a["tokens"].shape[0] == 1 and not np.array_equal(a["tokens"], b["tokens"])


def test_folder_source_skips_and_counts_corrupt_files(tmp_path):
    from soraax.data import folder
    manifest = _write_manifest(tmp_path, clips=4, frames=5, broken=True)
    cfg = micro_config(data__source="folder", data__manifest=manifest, max_segments=2)
    before = folder.SKIPS.total
    it = iter(pipeline.dit_batches(cfg, _fake_encode(cfg)))
    batches = [next(it) for _ in range(4)]
    assert folder.SKIPS.total > before
    assert all(b["segment_ids"].max() >= 1 for b in batches)


def test_vae_batches_are_fixed_size_crops():
    cfg = micro_config()
    batch = next(iter(pipeline.vae_batches(cfg)))
    assert batch["video"].shape == (2, 5, 16, 16, 3)
    assert -1.0 <= batch["video"].min() and batch["video"].max() <= 1.0


def test_tfds_source_feeds_the_same_pipeline(tmp_path):
    from soraax.data.prepare import prepare
    manifest = _write_manifest(tmp_path, clips=3, frames=9)
    prepared = prepare(manifest, str(tmp_path / "tfds"), "clips", show_progress=False)
    cfg = micro_config(data__source="tfds", data__tfds_dir=str(tmp_path / "tfds"), data__tfds_name="clips",
                       max_segments=2)
    batch = next(iter(pipeline.dit_batches(cfg, _fake_encode(cfg))))
    assert prepared.num_examples == 3 and batch["segment_ids"].max() >= 1


def test_synthetic_min_frames_sets_the_shortest_video_and_yields_to_max_frames():
    def durations(**overrides):
        return pipeline.clip_source(micro_config(**overrides).data, seed=0)[0].durations
    assert durations(data__max_frames=17, data__synthetic_min_frames=13) == (1, 13, 14, 15, 16, 17)
    assert durations(data__max_frames=9, data__synthetic_min_frames=5) == (1, 5, 6, 7, 8, 9)
    # Above max_frames: the longest videos only, not an empty set.
    assert durations(data__max_frames=9, data__synthetic_min_frames=13) == (1, 9)
