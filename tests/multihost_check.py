"""Run by test_multihost.py in subprocesses whose CPU device count is fixed by XLA_FLAGS.

    assembled CONFIG HOSTS WORKDIR  one process trains on global batches assembled from the HOSTS per-host
                                    shards (host 0's rows first), as a HOSTS-process run's batches are
    write WORKDIR                   8 devices, mesh data=2 x fsdp=4: a whole 4-step run in WORKDIR/whole,
                                    one stopped at step 2 in WORKDIR/parts, and WORKDIR/step2.npz holding
                                    the step-2 params as restored on the mesh that wrote them
    resume WORKDIR                  4 devices: the step-2 checkpoint restored on three other meshes and
                                    compared with step2.npz, then WORKDIR/parts resumed to step 4 on
                                    data=2 x fsdp=2; prints a JSON report
"""
import dataclasses
import json
import os
import sys

import grain
import jax
import numpy as np

jax.config.update("jax_default_matmul_precision", "float32")
jax.config.update("jax_numpy_rank_promotion", "raise")
if os.environ.get("SORAAX_TEST_CACHE"):  # the test session's compilation cache (conftest.py)
    jax.config.update("jax_compilation_cache_dir", os.environ["SORAAX_TEST_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

from soraax import checkpoints, config, sharding, train  # noqa: E402
from soraax.data import pipeline  # noqa: E402
from helpers import micro_config  # noqa: E402
from test_pipeline import _fake_encode  # noqa: E402

WRITE_MESH = dict(data=2, fsdp=4, context=1, tensor=1)
RESUME_MESH = dict(data=2, fsdp=2, context=1, tensor=1)
RESTORE_MESHES = {  # name -> (mesh, how many of the 4 devices)
    "data2_fsdp2": (RESUME_MESH, 4),
    "fsdp2_tensor2": (dict(data=1, fsdp=2, context=1, tensor=2), 4),
    "one_device": (dict(data=1, fsdp=1, context=1, tensor=1), 1),
}


def assembled_batches(host_batches, hosts: int):
    """One stream of global batches: at each step, the HOSTS per-host batches stacked in host order -
    the rows `jax.make_array_from_process_local_data` gives a HOSTS-process run on a mesh whose devices
    are in process order (as `jax.devices()` lists them)."""
    shards = grain.experimental.ZipIterDataset([host_batches(i, hosts) for i in range(hosts)])
    return shards.map(lambda rows: {k: np.concatenate([r[k] for r in rows]) for k in rows[0]})


def assembled(config_path: str, hosts: int, workdir: str):
    cfg = config.validate(config.load(config_path))
    vae_dir = cfg.vae.checkpoint
    task = train.dit_task(cfg, train.load_vae_params(cfg, vae_dir), train.vae_latent_stats(cfg, vae_dir))
    host_batches = task.batches
    task = dataclasses.replace(task, batches=lambda i, n: assembled_batches(host_batches, hosts))
    train.train(cfg, workdir, task, show_progress=False)


def fake_vae_task(cfg):
    # The pooled stand-in encoder: what is checked here is the state's sharding, not the VAE.
    encode = _fake_encode(cfg)
    return dataclasses.replace(train.dit_task(cfg), batches=lambda i, n: pipeline.dit_batches(
        cfg, encode, process_index=i, process_count=n))


def cross_mesh_config(mesh):
    # Eight rows: the batch splits over data x fsdp = 8 devices when written, 4 when resumed.
    cfg = micro_config(batch_size=8)
    cfg.mesh.update(mesh)
    return cfg


def restored_params(cfg, workdir: str, devices, step: int = 2):
    mesh = sharding.make_mesh(cfg.mesh, devices)
    task = fake_vae_task(cfg)
    _, _, abstract = train.create_state(cfg, task, mesh)
    mngr = checkpoints.manager(workdir, keep=cfg.keep_checkpoints, every=cfg.checkpoint_every)
    state = checkpoints.restore(mngr, abstract, step=step)
    mngr.close()
    shard_shapes = [x.addressable_shards[0].data.shape for x in jax.tree_util.tree_leaves(state.params)]
    return state.params, shard_shapes


def _flat(params) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def write(workdir: str):
    cfg = cross_mesh_config(WRITE_MESH)
    task = fake_vae_task(cfg)
    train.train(cfg, os.path.join(workdir, "whole"), task, show_progress=False)
    train.train(cfg, os.path.join(workdir, "parts"), task, show_progress=False, stop_at=2)
    params, shard_shapes = restored_params(cfg, os.path.join(workdir, "parts"), jax.devices())
    np.savez(os.path.join(workdir, "step2.npz"), **_flat(params))
    with open(os.path.join(workdir, "write_shards.json"), "w") as f:
        json.dump([list(s) for s in shard_shapes], f)


def resume(workdir: str):
    parts = os.path.join(workdir, "parts")
    want = dict(np.load(os.path.join(workdir, "step2.npz")))
    with open(os.path.join(workdir, "write_shards.json")) as f:
        written_shards = [tuple(s) for s in json.load(f)]
    report = {"meshes": {}}
    for name, (mesh, count) in RESTORE_MESHES.items():
        params, shard_shapes = restored_params(cross_mesh_config(mesh), parts, jax.devices()[:count])
        got = _flat(params)
        assert got.keys() == want.keys(), (name, sorted(set(got) ^ set(want)))
        report["meshes"][name] = {
            "max_param_diff": max(float(np.abs(got[k] - want[k]).max()) for k in want),
            "leaves_sharded_differently": sum(a != b for a, b in zip(shard_shapes, written_shards))}
    cfg = cross_mesh_config(RESUME_MESH)
    records = train.train(cfg, parts, fake_vae_task(cfg), show_progress=False)
    report["resumed"] = [{"step": r["step"], "loss": r["loss"], "grad_norm": r["grad_norm"]} for r in records]
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "assembled":
        assembled(args[0], int(args[1]), args[2])
    elif mode == "write":
        write(args[0])
    elif mode == "resume":
        resume(args[0])
    else:
        raise SystemExit(f"unknown mode {mode!r}: assembled | write | resume")
