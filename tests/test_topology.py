"""Compiling for a TPU slice from CPU: slice names, the HBM verdict, and (with libtpu) the real compile."""
import importlib.util
import math
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec

from soraax import config as config_lib, topology, train
from helpers import ROOT, TINY, micro_config

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install 'soraax[tpu]'); "
                                  "compiling for a TPU topology needs it")


# ------------------------------------------------------------------------------------------ names


@pytest.mark.parametrize("name, chips, shape", [
    ("v5p-8", 4, (2, 2, 1)),      # v5p counts TensorCores, two a chip
    ("v5p-64", 32, (2, 4, 4)),
    ("v4-8", 4, (2, 2, 1)),       # so does v4
    ("v4-128", 64, (4, 4, 4)),
    ("v5e-16", 16, (4, 4)),       # v5e and v6e count chips
    ("v5litepod-16", 16, (4, 4)),
    ("v6e-64", 64, (8, 8)),
    ("v6e-1", 1, (1, 1)),
    ("V6E-8", 8, (2, 4)),
])
def test_names_count_cores_for_v4_v5p_and_chips_for_v5e_v6e(name, chips, shape):
    s = topology.parse(name)
    assert (s.chips, s.shape) == (chips, shape)
    assert s.libtpu_topology == f"{s.generation.libtpu_name}:{'x'.join(map(str, shape))}"


def test_every_listed_slice_parses_to_a_grid_of_its_chips():
    for g in topology.GENERATIONS.values():
        for chips, shape in g.shapes.items():
            s = topology.parse(f"{g.name}-{chips * g.cores_per_count}")
            assert s.chips == chips == math.prod(shape)
            assert len(shape) == (3 if g.cores_per_count == 2 else 2)  # v4/v5p are 3D tori, v5e/v6e 2D


@pytest.mark.parametrize("name", ["v5p-7", "v5p-12", "v5e-3", "v6e-512", "v4-2", "h100-8", "v7-8", "v5p", "",
                                  "v5p-64x"])
def test_unknown_names_give_one_line_listing_valid_forms(name):
    with pytest.raises(topology.TopologyError) as error:
        topology.parse(name)
    message = str(error.value)
    assert "\n" not in message and repr(name) in message
    for form in ("v4-N", "v5p-N", "v5e-N", "v6e-N", "TensorCores", "chips"):
        assert form in message


# ------------------------------------------------------------------------------------- the verdict


def test_hbm_verdict_fits_up_to_the_chip_and_not_beyond():
    hbm = topology.parse("v5e-4").hbm_bytes
    assert topology.hbm_verdict(hbm, hbm).startswith("fits: 16.00 GiB of 16.00 GiB")
    over = topology.hbm_verdict(hbm + 1024 ** 3, hbm)
    assert over == "does not fit: needs 17.00 GiB of 16.00 GiB HBM per chip"


def test_hbm_per_chip_is_what_each_generation_ships():
    hbm = {g: topology.parse(name).hbm_bytes / topology.GIB
           for g, name in (("v4", "v4-8"), ("v5p", "v5p-8"), ("v5e", "v5e-4"), ("v6e", "v6e-4"))}
    assert hbm == {"v4": 32, "v5p": 95, "v5e": 16, "v6e": 32}


@pytest.mark.parametrize("message, needed, usable", [
    ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (100.03G) "
     "exceeds available HBM (15.75G).", 100.03, 15.75),
    ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
     "Used 20.50G of 15.48G hbm. Exceeded hbm capacity by 5.02G.", 20.50, 15.48),
    ("RESOURCE_EXHAUSTED: ... required for HLO temporaries (512.00M) exceeds available HBM (15.75G)", 0.5, 15.75),
])
def test_out_of_memory_messages_become_needed_and_usable_bytes(message, needed, usable):
    got = topology.parse_oom(message)
    assert got == pytest.approx((needed * topology.GIB, usable * topology.GIB))
    verdict = topology.oom_verdict(*got, hbm_bytes=16 * topology.GIB)
    assert verdict.startswith(f"does not fit: needs {needed:.2f} GiB of {usable:.2f} GiB")


def test_other_compile_errors_are_not_read_as_out_of_memory():
    assert topology.parse_oom("INVALID_ARGUMENT: sharding does not divide dimension 0") is None
    assert topology.parse_oom("RESOURCE_EXHAUSTED: too many open files") is None


def test_per_device_bytes_counts_only_this_devices_shards():
    mesh = AbstractMesh((1, 4, 1, 1), ("data", "fsdp", "context", "tensor"))
    split = jax.ShapeDtypeStruct((8, 6), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("fsdp")))
    whole = jax.ShapeDtypeStruct((8, 6), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec()))
    assert topology.per_device_bytes({"a": split, "b": whole}) == 2 * 6 * 4 + 8 * 6 * 2


def test_a_batch_that_does_not_split_over_data_and_fsdp_is_a_config_error():
    mesh = AbstractMesh((2, 16, 1, 1), ("data", "fsdp", "context", "tensor"))
    with pytest.raises(config_lib.ConfigError, match=r"config.batch_size=48 .* data x fsdp = 32"):
        topology._check_batch_splits(micro_config(batch_size=48), mesh)
    topology._check_batch_splits(micro_config(batch_size=64), mesh)


# ------------------------------------------------------------------------------------------- CLI


def _train_cli(*args):
    return subprocess.run([sys.executable, "-m", "soraax.train", "--config", TINY, *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_cli_topology_needs_compile_only():
    result = _train_cli("--topology", "v5p-8", "--dry_run")
    assert result.returncode != 0 and "--topology" in result.stderr and "--compile_only" in result.stderr


def test_cli_unknown_topology_is_one_line_error():
    result = _train_cli("--compile_only", "--topology", "v5p-63")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "'v5p-63'" in lines[0] and "v6e-N" in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(HAS_LIBTPU, reason="libtpu is installed here; this checks the message when it is not")
def test_without_libtpu_the_error_says_how_to_install_it():
    with pytest.raises(topology.TopologyError, match=r"pip install 'soraax\[tpu\]'"):
        topology.slice_devices(topology.parse("v5e-4"))


# -------------------------------------------------------------------------- the compile (libtpu)


@needs_libtpu
def test_micro_step_compiles_for_v5e_4_and_reports_its_memory():
    cfg = micro_config(**{"mesh.data": 1, "mesh.fsdp": -1, "batch_size": 4})
    report = topology.compile_report(cfg, "v5e-4", train.lower_step)
    assert report["device_kind"] == "TPU v5 lite" and report["chips"] == 4
    assert report["mesh"] == {"data": 1, "fsdp": 4, "context": 1, "tensor": 1}
    assert report["fits"] and report["verdict"].startswith("fits:")
    memory = report["memory_gib"]
    # Params are float32 and sharded over fsdp=4 where a dim divides (width 32 does), so a chip holds at
    # most a quarter plus the few small unsharded leaves (biases, norms) of the 4-byte params.
    assert report["params"] * 4 / 4 / topology.GIB <= memory["params"] <= report["params"] * 4 / topology.GIB / 2
    assert memory["ema_params"] == memory["params"]
    assert memory["optimizer_state"] == pytest.approx(2 * memory["params"], abs=0.001)  # Adam's mu and nu
    assert 0 < memory["total"] < 16
    flops = report["flops"]
    assert flops["xla_per_device"] > 0 and flops["analytic_per_device"] > 0 and flops["step_seconds_at_peak"] > 0


@needs_libtpu
def test_a_step_too_big_for_hbm_is_a_verdict_not_a_traceback():
    # xla attention materialises [B, H, S, S] float32 logits: 4 rows x 2 heads x 32768^2 x 4 bytes = 32 GiB
    # (with local attention off: its windows would make this step fit).
    cfg = micro_config(**{"seq_len": 32768, "batch_size": 4, "model.attn_impl": "xla",
                          "model.local_attention": False})
    report = topology.compile_report(cfg, "v5e-4", train.lower_step)
    assert report["fits"] is False
    assert re.fullmatch(r"does not fit: needs [\d.]+ GiB of 15\.75 GiB \(XLA's usable share of the 16 GiB "
                        r"HBM per chip\)", report["verdict"])
    assert report["memory_gib"]["total_needed"] > 16
