"""A dataset written by `soraax.data.prepare`, opened as a Grain random-access source (no TensorFlow).

Items are the stored records, `{"video_bytes", "caption", "path", "shape"}`; the same `decode_example`
map as for a manifest folder turns them into `{"video": uint8 [T, H, W, 3], "caption": str}`:

    source = open_tfds_source("~/tensorflow_datasets", "my_clips")
    clips = grain.MapDataset.source(source).shuffle(seed=0).map(decode_example)

Decoding stays a map rather than part of the source so that Grain parallelises it and a corrupt record is
skipped and counted like a corrupt file.
"""

from __future__ import annotations

import os

import tensorflow_datasets as tfds

from soraax.data.prepare import video_features


def open_tfds_source(data_dir: str | os.PathLike, name: str, split: str = "train"):
    """`tfds.data_source` over DATA_DIR/NAME (name may pin a version, "my_clips:1.0.0").

    `split` takes TFDS slicing, e.g. "train[:95%]". Raises FileNotFoundError naming what DATA_DIR holds
    when the dataset is not there, and ValueError when it was not written by soraax.data.prepare.
    """
    data_dir = os.path.expanduser(os.fspath(data_dir))
    dataset_root = os.path.join(data_dir, name.split(":")[0])
    if not os.path.isdir(dataset_root):
        found = sorted(os.listdir(data_dir)) if os.path.isdir(data_dir) else "no such folder"
        raise FileNotFoundError(
            f"no dataset {name!r} in {data_dir} (it holds: {found}); write one with "
            f"python -m soraax.data.prepare --manifest M.jsonl --out {data_dir} --name {name.split(':')[0]}")
    source = tfds.data_source(name, split=split, data_dir=data_dir)
    expected, stored = set(video_features().keys()), set(source.dataset_info.features.keys())
    if not expected <= stored:
        raise ValueError(f"{dataset_root}: features {sorted(stored)} lack {sorted(expected - stored)}; "
                         "it was not written by soraax.data.prepare")
    return source
