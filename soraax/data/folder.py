"""A folder of videos and images with a JSONL captions manifest, as a Grain source.

The manifest has one object a line, `{"path": "clips/a.mp4", "caption": "a dog runs"}`; relative paths
resolve against the manifest's folder, so a dataset folder can move as a whole. `ManifestSource` only
lists (path, caption); decoding is a separate map shared with the TFDS ArrayRecord source, so both paths
yield the same `{"video": uint8 [T, H, W, 3], "caption": str}`:

    source = ManifestSource("data/manifest.jsonl")
    clips = grain.MapDataset.source(source).shuffle(seed=0).map(decode_example)

Bad input never stops a run. A file that does not decode (or whose aspect is absurd) is skipped; a caption
that is empty, not UTF-8, full of control characters or huge is normalised and kept. Both are counted by
kind in a `SkipCounter`, with one warning per bad file (skips) or per kind (captions):

- `decode_example` counts where it runs and returns None for a skip (Grain's MapDataset drops None); that
  is exact in one process.
- `decode_clip` counts nothing: a skip becomes a small marker record `{"_skipped": kind, "_path", "_reason"}`
  and a kept clip carries `"_path"` and its `"_caption_fixes"`. Worker processes pass these through, and the
  training process counts them with `SkipCounter.record_example` (soraax.data.pipeline does this after
  its worker processes), so the counts are exact whatever the number of Grain workers.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import threading
from typing import Any, Mapping

import numpy as np

from soraax.data.video_io import DECODE_FAILURE_KINDS, VideoDecodeError, read_video

logger = logging.getLogger(__name__)

MAX_ASPECT_RATIO = 8.0
"""Longest side over shortest side beyond which a clip is skipped ("aspect"). 32:9 ultrawide is 3.6 and a
phone panorama about 4-6; a 1x4000 strip is a scan line, a banner or a bug. Keeping one would mean
distorting it (the token budget holds a side of at least one patch) or, for a VAE crop, upscaling one side
thousands of times."""

MAX_CAPTION_CHARS = 65_536
"""Captions are cut here ("caption_huge"): far beyond any text_len a tokenizer keeps (512 tokens of text
are a few thousand characters), and small enough that a 1 GB caption line costs no memory downstream."""

SKIP_KINDS = (*DECODE_FAILURE_KINDS, "aspect", "too_short")
"""Why an example was dropped: a VideoDecodeError kind, an absurd aspect, or fewer frames than the
pipeline needs ("too_short", from soraax.data.pipeline)."""

# Skips that follow from the config, not from a bad file (every image is too short for a 5-frame VAE
# crop, and the synthetic default holds images): one info line for the kind, not a warning per file.
_CONFIG_SKIPS = ("too_short",)

CAPTION_FIXES = ("empty_caption", "caption_not_utf8", "caption_control_chars", "caption_huge")
"""How a kept caption was normalised. An empty caption is legal (it is the unconditional text of
classifier-free guidance) and only counted."""

SKIPPED, PATH, REASON, FIXES = "_skipped", "_path", "_reason", "_caption_fixes"
"""Bookkeeping keys of decode_clip's records; every one starts with "_" (see `without_bookkeeping`)."""

# C0 and C1 control characters but tab and newline: NUL and escape codes break tokenizers and logs,
# while tabs and line breaks are ordinary whitespace in long captions.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Lone surrogates: what JSON escapes like "\udcff" decode to; UTF-8 cannot encode them.
_SURROGATE = re.compile("[\ud800-\udfff]")


class ManifestSource:
    """Grain RandomAccessDataSource over a JSONL manifest: item i is `{"path": str, "caption": str}`.

    The manifest is read once, at construction, so a malformed line fails before training starts.
    """

    def __init__(self, manifest_path: str | os.PathLike):
        self.manifest_path = os.fspath(manifest_path)
        self._records = read_manifest(self.manifest_path)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index) -> dict[str, str]:
        path, caption = self._records[index]
        return {"path": path, "caption": caption}

    def __repr__(self) -> str:
        return f"ManifestSource({self.manifest_path!r}, {len(self)} examples)"


def read_manifest(manifest_path: str) -> list[tuple[str, str]]:
    """[(resolved path, caption)] from a JSONL manifest; ValueError names the file and line if malformed.

    Lines are decoded as UTF-8 with replacement so that a caption in another encoding degrades to U+FFFD
    instead of stopping the run; blank lines are ignored. Captions are otherwise kept as written (None
    becomes ""): `clean_caption` normalises them when an example is decoded, where the change is counted.
    """
    if not os.path.isfile(manifest_path):
        raise FileNotFoundError(f"manifest {manifest_path} does not exist (expected a JSONL file)")
    root = os.path.dirname(os.path.abspath(manifest_path))
    records = []
    with open(manifest_path, "rb") as f:
        for line_number, raw_line in enumerate(f, start=1):
            line = raw_line.decode("utf-8", errors="replace").strip()
            if not line:
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{manifest_path}:{line_number}: not valid JSON ({e}): {line[:200]}") from e
            if (not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"]
                    or "caption" not in entry or not isinstance(entry["caption"], (str, type(None)))):
                raise ValueError(
                    f"{manifest_path}:{line_number}: expected an object "
                    f'{{"path": non-empty str, "caption": str or null}}, got {line[:200]}')
            path = os.path.normpath(os.path.join(root, os.path.expanduser(_encodable(entry["path"]))))
            records.append((path, _encodable(_as_text(entry["caption"]))))
    return records


def _encodable(text: str) -> str:
    """`text` with lone surrogates (from JSON escapes) replaced by U+FFFD, so it encodes as UTF-8."""
    return _SURROGATE.sub("\ufffd", text)


def clean_caption(caption: str | bytes | None) -> tuple[str, tuple[str, ...]]:
    """(caption as clean text, the CAPTION_FIXES it needed).

    None -> ""; bytes decoded as UTF-8 with replacement; U+FFFD anywhere counts as "caption_not_utf8"
    (bytes replaced here or by whoever wrote the caption); control characters become spaces; cut at
    MAX_CAPTION_CHARS; whitespace stripped.
    """
    text = _as_text(caption)
    fixes = []
    if len(text) > MAX_CAPTION_CHARS:
        text = text[:MAX_CAPTION_CHARS]
        fixes.append("caption_huge")
    text = _encodable(text)
    if "\ufffd" in text:
        fixes.append("caption_not_utf8")
    text, controls = _CONTROL.subn(" ", text)
    if controls:
        fixes.append("caption_control_chars")
    text = text.strip()
    if not text:
        fixes.append("empty_caption")
    return text, tuple(fixes)


def normalize_caption(caption: str | bytes | None) -> str:
    """A caption as clean text (see clean_caption), without the record of what was fixed."""
    return clean_caption(caption)[0]


def _as_text(value: str | bytes | None) -> str:
    # TFDS hands Text features back as bytes; a manifest hands back str.
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray, np.bytes_)):
        return bytes(value).decode("utf-8", errors="replace")
    if not isinstance(value, str):
        raise TypeError(f"expected str, bytes or None, got {type(value).__name__}: {value!r}")
    return value


# -------------------------------------------------------------------------------------- decode records


def skip_marker(path: str, kind: str, reason: str) -> dict[str, str]:
    """The record that stands for an unusable example until the training process counts and drops it."""
    if kind not in SKIP_KINDS:
        raise ValueError(f"kind must be one of {SKIP_KINDS}, got {kind!r}")
    return {SKIPPED: kind, PATH: path, REASON: reason}


def is_skipped(example: Mapping[str, Any]) -> bool:
    return SKIPPED in example


def bookkeeping(example: Mapping[str, Any]) -> dict[str, Any]:
    """The bookkeeping entries of a record, for a map that builds a new record to carry them along."""
    return {key: value for key, value in example.items() if key.startswith("_")}


def without_bookkeeping(example: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in example.items() if not key.startswith("_")}


def _aspect_problem(video_THWC: np.ndarray) -> str | None:
    height, width = video_THWC.shape[1:3]
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        return (f"{width}x{height} pixels: aspect ratio {ratio:.1f}:1 exceeds "
                f"soraax.data.folder.MAX_ASPECT_RATIO={MAX_ASPECT_RATIO:g}")
    return None


def decode_clip(example: Mapping[str, Any], *, max_frames: int | None = None) -> dict[str, Any]:
    """{"path"|"video_bytes", "caption"} -> {"video": uint8 [T, H, W, 3], "caption": str, "_path",
    "_caption_fixes"}, or a skip_marker; counts nothing, so it may run in any process.

    Takes a ManifestSource item (decodes the file at "path") or a TFDS item (decodes the encoded
    "video_bytes"; "path" then only names the file in messages). max_frames keeps the first frames only.
    """
    if "video_bytes" in example:
        source = example["video_bytes"]
    elif "path" in example:
        source = _as_text(example["path"])
    else:
        raise KeyError(f"an example needs 'path' or 'video_bytes' to decode; got keys {sorted(example)}")
    name = _as_text(example.get("path")) or "<unnamed example>"
    try:
        video = read_video(source, max_frames, name=name)
    except VideoDecodeError as error:
        return skip_marker(name, error.kind, error.reason)
    aspect = _aspect_problem(video)
    if aspect is not None:
        return skip_marker(name, "aspect", aspect)
    caption, fixes = clean_caption(example.get("caption"))
    return {"video": video, "caption": caption, PATH: name, FIXES: fixes}


class SkipCounter:
    """Counts examples dropped (by SKIP_KINDS) and captions normalised (by CAPTION_FIXES).

    Counts live in the process that records them: for exact counts with Grain worker processes, record
    decode_clip's records in the training process (`record_example`), as soraax.data.pipeline does.
    Warns once per file for a skip, so a bad file met every epoch does not flood the log, and once per
    kind for a caption fix, so a dataset of uncaptioned images is one line; a "too_short" clip (the
    config's doing, not the file's) is one info line.
    """

    def __init__(self):
        self._counts: collections.Counter[str] = collections.Counter()
        self._fixes: collections.Counter[str] = collections.Counter()
        self._examples = 0
        self._warned: set[str] = set()        # files skipped
        self._warned_fixes: set[str] = set()  # kinds of caption fix
        self._lock = threading.Lock()

    def record(self, error: VideoDecodeError) -> None:
        """One file that did not decode."""
        self._skip(error.path, error.kind, error.reason)

    def record_example(self, example: Mapping[str, Any]) -> bool:
        """Counts one decode_clip record (any other record counts as one good example); True to keep it."""
        if is_skipped(example):
            self._skip(example[PATH], example[SKIPPED], example[REASON])
            return False
        fixes = example.get(FIXES, ())
        with self._lock:
            self._examples += 1
            self._fixes.update(fixes)
            first_times = [kind for kind in fixes if kind not in self._warned_fixes]
            self._warned_fixes.update(first_times)
        for kind in first_times:
            logger.warning("normalised the caption of %s (%s); further %s captions are counted in the "
                           "skip summary, not warned about", example.get(PATH, "an example"), kind, kind)
        return True

    def _skip(self, path: str, kind: str, reason: str) -> None:
        by_config = kind in _CONFIG_SKIPS
        with self._lock:
            self._examples += 1
            self._counts[kind] += 1
            first_time = (kind if by_config else path) not in self._warned
            self._warned.add(kind if by_config else path)
        if first_time and by_config:
            logger.info("skipping %s (%s): %s; further %s skips are counted, not logged", path, kind, reason, kind)
        elif first_time:
            logger.warning("skipping %s (%s): %s", path, kind, reason)

    def counts(self) -> dict[str, int]:
        """{kind: examples skipped}, e.g. {"corrupt": 2, "missing": 1}, ready for a metrics writer."""
        with self._lock:
            return dict(self._counts)

    def fixes(self) -> dict[str, int]:
        """{kind: captions normalised}, e.g. {"empty_caption": 40}; the examples were kept."""
        with self._lock:
            return dict(self._fixes)

    def snapshot(self) -> tuple[int, dict[str, int], dict[str, int]]:
        """(examples recorded, counts(), fixes()) taken together, so they describe the same examples."""
        with self._lock:
            return self._examples, dict(self._counts), dict(self._fixes)

    @property
    def total(self) -> int:
        """Examples skipped."""
        with self._lock:
            return sum(self._counts.values())

    @property
    def examples(self) -> int:
        """Examples recorded, kept or skipped: what `total` is a share of."""
        with self._lock:
            return self._examples

    def __getstate__(self):
        # A lock cannot be pickled; a worker's copy starts with its own lock and the counts so far.
        with self._lock:
            return {"counts": dict(self._counts), "fixes": dict(self._fixes), "examples": self._examples,
                    "warned": set(self._warned), "warned_fixes": set(self._warned_fixes)}

    def __setstate__(self, state):
        self._counts = collections.Counter(state["counts"])
        self._fixes = collections.Counter(state.get("fixes", {}))
        self._examples = state.get("examples", 0)
        self._warned = state["warned"]
        self._warned_fixes = state.get("warned_fixes", set())
        self._lock = threading.Lock()


SKIPS = SkipCounter()
"""The process-wide counter decode_example and the training pipeline use unless given another."""


def decode_example(example: Mapping[str, Any], skips: SkipCounter | None = None, *,
                   max_frames: int | None = None) -> dict[str, Any] | None:
    """{"path"|"video_bytes", "caption"} -> {"video": uint8 [T, H, W, 3], "caption": str}, or None if unusable.

    decode_clip, counted in `skips` (default SKIPS) where it runs: exact in one process; in Grain worker
    processes each worker counts in its own copy (use decode_clip and count in the trainer instead).
    """
    record = decode_clip(example, max_frames=max_frames)
    if not (SKIPS if skips is None else skips).record_example(record):
        return None
    return without_bookkeeping(record)
