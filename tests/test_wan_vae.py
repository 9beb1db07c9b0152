"""Wan 2.1's VAE in soraax: equal to diffusers' AutoencoderKLWan, chunked decode exact, the real checkpoint's
names and shapes, clear errors on a checkpoint that does not fit, and export back to diffusers' layout.

The reference is tests/data/wan/vae (a tiny random AutoencoderKLWan that diffusers saved) and
vae_reference.npz (its outputs), made by tests/data/wan/make_wan_vae_reference.py (versions in
vae_versions.json). Diffusers encodes frame 0 then 4 frames at a time and decodes one latent frame at a time,
each conv carrying a cache; soraax convolves the whole clip at once, so agreement here is also the statement
that the two computations are the same. No torch here.
"""
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from soraax import config, weights
from soraax.models import build_vae
from soraax.vae import VAE_WAN21, VideoVAE, decode_chunked
from soraax.wan.vae_weights import (WEIGHTS, abstract_params, expected_tensors, load_wan_vae, save_wan_vae,
                                    vae_from_config)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data", "wan")
FOLDER = os.path.join(DATA, "vae")
# float32 through ~30 convs of a 16-wide model (outputs up to ~1.3): measured max errors are 4e-7 for the
# posterior and 4e-6 for decoded frames; 5x that separates a correct port from summation order.
ENCODE_ATOL = 2e-6
DECODE_ATOL = 2e-5


@pytest.fixture(scope="module")
def wan():
    loaded = load_wan_vae(FOLDER)
    vae = loaded.module
    params = {"params": weights.materialise(loaded.params)}
    encode = jax.jit(lambda p, x: vae.apply(p, x, method=VideoVAE.encode))
    decode = jax.jit(lambda p, z: vae.apply(p, z, method=VideoVAE.decode))
    return loaded, params, encode, decode


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(os.path.join(DATA, "vae_reference.npz")))


def _stats(vae):
    return np.asarray(vae.latent_mean, np.float32), np.asarray(vae.latent_std, np.float32)


def test_encode_matches_diffusers_posterior(wan, ref):
    loaded, params, encode, _ = wan
    shift, scale = _stats(loaded.module)
    mean, logvar = encode(params, jnp.asarray(ref["video"]))
    # soraax returns Wan's pipeline latents, (mean - latents_mean) / latents_std; diffusers the raw posterior.
    np.testing.assert_allclose(np.asarray(mean) * scale + shift, ref["mean"], rtol=0, atol=ENCODE_ATOL)
    np.testing.assert_allclose(np.asarray(logvar) + 2 * np.log(scale), ref["logvar"], rtol=0, atol=ENCODE_ATOL)


def test_image_is_a_one_frame_video_in_both(wan, ref):
    loaded, params, encode, decode = wan
    shift, scale = _stats(loaded.module)
    mean, _ = encode(params, jnp.asarray(ref["image"]))
    np.testing.assert_allclose(np.asarray(mean) * scale + shift, ref["image_mean"], rtol=0, atol=ENCODE_ATOL)
    # Causal: the image's latent is the first latent frame of any clip that starts with it.
    np.testing.assert_allclose(ref["image_mean"][:, 0], ref["mean"][:, 0], rtol=0, atol=ENCODE_ATOL)
    frames = decode(params, jnp.asarray((ref["latent"][:, :1] - shift) / scale))
    assert frames.shape == (1, 1, 16, 24, 3)
    np.testing.assert_allclose(np.asarray(frames), ref["image_decoded_raw"], rtol=0, atol=DECODE_ATOL)


def test_decode_matches_diffusers(wan, ref):
    loaded, params, _, decode = wan
    shift, scale = _stats(loaded.module)
    frames = np.asarray(decode(params, jnp.asarray((ref["latent"] - shift) / scale)))
    assert frames.shape == ref["decoded_raw"].shape == (1, 9, 16, 24, 3)
    assert np.abs(ref["decoded_raw"]).max() > 1  # so the clamp below is tested too
    np.testing.assert_allclose(frames, ref["decoded_raw"], rtol=0, atol=DECODE_ATOL)
    # Wan's decode clamps to [-1, 1]; soraax's leaves that to whoever writes the frames.
    np.testing.assert_allclose(np.clip(frames, -1, 1), ref["decoded"], rtol=0, atol=DECODE_ATOL)


@pytest.mark.parametrize("chunk", [1, 2])
def test_chunked_decode_equals_whole_decode_and_diffusers(wan, ref, chunk):
    loaded, params, _, decode = wan
    shift, scale = _stats(loaded.module)
    z = jnp.asarray((ref["latent"] - shift) / scale)
    chunked = np.asarray(decode_chunked(loaded.module, params, z, chunk))
    np.testing.assert_allclose(chunked, np.asarray(decode(params, z)), rtol=0, atol=1e-5)
    np.testing.assert_allclose(chunked, ref["decoded_raw"], rtol=0, atol=DECODE_ATOL)


def test_wan_layout_is_causal(wan, ref):
    _, params, encode, _ = wan
    video = jnp.asarray(ref["video"])
    changed = video.at[:, 5:].set(-video[:, 5:])  # frames 5..8 live in latent frame 2 only
    mean, logvar = encode(params, video)
    mean2, logvar2 = encode(params, changed)
    np.testing.assert_array_equal(mean[:, :2], mean2[:, :2])
    np.testing.assert_array_equal(logvar[:, :2], logvar2[:, :2])
    assert not np.allclose(mean[:, 2], mean2[:, 2])


# ------------------------------------------------------------------------------- the real checkpoint, on paper


def test_real_wan21_checkpoint_names_shapes_and_size():
    """diffusers' own list of the real Wan 2.1 VAE's tensors (made on the meta device) is exactly the one
    soraax's table expects, and the module has as many params (126.9M)."""
    with open(os.path.join(DATA, "vae_shapes_wan21.json")) as f:
        real = json.load(f)
    vae = vae_from_config(real["config"])
    assert tuple(vae.widths) == (96, 192, 384, 384) and vae.latent_channels == 16
    assert expected_tensors(vae) == {name: tuple(shape) for name, shape in real["shapes"].items()}
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(abstract_params(vae)))
    with open(os.path.join(DATA, "vae_versions.json")) as f:
        assert count == json.load(f)["real_param_count"] == 126_892_531


def test_config_keys_build_the_same_module_as_the_loader():
    loaded = vae_from_config(json.load(open(os.path.join(FOLDER, "config.json"))))
    cfg = ml_collections.ConfigDict({**VAE_WAN21, "widths": tuple(loaded.widths), "num_res_blocks": 1,
                                     "decoder_res_blocks": 2, "temporal_stages": (False, True, True)})
    built = build_vae(cfg, loaded.latent_mean, loaded.latent_std)
    assert built == loaded


def _wan_layout_config(**vae):
    cfg = config.load(os.path.join(ROOT, "configs", "tiny.py"))
    cfg.vae.update({**VAE_WAN21, "widths": (4, 8, 16, 16), "num_res_blocks": 1, "decoder_res_blocks": 2,
                    "shortcuts": False, "patch_size": 1, "crop": (5, 32, 32), **vae})
    return cfg


def test_wan_layout_keys_validate_and_bad_ones_are_named():
    config.validate(_wan_layout_config())
    for key, value, message in (("resample", "pixelshuffle", "config.vae.resample: must be one of"),
                                ("time_padding", "reflect", "config.vae.time_padding: must be one of"),
                                ("temporal_stages", (True, True, True), "config.vae.widths: temporal_stages")):
        with pytest.raises(config.ConfigError, match=re.escape(message)):
            config.validate(_wan_layout_config(**{key: value}))


# ------------------------------------------------------------------------------------------- bad checkpoints


def _copy(tmp_path, edit=None, config_edit=None):
    folder = tmp_path / "vae"
    shutil.copytree(FOLDER, folder)
    if edit is not None:
        tensors = load_file(str(folder / WEIGHTS))
        edit(tensors)
        save_file(tensors, str(folder / WEIGHTS))
    if config_edit is not None:
        config = json.load(open(folder / "config.json"))
        config_edit(config)
        json.dump(config, open(folder / "config.json", "w"))
    return str(folder)


def test_missing_tensor_is_named(tmp_path):
    folder = _copy(tmp_path, edit=lambda t: t.pop("decoder.up_blocks.1.upsamplers.0.time_conv.weight"))
    with pytest.raises(weights.WeightsError, match=r"tensor 'decoder.up_blocks.1.upsamplers.0.time_conv.weight' "
                                                   r"is missing"):
        load_wan_vae(folder)


def test_mis_shaped_tensor_is_named_with_both_shapes(tmp_path):
    def edit(tensors):
        tensors["encoder.mid_block.attentions.0.to_qkv.weight"] = np.zeros((48, 8, 1, 1), np.float32)
    with pytest.raises(weights.WeightsError, match=r"'encoder.mid_block.attentions.0.to_qkv.weight' has shape "
                                                   r"\[48, 8, 1, 1\], the model needs \[48, 16, 1, 1\]"):
        load_wan_vae(_copy(tmp_path, edit=edit))


def test_unexpected_tensor_is_named(tmp_path):
    def edit(tensors):
        tensors["encoder.down_blocks.0.extra.weight"] = np.zeros((4,), np.float32)
    with pytest.raises(weights.WeightsError, match=r"no place for: \['encoder.down_blocks.0.extra.weight'\]"):
        load_wan_vae(_copy(tmp_path, edit=edit))


@pytest.mark.parametrize("key,value,message", [
    ("is_residual", True, r"is_residual=True is not supported"),
    ("attn_scales", [0.5], r"attn_scales=\[0.5\] is not supported"),
    ("latents_std", [1.0, 2.0], r"latents_std has 2 values, z_dim is 16"),
    ("decoder_base_dim", 8, r"decoder_base_dim=8 differs from base_dim=4"),
])
def test_unsupported_config_is_refused_by_key(tmp_path, key, value, message):
    folder = _copy(tmp_path, config_edit=lambda c: c.update({key: value}))
    with pytest.raises(weights.WeightsError, match=message):
        load_wan_vae(folder)


def test_sharded_folder_loads_the_same_tensors(tmp_path):
    tensors = load_file(os.path.join(FOLDER, WEIGHTS))
    folder = tmp_path / "sharded"
    folder.mkdir()
    shutil.copy(os.path.join(FOLDER, "config.json"), folder / "config.json")
    names = sorted(tensors)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[::2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[1::2]}
    for shard, members in shards.items():
        save_file({n: tensors[n] for n in members}, str(folder / shard))
    json.dump({"metadata": {}, "weight_map": {n: s for s, members in shards.items() for n in members}},
              open(folder / "diffusion_pytorch_model.safetensors.index.json", "w"))
    whole = weights.materialise(load_wan_vae(FOLDER).params)
    sharded = weights.materialise(load_wan_vae(str(folder)).params)
    jax.tree.map(np.testing.assert_array_equal, whole, sharded)


# ------------------------------------------------------------------------------------------------ export


def test_export_writes_diffusers_folder_that_loads_back_identically(tmp_path):
    loaded = load_wan_vae(FOLDER)
    params = weights.materialise(loaded.params)
    save_wan_vae(str(tmp_path / "vae"), loaded.module, {"params": params})
    original, exported = load_file(os.path.join(FOLDER, WEIGHTS)), load_file(str(tmp_path / "vae" / WEIGHTS))
    assert sorted(original) == sorted(exported)
    for name in original:
        np.testing.assert_array_equal(exported[name], original[name], err_msg=name)
    ours = json.load(open(tmp_path / "vae" / "config.json"))
    theirs = json.load(open(os.path.join(FOLDER, "config.json")))
    assert {k: v for k, v in ours.items() if not k.startswith("_")} == \
        {k: v for k, v in theirs.items() if not k.startswith("_")}
    again = load_wan_vae(str(tmp_path / "vae"))
    assert again.module == loaded.module
    jax.tree.map(np.testing.assert_array_equal, weights.materialise(again.params), params)


def test_export_refuses_a_vae_without_wan_layout():
    vae = VideoVAE(widths=(4, 8, 16, 16), latent_channels=16)
    with pytest.raises(ValueError, match="not in Wan 2.1's layout"):
        save_wan_vae("/nonexistent", vae, {})
