"""Orbax checkpoints of a run: the train state and the Grain iterator in one step folder, plus the config.

    WORKDIR/config.json           the resolved config (sample and eval rebuild the model from it)
    WORKDIR/checkpoints/<step>/   state (params, EMA params, optimizer state, step) and data (iterator)

A train state's `frozen` params (a pretrained text encoder) are never written: they are read from their
own folder, so a checkpoint holds only what training changes, and a restored state has them empty until
`train.attach_frozen` reads them again.

Orbax writes each step to a temporary folder and renames it when complete, so a crash or kill mid-save
leaves the last complete step readable; saves are asynchronous, so training goes on while one writes.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

CONFIG_FILE = "config.json"


def manager(workdir: str, *, keep: int, every: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every,
                                           enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)


def latest_step(workdir: str) -> int | None:
    """The step of the newest complete checkpoint in `workdir`, or None when it has none."""
    folder = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(folder):
        return None
    mngr = ocp.CheckpointManager(folder)
    try:
        return mngr.latest_step()
    finally:
        mngr.close()


def _without_frozen(state):
    return state.replace(frozen={}) if hasattr(state, "frozen") else state


def save(mngr: ocp.CheckpointManager, step: int, state, data_iterator=None, *, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(_without_frozen(state))}
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return mngr.save(step, args=ocp.args.Composite(**items), force=force)


def restore(mngr: ocp.CheckpointManager, abstract_state, data_iterator=None, step: int | None = None):
    """The state at `step` (default: latest) placed by `abstract_state`'s shardings; the iterator in place."""
    step = mngr.latest_step() if step is None else step
    items = {"state": ocp.args.StandardRestore(_without_frozen(abstract_state))}
    if data_iterator is not None:
        check_data_hosts(mngr.directory / str(step) / "data", jax.process_count())
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return mngr.restore(step, args=ocp.args.Composite(**items))["state"]


def restore_weights(mngr: ocp.CheckpointManager, abstract_state, fields=("ema_params",), step: int | None = None):
    """{"step", *fields} of the checkpoint at `step` (default: latest), placed by `abstract_state`'s
    shardings; nothing else is read. Sampling and a frozen VAE need params only: the optimizer's moments
    (twice the params again) stay on disk, and a checkpoint from another optimizer setup still loads."""
    step = mngr.latest_step() if step is None else step
    item = {"step": abstract_state.step, **{field: getattr(abstract_state, field) for field in fields}}
    args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                  partial_restore=True)
    return mngr.restore(step, args=ocp.args.Composite(state=args))["state"]


def check_data_hosts(data_dir, process_count: int) -> None:
    """Raises unless the iterator states in `data_dir` were saved by `process_count` processes.

    The train state restores on any mesh and device count (Orbax reshards it), but each host saves its
    own place in its own shard of the data (`process_I-of-N.json`), and those places do not carry over to
    another number of hosts.
    """
    data_dir = epath.Path(data_dir)
    if not data_dir.is_dir():
        return
    saved = sorted({path.name.removesuffix(".json").rsplit("-of-", 1)[-1] for path in data_dir.iterdir()
                    if path.name.startswith("process_") and path.name.endswith(".json")})
    if saved and saved != [str(process_count)]:
        hosts = " or ".join(saved)
        raise FileNotFoundError(
            f"{data_dir} holds the data iterators of a run of {hosts} processes and this run has "
            f"{process_count}: the model state would restore on this mesh, but each host's place in its "
            f"data shard cannot. Resume with {hosts} processes")


def write_config(workdir: str, cfg: ml_collections.ConfigDict) -> None:
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, CONFIG_FILE)
        with open(path + ".tmp", "w") as f:  # then renamed: a kill mid-write leaves the old file whole
            f.write(cfg.to_json(indent=2))
        os.replace(path + ".tmp", path)


def read_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{workdir} holds no {CONFIG_FILE}: is it a soraax run's workdir? "
                                f"(train one with python -m soraax.train --config configs/tiny.py --workdir {workdir})")
    with open(path) as f:
        return ml_collections.ConfigDict(_tuples(json.load(f)))


def _tuples(tree: Any) -> Any:
    # JSON has no tuples; configs use them for shapes (patch_size, vae.widths, vae.crop).
    if isinstance(tree, dict):
        return {k: _tuples(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return tuple(_tuples(v) for v in tree)
    return tree
