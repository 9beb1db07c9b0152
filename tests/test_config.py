"""Every shipped config loads and validates; bad values are refused with the key's name, before compiling."""
import glob
import os
import re
import subprocess
import sys

import pytest

from soraax import config
from helpers import ROOT, TINY, micro_config

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_shipped_config_loads_and_validates(path):
    config.validate(config.load(path))


@pytest.mark.parametrize("key, value, message", [
    ("model.attn_impl", "magic", "config.model.attn_impl: must be one of"),
    ("model.heads", 5, "config.model.width: 128 is not divisible by model.heads=5"),
    ("mesh.data", 0, "config.mesh.data"),
    ("seq_len", 0, "config.seq_len: must be > 0"),
    ("data.token_budget", 10_000, "cannot fit a packed row"),
    ("data.source", "folder", "config.data.manifest: is required"),
    ("vae.crop", (4, 32, 32), "config.vae.crop: frames 4 must be 1 + 4*n"),
    ("task", "gan", "config.task"),
    ("vae.norm", "batch", "config.vae.norm: must be one of ('group', 'rms')"),
    ("vae.patch_size", 8, "config.vae.patch_size: must be a power of two <= vae.spatial_factor=4"),
    ("vae.latent_channels", 2, "config.vae.shortcuts: the pixel shortcut needs vae.latent_channels >= 3"),
    ("vae.widths", (8, 12, 32), "config.vae.widths: with vae.shortcuts each of widths (8, 12, 32)"),
    # What ml_collections' type rule lets through: None, bools for ints, nan and inf, lists and tuples.
    ("seq_len", None, "config.seq_len: must be an int, got None"),
    ("seq_len", True, "config.seq_len: must be an int, got True"),
    ("learning_rate", float("nan"), "config.learning_rate: must be a finite number, got nan"),
    ("grad_clip", float("inf"), "config.grad_clip: must be >= 0 (0 disables clipping), got inf"),
    ("ema_decay", float("nan"), "config.ema_decay: must be a finite number"),
    ("model.patch_size", (1, 2), "config.model.patch_size: must be three positive ints (time, height, width)"),
    ("model.patch_size", ("a", 2, 2), "config.model.patch_size: must be three positive ints"),
    ("model.patch_size", [1, 2.5, 2], "config.model.patch_size: must be three positive ints"),
    ("vae.crop", (5, 32), "config.vae.crop: must be (frames, height, width), got (5, 32)"),
    ("vae.crop", (5, 32, 32, 1), "config.vae.crop: must be (frames, height, width)"),
    ("vae.widths", (8, 16), "config.vae.widths: widths (8, 16) has 2 levels"),
    ("vae.spatial_factor", 16, "config.vae.widths: widths (8, 16, 32) has 3 levels, but spatial_factor=16"),
    ("mesh.data", None, "config.mesh.data: must be a positive int or -1"),
    ("mesh.fsdp", -1, "config.mesh: at most one axis may be -1"),
    ("seed", 2**32, "config.seed: must be < 2**32"),
    ("seed", -1, "config.seed: must be >= 0"),
    ("text_len", 1, "config.text_len: must hold at least a caption's BOS and EOS"),
    ("max_segments", 10_000, "config.max_segments: 10000 clips a row cannot fit seq_len=384"),
    ("data.token_budget", 0, "config.data.token_budget: must be an int >= 1 (a clip costs at least one patch"),
    ("data.manifest", None, "config.data.manifest: must be a str"),
    ("model.scan_layers", None, "config.model.scan_layers: must be True or False"),
    ("model.adaln_slots", None, "config.model.adaln_slots: must be True or False"),
    ("model.cross_attn", None, "config.model.cross_attn: must be True or False"),
    ("model.local_attention", None, "config.model.local_attention: must be True or False"),
    ("model.matmul_dtype", "float16", "config.model.matmul_dtype: must be one of ('float32', 'bfloat16'), got 'float16'"),
    ("data.synthetic_min_frames", 3, "config.data.synthetic_min_frames: must be >= 5, got 3"),
    ("model.clip_position_pairs", None, "config.model.clip_position_pairs: must be True or False, got None"),
    ("diffusion.high_noise_rate", 1.5, "config.diffusion.high_noise_rate: must be in [0, 1], got 1.5"),
    ("diffusion.high_noise_min", 1.0, "config.diffusion.high_noise_min: must be in [0, 1), got 1.0"),
    ("model.text_layers", (0, 7), "config.model.text_layers=(0, 7): 7 is not a hidden state of a 6-layer encoder"),
    ("model.text_layers", (0, 0), "config.model.text_layers=(0, 0): (0, 0) names one hidden state twice"),
    ("model.text_layers", (), "config.model.text_layers: must be a non-empty tuple of hidden-state indices"),
    ("model.text_layers", ("0",), "config.model.text_layers: must be a non-empty tuple of hidden-state indices"),
])
def test_bad_values_name_their_key(key, value, message):
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        config.validate(config.load(TINY, {key: value}))


def test_a_model_without_cross_attention_needs_the_pooled_caption():
    config.validate(config.load(TINY, {"model.cross_attn": False, "model.pooled_text": True}))
    with pytest.raises(config.ConfigError, match=re.escape(
            "config.model.cross_attn: False leaves model.pooled_text as the caption's only way in")):
        config.validate(config.load(TINY, {"model.cross_attn": False, "model.pooled_text": False}))


def test_text_layers_are_for_the_bert_encoder_alone():
    # configs/tiny.py concatenates MiniLM's embeddings and last layer; the byte encoder has one output.
    with pytest.raises(config.ConfigError, match=re.escape(
            "config.model.text_layers: (0, -1): only the bert encoder concatenates hidden states; bytes gives")):
        config.validate(config.load(TINY, {"model.text_encoder": "bytes", "model.text_cache": False}))
    config.validate(config.load(TINY, {"model.text_encoder": "bytes", "model.text_cache": False,
                                       "model.text_layers": (-1,)}))


def test_clip_position_pairs_need_clip_position():
    cfg = config.load(TINY, {"model.clip_position": False, "model.clip_position_pairs": True})
    with pytest.raises(config.ConfigError, match=re.escape(
            "config.model.clip_position_pairs: multiplies model.clip_position's per-axis features")):
        config.validate(cfg)


def test_unknown_key_is_refused():
    with pytest.raises(config.ConfigError, match="unknown config key 'model.widht'"):
        config.load(TINY, {"model.widht": 3})
    with pytest.raises(config.ConfigError, match="unknown config key 'seed.x'"):
        config.load(TINY, {"seed.x": 3})  # through a key that is not a group


@pytest.mark.parametrize("key, value, message", [
    ("seq_len", "abc", "config.seq_len: 'abc' (str) cannot replace 384 (int)"),
    ("seq_len", 1.5, "config.seq_len: 1.5 (float) cannot replace 384 (int)"),
    ("vae.crop", 5, "config.vae.crop: 5 (int) cannot replace (5, 32, 32) (tuple)"),
    ("model", {"width": 3}, "config.model is a group of keys; override them one at a time"),
    ("mesh", 3, "config.mesh is a group of keys"),
])
def test_an_override_of_another_type_is_refused_with_its_key(key, value, message):
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        config.load(TINY, {key: value})


def test_group_norm_needs_widths_divisible_by_its_groups():
    with pytest.raises(config.ConfigError, match=re.escape("config.vae.norm_groups: GroupNorm needs every width")):
        config.validate(config.load(TINY, {"vae.norm": "group", "vae.norm_groups": 3}))


def test_mesh_is_checked_against_the_devices_when_given():
    cfg = config.load(TINY, {"mesh.data": 3})
    config.validate(cfg)  # fine on some machine: only a device count can refuse it
    with pytest.raises(config.ConfigError, match=re.escape(
            "config.mesh {'data': 3, 'fsdp': 1, 'context': 1, 'tensor': 1} needs 3 devices; 1 are available")):
        config.validate(cfg, num_devices=1)
    eight_rows = {"batch_size": 8, "vae.batch_size": 8}
    assert config.validate_devices(config.load(TINY, eight_rows), 8) == (8, 1, 1, 1)
    with pytest.raises(config.ConfigError, match=re.escape("config.batch_size: 4 rows do not split over data x fsdp = 8")):
        config.validate(config.load(TINY), num_devices=8)
    # The VAE this DiT config trains first must split too; with a trained one named, it is not trained.
    with pytest.raises(config.ConfigError, match="config.vae.batch_size: 4 rows"):
        config.validate(config.load(TINY, {"batch_size": 8}), num_devices=8)
    config.validate(config.load(TINY, {"batch_size": 8, "vae.checkpoint": "runs/vae"}), num_devices=8)
    with pytest.raises(config.ConfigError, match="config.vae.batch_size: 4 rows"):
        config.validate(config.load(TINY, {"task": "vae", "mesh.data": 1, "mesh.fsdp": -1}), num_devices=8)


def test_cli_refuses_unknown_key_and_bad_value_before_compiling(tmp_path):
    def run(*flags):
        return subprocess.run([sys.executable, "-m", "soraax.train", "--config", TINY, "--workdir",
                               str(tmp_path / "w"), *flags], capture_output=True, text=True, cwd=ROOT, timeout=120)
    unknown = run("--config.model.widht=3")
    assert unknown.returncode != 0 and "widht" in unknown.stderr
    bad = run("--config.model.attn_impl=magic")
    assert bad.returncode == 2 and "config.model.attn_impl" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_workdir_that_is_a_file_is_refused(tmp_path):
    from soraax import train
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(config.ConfigError, match="is a file"):
        train.run(micro_config(), str(path))


def _train_cli(*flags, workdir):
    """The train command line, started (not awaited) so that several run at once: each spends ~5-10 s
    importing JAX, and none gets as far as compiling."""
    return subprocess.Popen([sys.executable, "-m", "soraax.train", "--config", TINY, "--workdir", str(workdir),
                             *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _one_line_error(process, *, names):
    _, stderr = process.communicate(timeout=120)
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert process.returncode == 2 and "Traceback" not in stderr, stderr
    assert len(errors) == 1 and names in errors[0], stderr
    return errors[0]


def test_cli_refuses_a_bad_budget_a_missing_vae_and_a_file_workdir_in_one_line(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    runs = {
        "config.data.token_budget": _train_cli("--config.data.token_budget=0", workdir=tmp_path / "budget"),
        "config.vae.checkpoint='/nonexistent'": _train_cli("--config.vae.checkpoint=/nonexistent",
                                                           workdir=tmp_path / "vae"),
        f"--workdir {a_file} is a file": _train_cli(workdir=a_file),
    }
    for names, process in runs.items():
        _one_line_error(process, names=names)
    assert not (tmp_path / "budget").exists() and not (tmp_path / "vae").exists()  # refused before any work
    assert a_file.read_text() == "not a folder"


def test_cli_refuses_a_mesh_larger_than_the_machine_in_one_line(tmp_path):
    line = _one_line_error(_train_cli("--config.mesh.data=3", workdir=tmp_path / "w"), names="config.mesh")
    assert "needs 3 devices; 1 are available" in line
    assert not (tmp_path / "w").exists()
