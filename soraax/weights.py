"""Pretrained weights from safetensors files: read by name, checked by shape, placed straight into shardings.

A checkpoint folder holds `model.safetensors`, or shards named by `model.safetensors.index.json` (the Hugging
Face layout), or any `*.safetensors` files. Nothing is read when a folder is opened: a `TensorRef` knows its
name, shape and dtype from the file header and reads bytes only when a slice is asked for, so `place` gives
each device (and so each host) only its own shard of a large tensor, and no host ever holds the whole model.

Loaders map checkpoint names onto a param tree with `take`, which says which tensor is missing, which has the
wrong shape, and (through `check_all_used`) which checkpoint tensors nothing took: a silent mismatch is how a
half-loaded model gets trained for a week.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy, which safetensors' numpy reader needs
import numpy as np
from safetensors import SafetensorError, safe_open

INDEX_SUFFIX = ".safetensors.index.json"


class WeightsError(ValueError):
    """A checkpoint does not fit the model: the message names the folder, the tensor and the shapes."""


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """One tensor in a safetensors file; `read(index)` reads that slice only (numpy, the file's dtype)."""
    path: str
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: F32, BF16, F16, I64, ...

    def read(self, index: Any = ()) -> np.ndarray:
        with safe_open(self.path, framework="numpy") as f:
            if index == () or index is Ellipsis:
                return np.asarray(f.get_tensor(self.name))
            return np.asarray(f.get_slice(self.name)[index])


def _files(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise WeightsError(f"weights folder {folder!r} does not exist")
    names = sorted(os.listdir(folder))
    index = [n for n in names if n.endswith(INDEX_SUFFIX)]
    if index:
        with open(os.path.join(folder, index[0])) as f:
            shards = sorted(set(json.load(f).get("weight_map", {}).values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
        if missing:
            raise WeightsError(f"{os.path.join(folder, index[0])} names shard(s) {missing} that are not in {folder}")
        return [os.path.join(folder, s) for s in shards]
    files = [os.path.join(folder, n) for n in names if n.endswith(".safetensors")]
    if not files:
        raise WeightsError(f"{folder} holds no *.safetensors file (nor a *{INDEX_SUFFIX})")
    return files


def open_folder(folder: str) -> dict[str, TensorRef]:
    """name -> TensorRef for every tensor in the folder's safetensors files (headers only)."""
    refs: dict[str, TensorRef] = {}
    for path in _files(folder):
        try:
            with safe_open(path, framework="numpy") as f:
                for name in f.keys():
                    piece = f.get_slice(name)
                    refs[name] = TensorRef(path, name, tuple(int(d) for d in piece.get_shape()), piece.get_dtype())
        except (OSError, SafetensorError) as error:
            raise WeightsError(f"cannot read {path}: {error}") from error
    return refs


class Taker:
    """Takes tensors out of a folder's refs by name, checking shapes; remembers what it took."""

    def __init__(self, folder: str, refs: dict[str, TensorRef] | None = None):
        self.folder = folder
        self.refs = open_folder(folder) if refs is None else refs
        self.taken: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.refs

    def take(self, name: str, shape: tuple[int, ...], transform: Callable[[np.ndarray], np.ndarray] | None = None,
             source_shape: tuple[int, ...] | None = None) -> "LazyTensor":
        """The tensor `name`, which must have `source_shape` on disk (default `shape`), lazily transformed.

        `transform` maps the stored array to the param (a transpose, a reshape); a transformed tensor is read
        whole when it is placed, an untransformed one slice by slice.
        """
        ref = self.refs.get(name)
        if ref is None:
            # Names end in "weight"/"bias": the two last parts ("query.weight") say what kind of tensor it is.
            tail = ".".join(name.split(".")[-2:])
            near = sorted(n for n in self.refs if n.endswith(tail))[:3]
            hint = f"; the checkpoint has {near}" if near else ""
            raise WeightsError(f"{self.folder}: tensor {name!r} is missing{hint}")
        want = tuple(shape if source_shape is None else source_shape)
        if ref.shape != want:
            raise WeightsError(f"{self.folder}: tensor {name!r} has shape {list(ref.shape)}, the model needs "
                               f"{list(want)}")
        self.taken.add(name)
        return LazyTensor(ref, tuple(shape), transform)

    def check_all_used(self, ignore: Callable[[str], bool] = lambda name: False) -> None:
        unused = sorted(n for n in self.refs if n not in self.taken and not ignore(n))
        if unused:
            more = f" and {len(unused) - 8} more" if len(unused) > 8 else ""
            raise WeightsError(f"{self.folder}: {len(unused)} tensor(s) the model has no place for: "
                               f"{unused[:8]}{more} (a config that does not match the checkpoint?)")


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """A param to be: `shape` after `transform` of the stored tensor; read when placed."""
    ref: TensorRef
    shape: tuple[int, ...]
    transform: Callable[[np.ndarray], np.ndarray] | None = None

    def read(self, index: Any = ()) -> np.ndarray:
        if self.transform is None:
            return self.ref.read(index)
        whole = np.asarray(self.transform(self.ref.read()))
        if whole.shape != self.shape:
            raise WeightsError(f"{self.ref.path}: {self.ref.name} became {whole.shape}, expected {self.shape}")
        return whole[index] if index != () else whole


def _is_leaf(x) -> bool:
    return isinstance(x, (LazyTensor, np.ndarray))


def place(tree, shardings, dtype=np.float32):
    """A tree of LazyTensors/arrays -> jax Arrays of `dtype` with `shardings` (a matching tree).

    Each device's shard is read on its own (`make_array_from_callback`), so a host reads only what its
    devices hold.
    """
    def put(leaf, sharding):
        shape = leaf.shape

        def shard(index):
            part = leaf.read(index) if isinstance(leaf, LazyTensor) else np.asarray(leaf)[index]
            return np.asarray(part).astype(dtype)
        return jax.make_array_from_callback(shape, sharding, shard)
    return jax.tree_util.tree_map(put, tree, shardings, is_leaf=_is_leaf)


def materialise(tree, dtype=np.float32):
    """A tree of LazyTensors -> numpy arrays (small models, tests)."""
    return jax.tree_util.tree_map(lambda leaf: np.asarray(leaf.read() if isinstance(leaf, LazyTensor) else leaf)
                                  .astype(dtype), tree, is_leaf=_is_leaf)


def shapes(tree):
    """A tree of LazyTensors -> jax.ShapeDtypeStruct (float32), to compare with a module's abstract params."""
    return jax.tree_util.tree_map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, np.float32), tree, is_leaf=_is_leaf)


def check_tree(loaded, expected, where: str) -> None:
    """Raises WeightsError unless `loaded` (LazyTensors) has exactly the params and shapes of `expected`
    (a module's abstract params): the loader itself is held to the module it loads into."""
    flat_loaded = {jax.tree_util.keystr(k): v.shape for k, v in
                   jax.tree_util.tree_flatten_with_path(loaded, is_leaf=_is_leaf)[0]}
    flat_expected = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in
                     jax.tree_util.tree_flatten_with_path(expected)[0]}
    missing = sorted(set(flat_expected) - set(flat_loaded))
    extra = sorted(set(flat_loaded) - set(flat_expected))
    wrong = sorted(k for k in set(flat_expected) & set(flat_loaded) if flat_expected[k] != flat_loaded[k])
    if missing or extra or wrong:
        raise WeightsError(f"{where}: the loaded params do not match the module: missing {missing[:5]}, "
                           f"unexpected {extra[:5]}, mis-shaped {[(k, flat_loaded[k], flat_expected[k]) for k in wrong[:5]]}")
