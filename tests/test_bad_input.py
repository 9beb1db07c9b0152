"""Bad input never stops training: a folder of 10 good and 5 broken files trains on the 10, and the skip
summary counts the 5 exactly - per example read, whatever the number of Grain worker processes.

What the summary counts: every example the training process reads from the worker processes, once per
read (a broken file met in two passes counts twice, warned once). Prefetching reads a little ahead of the
batches, so the exact expectation is the broken files among the first `examples` of the reading order.
"""
import collections
import io
import json
import logging

import av
import numpy as np
import pytest

from helpers import micro_config
from test_pipeline import _fake_encode

from soraax import config, packing
from soraax.data import folder, pipeline
from soraax.data.video_io import encode_png, write_image, write_video
from soraax.text import ByteTokenizer

HUGE_TAIL = "and so on " * 100_000  # a 1 MB caption: the tokenizer keeps text_len of it


def _png(image, pix_fmt):
    encoder = av.CodecContext.create("png", "w")
    encoder.width, encoder.height, encoder.pix_fmt = image.shape[1], image.shape[0], pix_fmt
    packets = encoder.encode(av.VideoFrame.from_ndarray(image, format=pix_fmt)) + encoder.encode(None)
    return b"".join(bytes(p) for p in packets)


def _good_files(root, rng):
    """file name -> (caption bytes as the manifest holds them, caption fix expected or None)."""
    clips = {"wide.mp4": (5, 32, 48), "tall.mp4": (9, 48, 32), "strip.mp4": (7, 16, 64), "square.mp4": (6, 40, 40),
             "odd.mp4": (8, 23, 37), "anim.gif": (5, 24, 30)}
    for name, (frames, height, width) in clips.items():
        write_video(root / name, rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8))
    write_image(root / "photo.png", rng.integers(0, 256, (30, 18, 3), dtype=np.uint8))
    write_image(root / "grey.png", rng.integers(0, 256, (20, 36), dtype=np.uint8))
    alpha = rng.integers(0, 256, (28, 20, 4), dtype=np.uint8)
    (root / "alpha.png").write_bytes(_png(alpha, "rgba"))
    (root / "deep.png").write_bytes(_png(rng.integers(0, 65536, (16, 48), dtype=np.uint16), "gray16be"))
    names = [*clips, "photo.png", "grey.png", "alpha.png", "deep.png"]
    captions = {name: (f"good {i}: {name}".encode(), None) for i, name in enumerate(names)}
    captions["tall.mp4"] = (b"good 1: tall.mp4 caf\xe9", "caption_not_utf8")  # Latin-1 in a UTF-8 manifest
    captions["odd.mp4"] = (b"good 4: odd.mp4\\u0000 with a NUL", "caption_control_chars")  # a JSON escape
    captions["grey.png"] = (f"good 7: grey.png {HUGE_TAIL}".encode(), "caption_huge")
    return captions


def _broken_files(root):
    """file name -> the skip kind expected."""
    write_video(root / "whole.mp4", np.zeros((8, 32, 32, 3), np.uint8))
    whole = (root / "whole.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(whole[: len(whole) // 2])
    (root / "empty.mp4").write_bytes(b"")
    (root / "noise.mp4").write_bytes(np.random.default_rng(1).bytes(5000))
    write_video(root / "whole.gif", np.zeros((2, 8, 8, 3), np.uint8))
    (root / "no_frames.gif").write_bytes((root / "whole.gif").read_bytes()[:13 + 768])  # header + palette
    return {"truncated.mp4": "corrupt", "empty.mp4": "empty", "noise.mp4": "corrupt", "gone.mp4": "missing",
            "no_frames.gif": "no_frames"}


@pytest.fixture
def dataset(tmp_path):
    """(manifest, {path: good caption prefix or fix}, {path: skip kind}) for 10 good and 5 broken files."""
    rng = np.random.default_rng(0)
    good, broken = _good_files(tmp_path, rng), _broken_files(tmp_path)
    lines = [b'{"path": "%s", "caption": "%s"}' % (name.encode(), caption) for name, (caption, _) in good.items()]
    lines += [json.dumps({"path": name, "caption": f"broken {name}"}).encode() for name in broken]
    order = np.random.default_rng(2).permutation(len(lines))  # good and broken files mixed in the manifest
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_bytes(b"\n".join(lines[i] for i in order) + b"\n")
    return (str(manifest), {str(tmp_path / name): fix for name, (_, fix) in good.items()},
            {str(tmp_path / name): kind for name, kind in broken.items()})


def _captions_in(batch):
    tokenizer = ByteTokenizer()
    for r in range(batch["segment_ids"].shape[0]):
        for clip in packing.unpack_row({k: v[r] for k, v in batch.items()}):
            yield tokenizer.decode(clip["text_tokens"])


@pytest.mark.parametrize("workers", [0, 2])
def test_ten_good_five_broken_trains_on_ten_and_counts_five_per_pass(dataset, workers, monkeypatch, caplog):
    manifest, good, broken = dataset
    monkeypatch.setattr(folder, "SKIPS", folder.SkipCounter())  # this pipeline's counts alone
    cfg = micro_config(data__source="folder", data__manifest=manifest, data__workers=workers)
    config.validate(cfg)
    seen = collections.Counter()
    with caplog.at_level(logging.WARNING, logger="soraax.data.folder"):
        batches = iter(pipeline.dit_batches(cfg, _fake_encode(cfg)))
        for _ in range(40):
            for caption in _captions_in(next(batches)):
                assert caption.startswith("good "), caption  # only good files reach a batch
                seen[caption.split(":")[0]] += 1
            if len(seen) == 10 and min(seen.values()) >= 2 and pipeline.skip_summary()["examples"] >= 30:
                break
        summary = pipeline.skip_summary()
        batches.close()
    assert len(seen) == 10 and min(seen.values()) >= 2, seen  # every good file, in at least two passes

    # Exactly the broken (and the odd-captioned) files among the examples read so far, in reading order.
    order, _, per_epoch = pipeline._examples(cfg, process_index=0, process_count=1)
    read = [order[i]["path"] for i in range(summary["examples"])]
    assert per_epoch == 15 and summary["examples"] >= 2 * 15
    skipped = collections.Counter(broken[p] for p in read if p in broken)
    fixed = collections.Counter(good[p] for p in read if good.get(p))
    assert summary == {"examples": len(read), "skipped": sum(skipped.values()), **skipped, **fixed}
    assert sum(p in broken for p in read[:30]) == 10  # 5 a pass, 5 distinct
    # One warning per broken file, however often it was met, and one per kind of caption fix.
    messages = [r.getMessage() for r in caplog.records if r.name == "soraax.data.folder"]
    for path in broken:
        assert sum(path in m for m in messages) == 1, path
    assert len(messages) == 5 + 3
    line = pipeline.format_skip_summary(summary)
    assert line.startswith(f"read {len(read)} examples, skipped {sum(skipped.values())} (") and "normalised" in line
    # Read ahead since (workers fill their buffers): the difference, kind by kind.
    later = pipeline.skip_summary()
    assert pipeline.skip_summary(since=summary) == {
        k: v - summary.get(k, 0) for k, v in later.items() if k in ("examples", "skipped") or v > summary.get(k, 0)}


def test_a_dataset_with_nothing_usable_is_one_clean_error(tmp_path, monkeypatch):
    monkeypatch.setattr(folder, "SKIPS", folder.SkipCounter())
    (tmp_path / "a.mp4").write_bytes(b"not a video")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"path": "a.mp4", "caption": "x"}\n{"path": "b.mp4", "caption": "y"}\n')
    cfg = micro_config(data__source="folder", data__manifest=str(manifest))
    with pytest.raises(config.ConfigError, match=r"config.data.manifest=.*m\.jsonl.*no example is usable"):
        next(iter(pipeline.dit_batches(cfg, _fake_encode(cfg))))


def test_vae_batches_skip_broken_and_too_short_files(dataset, monkeypatch):
    manifest, good, broken = dataset
    monkeypatch.setattr(folder, "SKIPS", folder.SkipCounter())
    cfg = micro_config(data__source="folder", data__manifest=manifest)
    batches = iter(pipeline.vae_batches(cfg))
    for _ in range(6):
        batch = next(batches)
        assert batch.keys() == {"video"} and batch["video"].shape == (2, 5, 16, 16, 3)
    summary = pipeline.skip_summary()
    # Images (1 frame) are too short for a 5-frame crop: counted as such, not as broken.
    assert summary["too_short"] >= 1 and set(summary) - {"examples", "skipped"} <= {
        "too_short", *broken.values(), *(fix for fix in good.values() if fix)}


def test_png_writers_used_here_make_the_modes_they_claim(tmp_path):
    # The good files must really be grey, alpha and 16-bit PNGs, or the test above proves less.
    write_image(tmp_path / "g.png", np.zeros((4, 4), np.uint8))
    for data, pix_fmt in [((tmp_path / "g.png").read_bytes(), "gray"), (encode_png(np.zeros((4, 4), np.uint8)), "gray"),
                          (_png(np.zeros((4, 4, 4), np.uint8), "rgba"), "rgba"),
                          (_png(np.zeros((4, 4), np.uint16), "gray16be"), "gray16be")]:
        with av.open(io.BytesIO(data)) as container:
            assert next(container.decode(video=0)).format.name == pix_fmt
