"""prepare + tfds_source: a manifest written as TFDS ArrayRecord and read back without TensorFlow gives the
same clips and captions as decoding the folder directly, with the original file bytes stored untouched
and unreadable files skipped and counted."""

import json
import os
import subprocess
import sys

import grain
import numpy as np
import pytest

from soraax.data.folder import ManifestSource, SkipCounter, decode_example
from soraax.data.prepare import default_name, prepare
from soraax.data.tfds_source import open_tfds_source
from soraax.data.video_io import write_video

CLIPS = {  # file name -> (frames, height, width), caption
    "wide.mp4": ((6, 16, 32), "a wide clip"),
    "tall.mp4": ((3, 40, 24), "a tall clip, caf\u00e9"),
    "still.png": ((1, 21, 13), ""),
}


@pytest.fixture
def manifest(tmp_path):
    """Three small clips of different shapes, one corrupt file, and a manifest listing all four."""
    clips = tmp_path / "clips"
    clips.mkdir()
    rng = np.random.default_rng(0)
    entries = []
    for file_name, (shape, caption) in CLIPS.items():
        write_video(clips / file_name, rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
        entries.append({"path": f"clips/{file_name}", "caption": caption})
    (clips / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 8)
    entries.insert(1, {"path": "clips/corrupt.mp4", "caption": "never stored"})
    path = tmp_path / "my_clips.jsonl"
    path.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    return path


def test_round_trip_matches_the_folder(manifest, tmp_path):
    prepared = prepare(manifest, tmp_path / "tfds", show_progress=False, examples_per_shard=2)
    assert (prepared.num_examples, prepared.num_shards, prepared.skipped) == (3, 2, {"corrupt": 1})
    assert "skipped 1 unreadable file(s) (corrupt=1)" in prepared.summary()
    assert prepared.dataset_dir == str(tmp_path / "tfds" / "my_clips" / "1.0.0")

    source = open_tfds_source(tmp_path / "tfds", "my_clips")
    assert len(source) == 3
    for record, (file_name, (shape, caption)) in zip((source[i] for i in range(3)), CLIPS.items()):
        original = manifest.parent / "clips" / file_name
        assert record["video_bytes"] == original.read_bytes()  # stored as on disk, not re-encoded
        assert tuple(record["shape"]) == shape
        # The same map decodes both sources to the same clip.
        from_tfds = decode_example(record, SkipCounter())
        from_folder = decode_example({"path": str(original), "caption": caption}, SkipCounter())
        assert from_tfds["video"].shape == (*shape, 3)
        np.testing.assert_array_equal(from_tfds["video"], from_folder["video"])
        assert from_tfds["caption"] == from_folder["caption"] == caption


def test_tfds_source_runs_in_a_grain_pipeline(manifest, tmp_path):
    prepare(manifest, tmp_path / "tfds", "clips", show_progress=False)
    dataset = grain.MapDataset.source(open_tfds_source(tmp_path / "tfds", "clips:1.0.0")).map(decode_example)
    folder = grain.MapDataset.source(ManifestSource(manifest)).map(lambda e: decode_example(e, SkipCounter()))
    assert ([clip["caption"] for clip in dataset.to_iter_dataset()]
            == [clip["caption"] for clip in folder.to_iter_dataset()] == [c for _, c in CLIPS.values()])


def test_a_corrupt_record_is_skipped_like_a_corrupt_file():
    skips = SkipCounter()
    record = {"video_bytes": b"garbage" * 20, "caption": b"x", "path": b"clips/x.mp4"}
    assert decode_example(record, skips) is None
    assert skips.counts() == {"corrupt": 1}


def test_refusals_name_the_problem(manifest, tmp_path):
    prepare(manifest, tmp_path / "tfds", show_progress=False)
    with pytest.raises(FileExistsError, match="my_clips/1.0.0 already exists"):
        prepare(manifest, tmp_path / "tfds", show_progress=False)
    with pytest.raises(ValueError, match="lower_snake_case"):
        prepare(manifest, tmp_path / "tfds", "My-Clips", show_progress=False)
    with pytest.raises(FileNotFoundError, match="no dataset 'other'.*my_clips"):
        open_tfds_source(tmp_path / "tfds", "other")

    only_bad = tmp_path / "only_bad.jsonl"
    only_bad.write_text('{"path": "clips/corrupt.mp4", "caption": "x"}\n')
    with pytest.raises(ValueError, match="none of its 1 files decode"):
        prepare(only_bad, tmp_path / "tfds", show_progress=False)
    assert not os.path.exists(tmp_path / "tfds" / "only_bad")  # nothing half-written is left to load


def test_default_name_is_a_valid_tfds_name():
    assert default_name("/data/My Clips-v2.jsonl") == "my_clips_v2"
    assert default_name("2024.jsonl") == "videos_2024"


def test_command_line(manifest, tmp_path):
    run = [sys.executable, "-m", "soraax.data.prepare"]
    done = subprocess.run(run + ["--manifest", str(manifest), "--out", str(tmp_path / "tfds"), "--name", "cli"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "wrote 3 examples" in done.stdout and "(corrupt=1)" in done.stdout
    assert "corrupt.mp4" in done.stderr  # the one warning naming the skipped file
    assert len(open_tfds_source(tmp_path / "tfds", "cli")) == 3

    missing = subprocess.run(run + ["--manifest", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path)],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "nope.jsonl does not exist" in missing.stderr
