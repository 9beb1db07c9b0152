"""Writes a captions manifest as a TFDS dataset in ArrayRecord format, without TensorFlow.

    python -m soraax.data.prepare --manifest data/manifest.jsonl --out ~/tensorflow_datasets --name my_clips

Each example holds the file's original bytes (`video_bytes`, not re-encoded, so nothing is lost and
decoding stays in the training pipeline where the native size is wanted), its `caption`, its `path`
(for messages) and its `shape` = (num_frames, height, width) probed now, so a loader can plan token budgets
without decoding. Files that do not decode are skipped, warned about once each, and counted in the summary.

The result is `OUT/NAME/VERSION/` with ArrayRecord shards plus TFDS metadata, read back by
`soraax.data.tfds_source.open_tfds_source(OUT, NAME)`. The folder appears only once complete.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import re
import shutil

import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from soraax.data.folder import SkipCounter, read_manifest
from soraax.data.video_io import VideoDecodeError, probe

SPLIT = "train"
_DATASET_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def video_features() -> tfds.features.FeaturesDict:
    """The TFDS feature spec of a prepared dataset."""
    return tfds.features.FeaturesDict({
        "video_bytes": tfds.features.Tensor(
            shape=(), dtype=np.object_, doc="the source file's bytes (mp4, png, ...), as on disk"),
        "caption": tfds.features.Text(doc="caption from the manifest, UTF-8"),
        "path": tfds.features.Text(doc="the source file at prepare time, for error messages"),
        "shape": tfds.features.Tensor(
            shape=(3,), dtype=np.int32, doc="(num_frames, height, width) probed at prepare time"),
    })


@dataclasses.dataclass(frozen=True)
class Prepared:
    dataset_dir: str
    num_examples: int
    num_shards: int
    skipped: dict[str, int]

    def summary(self) -> str:
        skipped = sum(self.skipped.values())
        kinds = ", ".join(f"{kind}={count}" for kind, count in sorted(self.skipped.items()))
        return (f"wrote {self.num_examples} examples in {self.num_shards} shard(s) to {self.dataset_dir}; "
                f"skipped {skipped} unreadable file(s)" + (f" ({kinds})" if kinds else ""))


def default_name(manifest_path: str) -> str:
    """A valid TFDS dataset name from the manifest's file name: "My Clips-v2.jsonl" -> "my_clips_v2"."""
    stem = os.path.splitext(os.path.basename(manifest_path))[0]
    name = re.sub(r"[^a-z0-9]+", "_", stem.lower()).strip("_")
    return name if _DATASET_NAME.match(name) else f"videos_{name}".rstrip("_")


def prepare(manifest_path: str | os.PathLike, out_dir: str | os.PathLike, name: str | None = None, *,
            version: str = "1.0.0", examples_per_shard: int = 1024, show_progress: bool = True) -> Prepared:
    """Writes every decodable manifest entry to OUT/NAME/VERSION as the TFDS split "train"."""
    manifest_path, out_dir = os.fspath(manifest_path), os.fspath(out_dir)
    records = read_manifest(manifest_path)
    name = default_name(manifest_path) if name is None else name
    if not _DATASET_NAME.match(name):
        raise ValueError(
            f"dataset name {name!r} must be lower_snake_case (letters, digits, _), like 'my_clips'")
    if not tfds.core.Version.is_valid(version):
        raise ValueError(f"version {version!r} must be MAJOR.MINOR.PATCH, like 1.0.0")
    if examples_per_shard < 1:
        raise ValueError(f"examples_per_shard must be >= 1, got {examples_per_shard}")
    dataset_dir = os.path.join(out_dir, name, version)
    if os.path.exists(dataset_dir):
        raise FileExistsError(f"{dataset_dir} already exists; remove it, or pass another --name or --version")
    # Shards go to a scratch folder renamed at the end, so a crash never leaves a dataset TFDS would load.
    scratch_dir = dataset_dir + ".incomplete"
    shutil.rmtree(scratch_dir, ignore_errors=True)
    os.makedirs(scratch_dir)

    features, skips = video_features(), SkipCounter()
    try:
        shard_lengths, num_bytes = _write_shards(
            records, scratch_dir, name, features, skips, examples_per_shard, show_progress)
        if not shard_lengths:
            raise ValueError(
                f"{manifest_path}: none of its {len(records)} files decode (skipped: {skips.counts()})")
        # check_data=True would read the data back through tf.data, which needs TensorFlow.
        tfds.folder_dataset.write_metadata(
            data_dir=scratch_dir, features=features, version=version, check_data=False,
            split_infos=[tfds.core.SplitInfo(name=SPLIT, shard_lengths=shard_lengths, num_bytes=num_bytes)],
            description=f"Captioned videos from {os.path.abspath(manifest_path)}, "
                        "written by soraax.data.prepare.")
    except BaseException:
        shutil.rmtree(scratch_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(scratch_dir))  # the NAME folder, if this run made it and it is empty
        raise
    os.rename(scratch_dir, dataset_dir)
    return Prepared(dataset_dir, sum(shard_lengths), len(shard_lengths), skips.counts())


def _write_shards(records, shard_dir, name, features, skips, examples_per_shard, show_progress):
    """Serialises every decodable record into ArrayRecord shards named as TFDS expects.

    Returns (examples per shard, total serialised bytes).
    """
    shard_lengths, num_bytes, writer = [], 0, None
    for path, caption in tqdm(records, desc=f"writing {name}", unit="file", disable=not show_progress):
        try:
            shape = probe(path)
        except VideoDecodeError as error:
            skips.record(error)
            continue
        with open(path, "rb") as f:
            video_bytes = f.read()
        serialized = features.serialize_example({
            "video_bytes": video_bytes, "caption": caption, "path": path,
            "shape": np.asarray(shape, np.int32)})
        if writer is None:
            writer = array_record_module.ArrayRecordWriter(
                os.path.join(shard_dir, f"shard-{len(shard_lengths)}"), "group_size:1")
            shard_lengths.append(0)
        writer.write(serialized)
        shard_lengths[-1] += 1
        num_bytes += len(serialized)
        if shard_lengths[-1] == examples_per_shard:
            writer.close()
            writer = None
    if writer is not None:
        writer.close()
    # The shard count is only known now, and TFDS file names carry it ("-00000-of-00003").
    for index in range(len(shard_lengths)):
        os.rename(os.path.join(shard_dir, f"shard-{index}"), os.path.join(
            shard_dir, f"{name}-{SPLIT}.array_record-{index:05d}-of-{len(shard_lengths):05d}"))
    return shard_lengths, num_bytes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m soraax.data.prepare",
        description="Write a JSONL captions manifest ({\"path\": ..., \"caption\": ...} per line) as a TFDS "
                    "dataset in ArrayRecord format (no TensorFlow needed), read back with "
                    "soraax.data.tfds_source.open_tfds_source(OUT, NAME).")
    parser.add_argument("--manifest", required=True,
                        help="JSONL manifest; relative paths resolve against its folder")
    parser.add_argument("--out", required=True, help="TFDS data_dir; the dataset goes to OUT/NAME/VERSION")
    parser.add_argument("--name", default=None,
                        help="dataset name, lower_snake_case (default: from the manifest's file name)")
    parser.add_argument("--version", default="1.0.0", help="dataset version (default: %(default)s)")
    parser.add_argument("--examples_per_shard", type=int, default=1024,
                        help="examples per ArrayRecord file (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        with logging_redirect_tqdm():  # skip warnings print above the progress bar, not through it
            prepared = prepare(args.manifest, args.out, args.name, version=args.version,
                               examples_per_shard=args.examples_per_shard)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        parser.error(str(e))
    print(prepared.summary())


if __name__ == "__main__":
    main()
