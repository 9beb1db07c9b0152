"""Long runs lose nothing: SIGTERM saves and exits 0, a kill -9 mid-save leaves the last checkpoint readable,
and both resume to the losses of a run never interrupted; a NaN batch is skipped, and a run whose loss stays
non-finite stops with a clear message and never checkpoints NaN params."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from soraax import checkpoints, sharding, train
from helpers import MICRO, ROOT, micro_config

STEPS = 40  # long enough that a signal sent after the first logged step lands mid-run


def _flags(workdir, vae_dir, **extra):
    overrides = {**MICRO, "total_steps": STEPS, "checkpoint_every": 1, "log_every": 1, "vae.checkpoint": vae_dir,
                 **extra}
    flags = [f"--config.{k}={v}" for k, v in overrides.items() if k not in {"vae.widths", "vae.crop"}]
    flags += ["--config.vae.widths=(4,8,8)", "--config.vae.crop=(5,16,16)"]
    return [sys.executable, "-m", "soraax.train", "--config", os.path.join(ROOT, "configs", "tiny.py"),
            "--workdir", str(workdir), *flags]


def _cfg(vae_dir, **extra):
    return micro_config(total_steps=STEPS, checkpoint_every=1, log_every=1, vae__checkpoint=vae_dir, **extra)


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1)), "metrics read as one run"
    return [r["loss"] for r in records]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("vae"))
    train.run(micro_config(task="vae"), path)
    return path


@pytest.fixture(scope="module")
def reference(vae_dir, tmp_path_factory):
    """The uninterrupted run's losses."""
    path = str(tmp_path_factory.mktemp("whole"))
    train.run(_cfg(vae_dir), path)
    return _losses(path)


def _start(workdir, vae_dir):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(_flags(workdir, vae_dir), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, process, timeout=240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.005)
    process.kill()
    raise AssertionError("the training subprocess never reached the point to interrupt")


def _resume_to_the_end(workdir, vae_dir):
    done = subprocess.run(_flags(workdir, vae_dir), cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_sigterm_saves_exits_zero_and_resumes_to_the_same_losses(vae_dir, reference, tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    process = _start(tmp_path, vae_dir)
    assert _wait_for(lambda: metrics.exists() and metrics.stat().st_size > 0, process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-3000:]
    assert "preempted (SIGTERM) at step" in out, out[-2000:]
    step = int(out.split("preempted (SIGTERM) at step ")[1].split(":")[0])
    assert 1 <= step < STEPS
    mngr = checkpoints.manager(str(tmp_path), keep=3, every=1)
    assert mngr.latest_step() == step
    mngr.close()
    resumed = _resume_to_the_end(tmp_path, vae_dir)
    assert f"resuming from step {step}" in resumed.stdout
    np.testing.assert_allclose(_losses(tmp_path), reference, rtol=1e-6)


@pytest.mark.slow
def test_kill_9_during_a_save_leaves_the_last_checkpoint_readable_and_resume_equal(vae_dir, reference, tmp_path):
    folder = tmp_path / "checkpoints"

    def saving():  # Orbax writes a step into a temporary folder and renames it when complete
        return folder.is_dir() and any("orbax-checkpoint-tmp" in p.name for p in folder.iterdir()) \
            and any(p.name.isdigit() for p in folder.iterdir())

    process = _start(tmp_path, vae_dir)
    assert _wait_for(saving, process), "the run ended before a save could be interrupted"
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert any("orbax-checkpoint-tmp" in p.name for p in folder.iterdir())  # killed mid-save indeed
    cfg = _cfg(vae_dir)
    task = train.dit_task(cfg, train.load_vae_params(cfg, vae_dir), train.vae_latent_stats(cfg, vae_dir))
    _, _, abstract = train.create_state(cfg, task, sharding.make_mesh(cfg.mesh))
    mngr = checkpoints.manager(str(tmp_path), keep=3, every=1)
    last = mngr.latest_step()
    assert last is not None and last < STEPS
    state = checkpoints.restore(mngr, abstract)  # readable: the whole state comes back
    mngr.close()
    assert int(state.step) == last
    assert all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree_util.tree_leaves(state.params))
    resumed = _resume_to_the_end(tmp_path, vae_dir)
    assert f"resuming from step {last}" in resumed.stdout
    np.testing.assert_allclose(_losses(tmp_path), reference, rtol=1e-6)


class _Poison:
    """A map that puts NaN clean latents into the batches it sees at `bad` (0-based) positions."""

    def __init__(self, bad):
        self.bad, self.seen = bad, 0

    def __call__(self, batch):
        self.seen += 1
        if self.seen - 1 in self.bad:
            return {**batch, "tokens": np.full_like(batch["tokens"], np.nan)}
        return batch


def _poisoned(task, bad_steps):
    """The task with NaN batches at `bad_steps`; still a Grain dataset, so its iterator checkpoints."""
    return dataclasses.replace(task, batches=lambda index, count: task.batches(index, count).map(_Poison(bad_steps)))


def _dit_task(cfg, vae_dir):
    return train.dit_task(cfg, train.load_vae_params(cfg, vae_dir), train.vae_latent_stats(cfg, vae_dir))


@pytest.mark.slow  # compiles a few train steps: out of the 10-minute suite, run by .ci/run
def test_an_injected_nan_batch_is_skipped_and_counted(vae_dir, tmp_path):
    cfg = micro_config(total_steps=4, log_every=1, vae__checkpoint=vae_dir)
    clean = train.train(cfg, str(tmp_path / "clean"), _dit_task(cfg, vae_dir), show_progress=False)
    records = train.train(cfg, str(tmp_path / "nan"), _poisoned(_dit_task(cfg, vae_dir), {1}), show_progress=False)
    assert np.isnan(records[1]["loss"]) and np.isnan(records[1]["grad_norm"])
    assert [r["skipped_updates"] for r in records] == [0, 1, 1, 1]
    assert all(np.isfinite(r["loss"]) for i, r in enumerate(records) if i != 1)
    # The skipped step changed nothing: step 3 of the poisoned run sees the params step 2 left, so the two
    # runs part ways only there (different params), while step 1 is the same.
    assert records[0]["loss"] == clean[0]["loss"]
    mngr = checkpoints.manager(str(tmp_path / "nan"), keep=3, every=1)
    task = _dit_task(cfg, vae_dir)
    _, _, abstract = train.create_state(cfg, task, sharding.make_mesh(cfg.mesh))
    state = checkpoints.restore(mngr, abstract)
    mngr.close()
    assert all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree_util.tree_leaves(state.params))


@pytest.mark.slow  # compiles a few train steps: out of the 10-minute suite, run by .ci/run
def test_a_run_that_stays_non_finite_stops_clearly_and_keeps_its_last_checkpoint(vae_dir, tmp_path):
    cfg = micro_config(total_steps=12, log_every=1, checkpoint_every=2, max_nonfinite_steps=3,
                       vae__checkpoint=vae_dir)
    task = _poisoned(_dit_task(cfg, vae_dir), set(range(2, 12)))
    with pytest.raises(train.NonFiniteError, match=r"non-finite for 3 steps in a row .* last checkpoint \(step 4\)"):
        train.train(cfg, str(tmp_path), task, show_progress=False)
    mngr = checkpoints.manager(str(tmp_path), keep=3, every=2)
    steps = mngr.all_steps()
    _, _, abstract = train.create_state(cfg, task, sharding.make_mesh(cfg.mesh))
    state = checkpoints.restore(mngr, abstract)
    mngr.close()
    assert max(steps) == 4 and all(bool(np.isfinite(np.asarray(x)).all())
                                   for x in jax.tree_util.tree_leaves(state.params))


def test_metrics_of_a_resumed_run_read_as_one_run(tmp_path):
    writer = train.MetricsWriter(str(tmp_path), "dit")
    for step in (1, 2, 3, 4):
        writer.write({"step": step, "loss": float(step)})
    with open(writer.path, "a") as f:
        f.write('{"step": 5, "lo')  # a line cut short by a kill -9
    writer.keep_until(2)
    with open(writer.path) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]
