"""The benchmark scripts run at `--tiny` size and print well-formed JSON lines; they measure nothing here.

Each script runs in a subprocess, as a user runs it. Those that compile a train step take tens of seconds on
2 cores, so they are `slow`; the attention script and the shared helpers are the fast checks.
"""

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import common  # noqa: E402
import peer  # noqa: E402


def run_script(name: str, *args: str, timeout: int = 600) -> list[dict]:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", name), "--tiny", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert lines, f"{name} printed nothing on stdout; stderr:\n{done.stderr[-3000:]}"
    return [json.loads(line) for line in lines]  # every stdout line is one JSON object


def test_overrides_are_read_as_the_keys_type():
    p = common.parser("x")
    args, overrides = common.parse(p, ["--tiny", "--config.model.width=64", "--config.model.patch_size", "(1, 2, 2)"])
    assert args.tiny and overrides == {"model.width": "64", "model.patch_size": "(1, 2, 2)"}
    cfg = common.load_config(common.TINY_CONFIG, {**overrides, "model.attn_impl": "chunked"}, tiny=True)
    assert cfg.model.width == 64 and tuple(cfg.model.patch_size) == (1, 2, 2) and cfg.model.attn_impl == "chunked"
    with pytest.raises(Exception, match="model.widht"):
        common.load_config(common.TINY_CONFIG, {"model.widht": "64"})


def test_summary_and_json_lines(capsys):
    timing = common.summarise([2.0, 1.0, 3.0])
    assert timing["median_s"] == 2.0 and timing["spread"] == 1.0 and timing["n"] == 3
    common.emit({"x": float("nan"), "n": 3})
    assert json.loads(capsys.readouterr().out) == {"x": None, "n": 3}


def test_attention_tiny():
    records = run_script("attention.py", "--lengths", "128")
    from soraax import host_memory
    wanted = host_memory.huge_page_env_here({**os.environ, "JAX_PLATFORMS": "cpu"})
    # The script restarted itself under glibc's huge-page tunable where it applies, as the train CLI does.
    expected = wanted["GLIBC_TUNABLES"] if wanted else os.environ.get("GLIBC_TUNABLES")
    assert {r["machine"]["glibc_tunables"] for r in records} == {expected}
    by_impl = {r["impl"]: r for r in records}
    assert set(by_impl) == {"xla", "chunked", "splash", "cudnn"}
    for impl in ("xla", "chunked"):
        assert by_impl[impl]["status"] == "ok" and by_impl[impl]["fwd_bwd_s"] > 0 and by_impl[impl]["temp_bytes"] > 0
    assert by_impl["splash"]["status"].startswith("unavailable")


@pytest.mark.slow
def test_throughput_tiny():
    (record,) = run_script("throughput.py")
    assert record["benchmark"] == "throughput" and record["real_tokens_per_sec"] > 0
    assert 0 < record["mfu"] and 0 < record["packing_efficiency"] <= 1
    assert record["flops_per_step"] > 0 and record["loader"]["real_tokens_per_sec"] > 0


@pytest.mark.slow
def test_packing_tiny():
    (record,) = run_script("packing.py")
    for scheme in ("packed", "padded", "bucketed"):
        assert 0 < record[scheme]["packing_efficiency"] <= 1 and record[scheme]["real_tokens_per_sec"] > 0
    assert record["packed_over_padded"]["real_tokens_per_sec"] > 0


@pytest.mark.slow
def test_scaling_tiny():
    records = run_script("scaling.py", "--topologies", "")
    summary = [r for r in records if r.get("summary")]
    assert len(summary) == 1 and summary[0]["devices"] == [1, 2]
    assert all(r["real_tokens_per_sec"] > 0 for r in records if not r.get("summary"))


@pytest.mark.slow
def test_peer_tiny():
    python = peer.REF_PYTHON if os.path.exists(peer.REF_PYTHON) else sys.executable
    missing = peer.torch_available(python)
    if missing:
        pytest.skip(missing)
    records = run_script("peer.py", "--torch_python", python)
    same = next(r for r in records if r["comparison"] == "same_shapes")
    assert same["torch_status"] == "ok" and same["soraax_over_torch"]["tokens_per_sec"] > 0
    # One line a precision; the bfloat16 one pits soraax's bfloat16 matmuls against torch's autocast.
    by_precision = {r["precision"]: r for r in records if r["comparison"] == "same_shapes"}
    assert sorted(by_precision) == ["bfloat16", "float32"]
    assert by_precision["bfloat16"]["torch"]["output_dtype"] == "bfloat16"  # the model ran under autocast
    assert by_precision["float32"]["torch"]["output_dtype"] == "float32"
    assert by_precision["bfloat16"]["soraax_over_torch"]["tokens_per_sec"] > 0
    # The peer's architecture (no cross-attention) is less work than soraax's text-conditioned default.
    assert same["soraax_pooled_only"]["flops_per_step"] < same["soraax"]["flops_per_step"]
    assert same["soraax_pooled_only_over_torch"]["tokens_per_sec"] > 0
    mixed = next(r for r in records if r["comparison"] == "mixed_aspect")
    assert mixed["soraax_over_torch"]["real_tokens_per_sec"] > 0


def test_peer_says_when_torch_is_missing():
    message = peer.torch_available(os.path.join(ROOT, "no", "such", "python"))
    assert message and "no/such/python" in message


def test_peer_without_torch_times_soraax_at_each_precision():
    records = run_script("peer.py", "--torch_python", os.path.join(ROOT, "no", "such", "python"))
    same = [r for r in records if r["comparison"] == "same_shapes"]
    assert [r["precision"] for r in same] == ["float32", "bfloat16"]
    for r in same:
        assert r["torch"] is None and "no/such/python" in r["torch_status"]
        assert r["soraax"]["tokens_per_sec"] > 0 and r["soraax"]["mfu"] > 0
        assert r["soraax"]["flops_per_step"] > 0
    # the same model and work at both precisions: only the step's time may differ
    assert same[0]["soraax"]["flops_per_step"] == same[1]["soraax"]["flops_per_step"]


def test_peer_refuses_a_matmul_dtype_override():
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "peer.py"), "--tiny",
                           "--config.model.matmul_dtype=bfloat16"], capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert done.returncode == 2 and "--precisions" in done.stderr


def test_step_profile_names_ops_after_the_model_code():
    import step_profile
    assert step_profile.part_of(
        "jit(train_step)/transpose(jvp(DiT))/while/body/closed_call/blocks_3/mlp/fc1/dot_general") == (
        "backward", "DiT/blocks/mlp/fc1")
    assert step_profile.part_of("jit(train_step)/jvp(DiT)/blocks/self_attn/query/dot_general") == (
        "forward", "DiT/blocks/self_attn/query")
    assert step_profile.part_of("jit(train_step)/cond/branch_1_fun/add")[0] == "other"
    hlo = """HloModule m

%fused_computation.1 (param_0: f32[4,8], param_1: f32[8,2]) -> f32[4,2] {
  %param_0 = f32[4,8]{1,0} parameter(0)
  %param_1 = f32[8,2]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,2]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (a: f32[4,8], b: f32[8,2]) -> f32[4,2] {
  %a = f32[4,8]{1,0} parameter(0)
  %b = f32[8,2]{1,0} parameter(1)
  %ynn_fusion.1 = f32[4,2]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_computation.1, metadata={op_name="jit(f)/jvp(DiT)/blocks/mlp/fc1/dot_general"}
  ROOT %add.2 = f32[4,2]{1,0} add(%ynn_fusion.1, %ynn_fusion.1), metadata={op_name="jit(f)/jvp(DiT)/blocks/add"}
}
"""
    ops = step_profile.hlo_ops(hlo)
    assert ops["ynn_fusion.1"]["matmul"] and not ops["add.2"]["matmul"]
    events = [{"name": "ynn_fusion.1", "dur": 3000.0}, {"name": "add.2", "dur": 1000.0},
              {"name": "ThunkExecutor::Execute", "dur": 9000.0}]   # runtime bookkeeping: not an op
    summary = step_profile.summarise_ops(events, ops, steps=1, top=5)
    assert summary["op_ms"] == 4.0 and summary["matmul_share"] == 0.75
    assert summary["parts"][0] == {"pass": "forward", "part": "DiT/blocks/mlp/fc1", "ms": 3.0, "share": 0.75}


@pytest.mark.slow
def test_step_profile_tiny():
    (record,) = run_script("step_profile.py")
    assert record["benchmark"] == "step_profile" and record["op_ms"] > 0 and 0 < record["matmul_share"] < 1
    assert abs(sum(p["share"] for p in record["parts"]) - 1.0) < 1e-6
    assert any(p["part"].startswith("DiT/blocks") for p in record["parts"])
    assert all(op["from"] for op in record["top_ops"])   # every listed op is named back to its source
