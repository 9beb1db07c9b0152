"""Sharded equals unsharded: two train steps under data, fsdp, tensor, context and mixed meshes on 8 CPU
devices gives the 1-device loss, gradient norm and updated params, also with a frozen UMT5 encoder sharded
inside the step (a subprocess: the device count is fixed at jax import)."""
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from soraax import sharding
from helpers import ROOT


def test_mesh_shape_resolves_the_rest_and_refuses_impossible_sizes():
    assert sharding.mesh_shape(dict(data=-1, fsdp=2, context=1, tensor=2), 8) == (2, 2, 1, 2)
    with pytest.raises(ValueError, match="needs 16 devices; 8 are available"):
        sharding.mesh_shape(dict(data=4, fsdp=4, context=1, tensor=1), 8)
    with pytest.raises(ValueError, match="not divisible"):
        sharding.mesh_shape(dict(data=-1, fsdp=3, context=1, tensor=1), 8)


class _SliceDevice:
    """A stand-in for a TPU device of a multi-slice job: only what mesh building reads."""
    platform = device_kind = "cpu"
    process_index = 0

    def __init__(self, id, slice_index):
        self.id, self.slice_index = id, slice_index

    def __repr__(self):
        return f"dev{self.id}@slice{self.slice_index}"


def test_hybrid_mesh_keeps_fsdp_inside_a_slice_and_spreads_data_across_slices():
    devices = [_SliceDevice(i, i // 4) for i in range(8)]  # two slices of four chips
    cfg = ml_collections.ConfigDict(dict(data=-1, fsdp=2, context=1, tensor=1,
                                         dcn=dict(data=2, fsdp=1, context=1, tensor=1)))
    mesh = sharding.make_mesh(cfg, devices)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "context": 1, "tensor": 1}
    slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)[:, :, 0, 0]
    assert all(len(set(row)) == 1 for row in slices)  # every fsdp group talks over ICI only
    assert set(slices[:, 0]) == {0, 1}                 # data parallelism crosses the slices
    with pytest.raises(ValueError, match="spans 3 slices, which do not divide the 8 devices"):
        sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, context=1, tensor=1,
                                                          dcn=dict(data=3, fsdp=1, context=1, tensor=1))), devices)


@pytest.mark.parametrize("variant", [
    "bytes",  # the trained byte encoder on two meshes that, between them, split every axis
    # the same encoder on each axis alone (data=8, fsdp=8, tensor=2, context=4: four more compiles)
    pytest.param("every_mesh", marks=pytest.mark.slow),
    # a frozen UMT5 run inside the step, on the fsdp and mixed meshes (a minute more of compiles)
    pytest.param("umt5_in_step", marks=pytest.mark.slow)])
def test_one_step_is_the_same_on_every_mesh(variant):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.path.join(ROOT, "tests")}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "sharded_step_check.py"), variant],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["meshes"] and report["param_change"] > 1e-4  # the step moved the params, so equal params mean something
    for name, result in report["meshes"].items():
        assert result["loss_diff"] < 1e-5, (name, result)
        assert result["grad_norm_diff"] < 1e-5, (name, result)
        assert result["max_param_diff"] < 1e-5, (name, result)
