"""Multi-host for real on one machine: N processes joined by `jax.distributed` on 127.0.0.1, with CPU
devices standing in for each host's chips and gloo for the cross-process collectives.

- The launcher (launch/local.py) starts, prefixes, and stops processes, and a failure anywhere ends the run
  with the failed process named.
- A 2-process x 2-device training run equals a 1-process x 4-device run on the same global batches. Each
  host reads and packs its own shard of the clips (data/pipeline.py), so a 2-host run's batches are not a
  1-host run's; the reference assembles each global batch from the two host shards, host 0's rows first,
  which is what `jax.make_array_from_process_local_data` builds on a mesh of devices in process order.
- A checkpoint written on 8 devices (data=2 x fsdp=4) restores with identical values on other meshes and
  device counts, and the run continues with the losses of the uninterrupted run.
- `distributed.initialize` refuses settings that cannot work, naming the flag or variable, and makes the
  right `jax.distributed.initialize` call.
The two training tests take minutes on 2 cores and are marked slow (pytest -m slow tests/test_multihost.py).
"""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from soraax import checkpoints, distributed, train
from helpers import MICRO, ROOT, TINY, micro_config

LAUNCH = os.path.join(ROOT, "launch", "local.py")
CHECK = os.path.join(ROOT, "tests", "multihost_check.py")
CACHE = jax.config.jax_compilation_cache_dir  # the session's, from conftest.py


def _launch(num_processes, command, *, devices=1, timeout=120, **kwargs):
    return subprocess.run([sys.executable, LAUNCH, "--num_processes", str(num_processes),
                           "--devices_per_process", str(devices), "--", *command],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout, **kwargs)


def _check_script(devices, *args, timeout=300):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
           "SORAAX_TEST_CACHE": CACHE or "",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, CHECK, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------------------------- the launcher


SUM_OVER_PROCESSES = """
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from soraax import distributed
setup = distributed.initialize()
mesh = jax.make_mesh((jax.device_count(),), ("d",))
local = np.full(jax.local_device_count(), setup.process_index + 1.0, np.float32)
x = jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec("d")), local)
total = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, PartitionSpec()))(x)
print(f"{setup.process_index}/{setup.process_count} devices={jax.device_count()} sum={float(total)}")
"""


def test_launcher_joins_processes_whose_collectives_span_them():
    out = _launch(2, [sys.executable, "-c", SUM_OVER_PROCESSES], devices=2)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # Two devices holding 1.0 (process 0) and two holding 2.0 (process 1): only a cross-process sum gives 6.
    assert "[0] 0/2 devices=4 sum=6.0" in out.stdout.splitlines()
    assert "[1] 1/2 devices=4 sum=6.0" in out.stdout.splitlines()


def test_launcher_stops_the_others_and_names_the_failed_process():
    child = ("import os, sys, time\n"
             "if os.environ['SORAAX_PROCESS_ID'] == '1': sys.exit(3)\n"
             "time.sleep(60)\n")
    start = time.monotonic()
    out = _launch(3, [sys.executable, "-c", child])
    assert time.monotonic() - start < 30  # the sleepers were stopped, not waited for
    assert out.returncode == 3
    assert "process 1 of 3 exited with code 3" in out.stderr


def test_a_failed_process_exits_at_once_instead_of_waiting_for_its_peers():
    # Process 1 fails while process 0 waits for it (the backend's start-up exchange, then the sum): without
    # fail_fast, process 1 would sit in JAX's exit barrier for minutes, waiting for process 0 in turn.
    child = SUM_OVER_PROCESSES.replace(
        "setup = distributed.initialize()\n",
        "setup = distributed.initialize()\n"
        "with distributed.fail_fast(setup):\n"
        "    if setup.process_index == 1: raise RuntimeError('data shard 1 is corrupt')\n")
    start = time.monotonic()
    out = _launch(2, [sys.executable, "-c", child], devices=1, timeout=60)
    assert time.monotonic() - start < 45
    assert out.returncode == 1
    assert "[1] RuntimeError: data shard 1 is corrupt" in out.stdout
    assert "process 1 of 2 exited with code 1" in out.stderr


def test_launcher_forwards_sigterm_to_every_process():
    child = ("import os, signal, sys, time\n"
             "def stop(sig, frame):\n"
             "    print('stopping on', signal.Signals(sig).name, flush=True); sys.exit(0)\n"
             "signal.signal(signal.SIGTERM, stop)\n"
             "print('ready', flush=True)\n"
             "time.sleep(60)\n")
    launcher = subprocess.Popen([sys.executable, LAUNCH, "--num_processes", "2", "--", sys.executable, "-c", child],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    seen = [launcher.stdout.readline(), launcher.stdout.readline()]
    assert sorted(seen) == ["[0] ready\n", "[1] ready\n"]
    launcher.send_signal(signal.SIGTERM)
    stdout, _ = launcher.communicate(timeout=30)
    assert sorted(stdout.splitlines()) == ["[0] stopping on SIGTERM", "[1] stopping on SIGTERM"]
    assert launcher.returncode == 0


def test_children_die_with_a_killed_launcher():
    child = "import os, time; print(os.getpid(), flush=True); time.sleep(60)"
    launcher = subprocess.Popen([sys.executable, LAUNCH, "--num_processes", "2", "--", sys.executable, "-c", child],
                                stdout=subprocess.PIPE, text=True, cwd=ROOT)
    pids = [int(launcher.stdout.readline().split()[1]) for _ in range(2)]
    launcher.kill()  # SIGKILL: no handler of the launcher's runs
    launcher.wait(timeout=10)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child not yet reaped by anyone is a zombie: dead, for this purpose.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_launcher_refuses_a_missing_command():
    out = subprocess.run([sys.executable, LAUNCH, "--num_processes", "2"], capture_output=True, text=True)
    assert out.returncode != 0 and "'--' before the command is required" in out.stderr


# ------------------------------------------------------------------------------- distributed.initialize


def test_single_process_by_default_calls_nothing(monkeypatch):
    monkeypatch.setattr(jax.distributed, "initialize", _refuse)
    setup = distributed.initialize(environ={})
    assert (setup.process_index, setup.process_count) == (0, 1)
    assert distributed.initialize("10.0.0.1:1234", 1, 0, environ={}).process_count == 1


def _refuse(*args, **kwargs):
    raise AssertionError("jax.distributed.initialize must not be called for a single process")


@pytest.mark.parametrize("kwargs, environ, message", [
    (dict(coordinator_address="10.0.0.1:1234"), {},
     "--coordinator_address=10.0.0.1:1234 is set but not --num_processes (or SORAAX_NUM_PROCESSES); "
     "--process_id (or SORAAX_PROCESS_ID)"),
    ({}, {"SORAAX_NUM_PROCESSES": "2", "SORAAX_PROCESS_ID": "1"},
     "is set but not --coordinator_address (or SORAAX_COORDINATOR_ADDRESS / JAX_COORDINATOR_ADDRESS)"),
    ({}, {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 is set but not"),
    ({}, {"SORAAX_NUM_PROCESSES": "two"}, "SORAAX_NUM_PROCESSES='two' is not an integer"),
    (dict(num_processes=2, process_id=2), {"SORAAX_COORDINATOR_ADDRESS": "h:1"},
     "--process_id=2 is out of range for --num_processes=2: process ids run 0..1"),
    (dict(num_processes=0), {}, "--num_processes=0: the number of processes must be >= 1"),
    ({}, {"SORAAX_COORDINATOR_ADDRESS": "10.0.0.1", "SORAAX_NUM_PROCESSES": "2", "SORAAX_PROCESS_ID": "0"},
     "SORAAX_COORDINATOR_ADDRESS='10.0.0.1' must be HOST:PORT"),
])
def test_settings_that_cannot_work_are_refused_by_name(monkeypatch, kwargs, environ, message):
    monkeypatch.setattr(jax.distributed, "initialize", _refuse)
    with pytest.raises(distributed.DistributedConfigError) as error:
        distributed.initialize(**kwargs, environ=environ)
    assert message in str(error.value)


def test_arguments_win_over_the_environment_and_empty_variables_are_unset():
    settings = distributed.read_settings(
        coordinator_address="a:1", environ={"SORAAX_COORDINATOR_ADDRESS": "b:2", "SORAAX_NUM_PROCESSES": " ",
                                            "SORAAX_PROCESS_ID": "1"})
    assert settings["coordinator_address"] == distributed.Setting("a:1", "--coordinator_address")
    assert settings["num_processes"] == distributed.Setting(None, None)
    assert settings["process_id"] == distributed.Setting(1, "SORAAX_PROCESS_ID")


def test_clusters_are_detected_from_the_environment_alone():
    step = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4"}
    assert distributed.detect_cluster(step) == "slurm"
    assert distributed.detect_cluster({**step, "SLURM_STEP_NUM_TASKS": "1"}) is None  # one task: alone
    assert distributed.detect_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) is None  # the batch script
    assert distributed.detect_cluster({}) is None  # this machine has no TPU chips


def _record_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append(k))
    monkeypatch.setattr(jax.config, "update", lambda name, value: calls.append((name, value)))
    return calls


def test_complete_settings_are_passed_as_given_with_auto_detection_off(monkeypatch):
    calls = _record_calls(monkeypatch)
    setup = distributed.initialize(environ={"SORAAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
                                            "SORAAX_NUM_PROCESSES": "4", "SORAAX_PROCESS_ID": "3"})
    assert calls == [("jax_cpu_collectives_implementation", "gloo"),
                     dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3,
                          local_device_ids=None, cluster_detection_method="deactivate")]
    assert "SORAAX_PROCESS_ID" in setup.how


def test_on_a_cluster_jax_detects_what_is_not_given(monkeypatch):
    calls = _record_calls(monkeypatch)
    setup = distributed.initialize(environ={"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8"})
    assert calls[-1] == dict(coordinator_address=None, num_processes=None, process_id=None, local_device_ids=None)
    assert setup.how == "auto-detected slurm"


def test_train_cli_names_the_missing_setting(tmp_path):
    env = {**os.environ, "SORAAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-m", "soraax.train", "--config", TINY, "--workdir", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert out.returncode == 2
    assert "--num_processes (or SORAAX_NUM_PROCESSES)" in out.stderr


def test_a_checkpoint_of_another_host_count_is_refused_by_name(tmp_path):
    for name in ("process_0-of-2.json", "process_1-of-2.json", "commit_success.txt"):
        (tmp_path / name).write_text("{}")
    checkpoints.check_data_hosts(tmp_path, 2)
    with pytest.raises(FileNotFoundError, match="a run of 2 processes and this run has 1.*Resume with 2 processes"):
        checkpoints.check_data_hosts(tmp_path, 1)


# ---------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A micro VAE (and its cached latent stats) that every process of the DiT runs loads."""
    path = str(tmp_path_factory.mktemp("vae"))
    train.run(micro_config(task="vae", vae__train_steps=1), path)
    train.vae_latent_stats(micro_config(vae__checkpoint=path), path)
    return path


def _config_file(path, **overrides) -> str:
    merged = {**MICRO, **{k.replace("__", "."): v for k, v in overrides.items()}}
    path.write_text("from soraax import config\n\n\ndef get_config(arg=None):\n"
                    f"    return config.load({TINY!r}, {merged!r})\n")
    return str(path)


@pytest.mark.slow
def test_two_processes_train_like_one_process_on_the_same_global_batches(vae_dir, tmp_path):
    # Three steps, one checkpoint at the end; four rows: one per device, two per host.
    config_path = _config_file(tmp_path / "micro.py", batch_size=4, total_steps=3, checkpoint_every=3,
                               vae__checkpoint=vae_dir)
    two_hosts = str(tmp_path / "two_hosts")
    out = _launch(2, [sys.executable, "-m", "soraax.train", "--config", config_path, "--workdir", two_hosts],
                  devices=2, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "[0] distributed: process 0 of 2" in out.stdout
    assert sorted(os.listdir(os.path.join(two_hosts, "checkpoints"))) == ["3"]
    # Each host saved its own place in its own shard of the data.
    assert sorted(os.listdir(os.path.join(two_hosts, "checkpoints", "3", "data"))) == [
        "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
    got = _metrics(two_hosts)  # written by process 0 alone: one line a step
    assert [r["step"] for r in got] == [1, 2, 3]

    one_host = str(tmp_path / "one_host")
    _check_script(4, "assembled", config_path, "2", one_host)
    want = _metrics(one_host)
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in want], rtol=1e-5, err_msg=key)
    assert got[0]["loss"] != got[-1]["loss"]  # the params moved, so equal later losses mean equal updates

    # One host cannot take over the places of two in their data shards, and says so.
    rerun = subprocess.run([sys.executable, "-m", "soraax.train", "--config", config_path, "--workdir", two_hosts,
                            "--config.total_steps=4"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert rerun.returncode == 2, rerun.stderr[-2000:]
    assert "a run of 2 processes and this run has 1" in rerun.stderr


@pytest.mark.slow
def test_checkpoint_restores_on_other_meshes_and_device_counts(tmp_path):
    workdir = str(tmp_path)
    _check_script(8, "write", workdir)
    report = json.loads(_check_script(4, "resume", workdir).strip().splitlines()[-1])
    for name, result in report["meshes"].items():
        assert result["max_param_diff"] == 0.0, (name, result)  # a restore is a copy: exact
        assert result["leaves_sharded_differently"] > 0, (name, result)  # and it did reshard
    whole = {r["step"]: r for r in _metrics(os.path.join(workdir, "whole"))}
    assert [r["step"] for r in report["resumed"]] == [3, 4]
    for record in report["resumed"]:
        # A different mesh sums in a different order: equal to float32 rounding.
        np.testing.assert_allclose(record["loss"], whole[record["step"]]["loss"], rtol=1e-5)
        np.testing.assert_allclose(record["grad_norm"], whole[record["step"]]["grad_norm"], rtol=1e-5)
