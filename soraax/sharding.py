"""Every sharding decision in one place: the mesh, and one table from logical axis names to mesh axes.

Modules name their axes (`batch`, `length`, `embed`, ...) and never mention a mesh; changing parallelism
is a change to `config.mesh` alone. Flax resolves a logical axis to the first rule whose mesh axes are not
already used by that array, so one name serves params and activations: a param `(embed, mlp)` is sharded
`(fsdp, tensor)` while an activation `(batch, length, embed)` is `((data, fsdp), context, None)`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "context", "tensor")

LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", "context"),
    ("text_length", None),
    ("embed", "fsdp"),
    ("embed", None),
    ("mlp", "tensor"),
    ("mlp", None),
    ("heads", "tensor"),
    ("heads", None),
    ("kv", None),
    ("vocab", None),
    ("layers", None),
    ("frames", None),
    ("height", None),
    ("width", None),
    ("channels", None),
    ("conv_in", None),
    ("conv_out", None),
)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
    """Resolves config.mesh (one axis may be -1 = "the rest") against the number of devices."""
    sizes = [int(mesh_cfg[name]) for name in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"config.mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not "
                             f"divisible by the fixed axes' product {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices; "
                         f"{num_devices} are available")
    return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_cfg, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_sharding(tree, mesh: Mesh, rules=LOGICAL_RULES):
    """NamedShardings for a tree of (possibly `nn.LogicallyPartitioned`) arrays or shape structs."""
    specs = nn.get_partition_spec(tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Packed rows split over data and fsdp; the sequence over context."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), "context"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


@contextlib.contextmanager
def rules_context(mesh: Mesh, rules=LOGICAL_RULES):
    """Mesh and rule table in scope, so `nn.with_logical_constraint` inside traced code takes effect."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield
