"""What both Wan loaders' tables need: a param tree addressed by path tuples, and a tensor's shape after its
layout conversion (so a table's diffusers shape can be checked against soraax's param shape without data)."""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np


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
