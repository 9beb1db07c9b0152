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
from jax.experimental import mesh_utils
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


def dcn_shape(mesh_cfg) -> tuple[int, ...]:
    """config.mesh.dcn: how many slices (or hosts) each axis spans over the slow data-center network."""
    dcn = mesh_cfg.get("dcn") if hasattr(mesh_cfg, "get") else None
    sizes = tuple(int(dcn[name]) if dcn is not None else 1 for name in MESH_AXES)
    if any(s < 1 for s in sizes):
        raise ValueError(f"config.mesh.dcn: sizes must be >= 1, got {dict(zip(MESH_AXES, sizes))}")
    return sizes


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """The device mesh of config.mesh. With `mesh.dcn` sizes above 1 it is a hybrid mesh (multi-slice):
    axis sizes are per slice (ICI) and `dcn` multiplies them across slices, so e.g. data=-1 with
    dcn.data=2 puts data parallelism across two slices and keeps fsdp/tensor traffic inside each."""
    devices = jax.devices() if devices is None else devices
    dcn = dcn_shape(mesh_cfg)
    slices = math.prod(dcn)
    if slices == 1:
        return Mesh(np.asarray(devices).reshape(mesh_shape(mesh_cfg, len(devices))), MESH_AXES)
    if len(devices) % slices:
        raise ValueError(f"config.mesh.dcn {dict(zip(MESH_AXES, dcn))} spans {slices} slices, which do not "
                         f"divide the {len(devices)} devices")
    ici = mesh_shape(mesh_cfg, len(devices) // slices)
    # Slices are TPU slices where devices say so; elsewhere (GPU clusters) each process is one.
    by_process = not hasattr(devices[0], "slice_index")
    return Mesh(mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=by_process),
                MESH_AXES)


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
