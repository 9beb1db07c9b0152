"""What both Wan loaders need: a part's config.json, a param tree addressed by path tuples, and a tensor's shape
after its layout conversion (so a table's diffusers shape can be checked against soraax's param shape without data)."""

from __future__ import annotations

import json
import os
from typing import Callable

import jax
import numpy as np

from soraax import weights

CONFIG = "config.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"  # diffusers' name for a model part's single weights file


def read_part_config(folder: str, part: str) -> dict:
    """The config.json of one part of a diffusers Wan folder (`part`: "transformer", "vae"); WeightsError
    naming the folder when it has none."""
    path = os.path.join(folder, CONFIG)
    if not os.path.isfile(path):
        raise weights.WeightsError(f"{folder} holds no {CONFIG}: a diffusers Wan folder's {part}/ has {CONFIG} "
                                   f"and {WEIGHTS} (or its shards and index)")
    with open(path) as f:
        return json.load(f)


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def get_path(tree, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def shape_after(fn: Callable | None, shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape if fn is None else tuple(jax.eval_shape(fn, jax.ShapeDtypeStruct(shape, np.float32)).shape)
