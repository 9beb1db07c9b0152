"""Run under 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8) by test_sharding.py.

Takes two train steps on the same batch on one device and under several meshes, and prints the largest
differences in loss and updated params as JSON.
"""
import json
import os
import sys

import jax
import numpy as np

jax.config.update("jax_default_matmul_precision", "float32")

from soraax import sharding, train  # noqa: E402
from soraax.data import pipeline  # noqa: E402
from soraax.models import build  # noqa: E402
from helpers import micro_config  # noqa: E402
from test_pipeline import _fake_encode  # noqa: E402

MESHES = {
    "data": dict(data=8, fsdp=1, context=1, tensor=1),
    "fsdp": dict(data=1, fsdp=8, context=1, tensor=1),
    "tensor": dict(data=4, fsdp=1, context=1, tensor=2),
    "context": dict(data=2, fsdp=1, context=4, tensor=1),
    "mixed": dict(data=2, fsdp=2, context=1, tensor=2),
    "fsdp_context": dict(data=1, fsdp=2, context=4, tensor=1),
}


def one_step(cfg, task, devices, batch):
    mesh = sharding.make_mesh(cfg.mesh, devices)
    init, step, _ = train.sharded_step(cfg, task, mesh)
    with sharding.rules_context(mesh):
        state = init(jax.random.PRNGKey(0))
        before = jax.device_get(state.params)
        global_batch = {k: jax.device_put(v, jax.sharding.NamedSharding(mesh, task.batch_specs[k]))
                        for k, v in batch.items()}
        # Two steps: Adam's first update is +-lr per param (the gradient's sign); the second depends on
        # the gradients' values.
        state, first = step(state, global_batch, jax.random.PRNGKey(1))
        state, metrics = step(state, global_batch, jax.random.PRNGKey(1))
    after = jax.device_get(state.params)
    change = max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), after, before)))
    return {"loss": float(metrics["loss"]), "grad_norm": float(first["grad_norm"])}, after, change


T5 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "t5", "umt5")
# A frozen pretrained encoder run inside the step (the tiny UMT5 of tests/data/t5) is sharded by the same
# logical rules as the DiT: its kernels split over fsdp and tensor too, and the step must not change.
VARIANTS = {"": {}, "every_mesh_": {},
            "umt5_in_step_": dict(model__text_encoder="t5", model__text_encoder_path=T5, text_len=48)}
# Two meshes put every axis above 1 (a wrong spec on any axis shows in one of them) for two compiles of the
# step, not five: the fast suite's check. "every_mesh" also runs each axis alone.
VARIANT_MESHES = {"": ("mixed", "fsdp_context"), "every_mesh_": ("data", "fsdp", "tensor", "context"),
                  "umt5_in_step_": ("fsdp", "mixed")}


def main(variants=tuple(VARIANTS)):
    report, changes, singles = {}, {}, {}
    for prefix in variants:
        overrides = VARIANTS[prefix]
        # No warmup: the first step must move the params, or equal params would prove nothing.
        cfg = micro_config(batch_size=8, warmup_steps=0, **overrides)
        task = train.dit_task(cfg)
        batch = next(iter(pipeline.dit_batches(cfg, _fake_encode(cfg), tokenizer=build(cfg).tokenizer)))
        want, want_params, changes[prefix.rstrip("_") or "bytes"] = one_step(cfg, task, jax.devices()[:1], batch)
        singles[prefix.rstrip("_") or "bytes"] = want
        for name in VARIANT_MESHES[prefix]:
            cfg.mesh.update(MESHES[name])
            got, params, _ = one_step(cfg, task, jax.devices(), batch)
            diffs = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
                lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), params, want_params))
            report[prefix + name] = {"loss_diff": abs(got["loss"] - want["loss"]),
                                     "grad_norm_diff": abs(got["grad_norm"] - want["grad_norm"]),
                                     "max_param_diff": max(diffs)}
    json.dump({"single_device": singles, "param_change": min(changes.values()), "meshes": report}, sys.stdout)


if __name__ == "__main__":
    # argv: the variants to run ("bytes", "umt5_in_step"); none: all of them.
    names = {"bytes": "", "every_mesh": "every_mesh_", "umt5_in_step": "umt5_in_step_"}
    main(tuple(names[a] for a in sys.argv[1:]) or tuple(VARIANTS))
