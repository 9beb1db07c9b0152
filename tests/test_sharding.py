"""Sharded equals unsharded: two train steps under data, fsdp, tensor, context and mixed meshes on 8 CPU
devices gives the 1-device loss, gradient norm and updated params (a subprocess: the device count is fixed at jax import)."""
import json
import os
import subprocess
import sys

import pytest

from soraax import sharding
from helpers import ROOT


def test_mesh_shape_resolves_the_rest_and_refuses_impossible_sizes():
    assert sharding.mesh_shape(dict(data=-1, fsdp=2, context=1, tensor=2), 8) == (2, 2, 1, 2)
    with pytest.raises(ValueError, match="needs 16 devices; 8 are available"):
        sharding.mesh_shape(dict(data=4, fsdp=4, context=1, tensor=1), 8)
    with pytest.raises(ValueError, match="not divisible"):
        sharding.mesh_shape(dict(data=-1, fsdp=3, context=1, tensor=1), 8)


def test_one_step_is_the_same_on_every_mesh():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.path.join(ROOT, "tests")}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "sharded_step_check.py")],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["param_change"] > 1e-4  # the step moved the params, so equal params mean something
    for name, result in report["meshes"].items():
        assert result["loss_diff"] < 1e-5, (name, result)
        assert result["grad_norm_diff"] < 1e-5, (name, result)
        assert result["max_param_diff"] < 1e-5, (name, result)
