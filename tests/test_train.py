"""Training end to end at micro size: it runs, checkpoints, resumes exactly, and learns."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from soraax import checkpoints, train
from helpers import ROOT, micro_config


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """One micro VAE run shared by the DiT tests (the DiT trains on its latents)."""
    path = str(tmp_path_factory.mktemp("vae"))
    train.run(micro_config(task="vae"), path)
    return path


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_vae_run_writes_checkpoint_and_latent_stats(vae_dir):
    cfg = micro_config(task="vae")
    params = train.load_vae_params(cfg, vae_dir)
    assert jax.tree_util.tree_leaves(params)
    mean, std = train.vae_latent_stats(cfg, vae_dir)
    assert len(mean) == cfg.vae.latent_channels and all(s > 0 for s in std)
    assert os.path.isfile(os.path.join(vae_dir, train.LATENT_STATS_FILE))


@pytest.fixture(scope="module")
def whole_run(vae_dir, tmp_path_factory):
    """Four uninterrupted steps: the reference for the resume test, and a run to inspect."""
    path = str(tmp_path_factory.mktemp("whole"))
    records = train.run(micro_config(vae__checkpoint=vae_dir), path)
    return path, records


def test_steps_run_log_and_checkpoint(whole_run):
    workdir, records = whole_run
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert np.isfinite(r["loss"]) and r["real_tokens_per_sec"] > 0
        assert 0 < r["packing_efficiency"] <= 1 and r["padded_tokens_per_sec"] >= r["real_tokens_per_sec"]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    assert checkpoints.read_config(workdir).model.width == 32


def test_bfloat16_matmuls_train_the_same_run_to_rounding(vae_dir, whole_run, tmp_path):
    """model.matmul_dtype=bfloat16 rounds only the products' operands: the same data, keys and updates, so
    the same losses to bf16's precision (tests/test_matmul.py: the same params, float32)."""
    records = train.run(micro_config(vae__checkpoint=vae_dir, model__matmul_dtype="bfloat16"), str(tmp_path))
    want = [r["loss"] for r in whole_run[1]]
    got = [r["loss"] for r in records]
    np.testing.assert_allclose(got, want, rtol=2e-2)
    assert got != want  # rounded: not the float32 run itself
    assert checkpoints.read_config(str(tmp_path)).model.matmul_dtype == "bfloat16"


def test_resume_equals_uninterrupted(vae_dir, whole_run, tmp_path, capsys):
    cfg = micro_config(vae__checkpoint=vae_dir)
    stats = train.vae_latent_stats(cfg, vae_dir)
    parts = str(tmp_path)
    train.train(cfg, parts, train.dit_task(cfg, train.load_vae_params(cfg, vae_dir), stats), stop_at=2)
    assert len(_losses(parts)) == 2
    train.run(cfg, parts)  # a rerun with the same workdir resumes at step 2 ...
    assert "resuming from step 2" in capsys.readouterr().out  # ... and says so
    # Same batches, same RNG, same optimizer and EMA state: the same losses, to float rounding.
    np.testing.assert_allclose(_losses(parts), _losses(whole_run[0]), rtol=1e-6)


@pytest.mark.slow
def test_cli_resumes_and_says_so(vae_dir, tmp_path):
    def run(steps):
        return subprocess.run(
            [sys.executable, "-m", "soraax.train", "--config", os.path.join(ROOT, "configs", "tiny.py"),
             "--workdir", str(tmp_path), f"--config.total_steps={steps}", f"--config.vae.checkpoint={vae_dir}",
             *[f"--config.{k}={v}" for k, v in _micro_flags().items()]],
            capture_output=True, text=True, cwd=ROOT, timeout=300)
    first = run(2)
    assert first.returncode == 0, first.stderr[-2000:]
    second = run(3)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming from step 2" in second.stdout


def _micro_flags():
    from helpers import MICRO
    flags = {k: v for k, v in MICRO.items() if k not in {"total_steps", "vae.widths", "vae.crop"}}
    flags["vae.widths"] = "(4,8,8)"
    flags["vae.crop"] = "(5,16,16)"
    return flags


def test_dry_run_reports_dit_xl_without_allocating():
    cfg = __import__("soraax.config", fromlist=["load"]).load(os.path.join(ROOT, "configs", "dit_xl.py"),
                                                              {"batch_size": 1, "seq_len": 256, "text_len": 64,
                                                               "data.token_budget": 256})
    info = train.describe(cfg, compile_step=False)
    assert 700e6 < info["params"] < 900e6
    assert info["flops_per_token"] > 6 * 600e6  # at least 6 N for a train step


def test_compile_only_reports_memory_of_the_compiled_step():
    info = train.describe(micro_config(), compile_step=True)
    memory = info["memory_bytes"]
    assert memory["argument_size_in_bytes"] > 0 and memory["temp_size_in_bytes"] >= 0
    assert info["tokens_per_step"] == 2 * 64


def test_clip_position_pairs_and_the_high_noise_share_reach_the_model_and_the_loss(monkeypatch):
    import flax.linen as nn
    from soraax.clip_position import num_features
    from soraax.models import build
    cfg = micro_config(model__clip_position_pairs=True, diffusion__high_noise_rate=0.3,
                       diffusion__high_noise_min=0.8)
    models = build(cfg)
    assert models.dit.clip_position and models.dit.clip_position_pairs
    # Shapes alone (jax.eval_shape): running the init and the loss op by op took ~50 s of the suite, and
    # neither assertion reads a value.
    params = nn.meta.unbox(jax.eval_shape(train.dit_task(cfg).init_params, jax.random.PRNGKey(0)))
    assert params["dit"]["clip_position_embed"]["kernel"].shape == (num_features(4, pairs=True), cfg.model.width)

    class Drawn(Exception):
        pass

    def spy(*args, **kwargs):
        raise Drawn(kwargs)

    monkeypatch.setattr(train.diffusion, "per_token_timesteps", spy)
    s, l = cfg.seq_len, cfg.text_len
    batch = {"tokens": np.zeros((2, s, models.dit.patch_dim), np.float32), "coords": np.zeros((2, s, 3), np.int32),
             "segment_ids": np.ones((2, s), np.int32), "cond_mask": np.zeros((2, s), bool),
             "text_tokens": np.zeros((2, l), np.int32), "text_segment_ids": np.ones((2, l), np.int32)}
    with pytest.raises(Drawn) as drawn:
        jax.eval_shape(train.dit_loss_fn(models, cfg), params, batch, jax.random.PRNGKey(1))
    assert drawn.value.args[0]["high_noise_rate"] == 0.3 and drawn.value.args[0]["high_noise_min"] == 0.8
