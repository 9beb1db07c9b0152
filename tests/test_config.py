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
])
def test_bad_values_name_their_key(key, value, message):
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        config.validate(config.load(TINY, {key: value}))


def test_unknown_key_is_refused():
    with pytest.raises(config.ConfigError, match="unknown config key 'model.widht'"):
        config.load(TINY, {"model.widht": 3})


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
