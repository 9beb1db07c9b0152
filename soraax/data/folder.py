"""A folder of videos and images with a JSONL captions manifest, as a Grain source.

The manifest has one object a line, `{"path": "clips/a.mp4", "caption": "a dog runs"}`; relative paths
resolve against the manifest's folder, so a dataset folder can move as a whole. `ManifestSource` only
lists (path, caption); decoding is a separate map, `decode_example`, shared with the TFDS ArrayRecord
source so both paths yield the same `{"video": uint8 [T, H, W, 3], "caption": str}`:

    source = ManifestSource("data/manifest.jsonl")
    clips = grain.MapDataset.source(source).shuffle(seed=0).map(decode_example)

A file that does not decode becomes None, which Grain's MapDataset treats as a filtered-out element, and
is counted in a `SkipCounter` by kind ("missing", "empty", "corrupt", ...), with one warning per file.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
from typing import Any, Mapping

import numpy as np

from soraax.data.video_io import VideoDecodeError, read_video

logger = logging.getLogger(__name__)


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
    instead of stopping the run; blank lines are ignored.
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
            path = os.path.normpath(os.path.join(root, os.path.expanduser(entry["path"])))
            records.append((path, normalize_caption(entry["caption"])))
    return records


def normalize_caption(caption: str | bytes | None) -> str:
    """A caption as clean text: None -> "", bytes decoded as UTF-8 with replacement, whitespace stripped."""
    return _as_text(caption).strip()


def _as_text(value: str | bytes | None) -> str:
    # TFDS hands Text features back as bytes; a manifest hands back str.
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray, np.bytes_)):
        return bytes(value).decode("utf-8", errors="replace")
    if not isinstance(value, str):
        raise TypeError(f"expected str, bytes or None, got {type(value).__name__}: {value!r}")
    return value


class SkipCounter:
    """Counts examples dropped because their file did not decode, by VideoDecodeError.kind.

    Counts live in the process that decodes. With Grain worker processes (`mp_prefetch`, or a DataLoader
    with workers) each worker holds its own copy and the trainer's copy stays at zero: log `counts()` from
    where decoding runs, or decode in threads of the training process when the numbers matter.
    Warns once per file per process, so a bad file met every epoch does not flood the log.
    """

    def __init__(self):
        self._counts: collections.Counter[str] = collections.Counter()
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def record(self, error: VideoDecodeError) -> None:
        with self._lock:
            self._counts[error.kind] += 1
            first_time = error.path not in self._warned
            self._warned.add(error.path)
        if first_time:
            logger.warning("skipping %s (%s): %s", error.path, error.kind, error.reason)

    def counts(self) -> dict[str, int]:
        """{kind: examples skipped}, e.g. {"corrupt": 2, "missing": 1}, ready for a metrics writer."""
        with self._lock:
            return dict(self._counts)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def __getstate__(self):
        # A lock cannot be pickled; a worker's copy starts with its own lock and the counts so far.
        with self._lock:
            return {"counts": dict(self._counts), "warned": set(self._warned)}

    def __setstate__(self, state):
        self._counts = collections.Counter(state["counts"])
        self._warned = state["warned"]
        self._lock = threading.Lock()


SKIPS = SkipCounter()
"""The process-wide counter decode_example uses unless given another."""


def decode_example(example: Mapping[str, Any], skips: SkipCounter | None = None, *,
                   max_frames: int | None = None) -> dict[str, Any] | None:
    """{"path"|"video_bytes", "caption"} -> {"video": uint8 [T, H, W, 3], "caption": str}, or None if unusable.

    Takes a ManifestSource item (decodes the file at "path") or a TFDS item (decodes the encoded
    "video_bytes"; "path" then only names the file in messages). max_frames keeps the first frames only.
    """
    skips = SKIPS if skips is None else skips
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
        skips.record(error)
        return None
    return {"video": video, "caption": normalize_caption(example.get("caption"))}
