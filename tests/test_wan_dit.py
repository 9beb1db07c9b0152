"""Wan 2.1 in soraax: diffusers' transformer folder loads into soraax's DiT and gives diffusers' velocity; the
UMT5 beside it gives transformers' states; packing stays exact on the Wan-shaped DiT; export loads back.

The reference is tests/data/wan: a tiny random WanTransformer3DModel and UMT5EncoderModel saved by diffusers and
transformers, with their outputs (tests/data/wan/make_wan_reference.py, versions.json). No torch here.
"""
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from helpers import ROOT
from soraax import patches, weights
from soraax.wan import dit_weights
from soraax.wan.folder import load_wan_folder

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "wan")
TRANSFORMER = os.path.join(DATA, "transformer")
WEIGHTS = os.path.join(TRANSFORMER, dit_weights.WEIGHTS)
# float32 through two blocks of a 24-wide model, outputs of size ~4: summation order, not a port error
# (a swapped shift/scale, a missing norm or a mis-ordered patch shows as O(1)).
ATOL = 1e-5


@functools.lru_cache(maxsize=None)
def _reference():
    return dict(np.load(os.path.join(DATA, "reference.npz")))


@functools.lru_cache(maxsize=None)
def _loaded(scan_layers=True):
    wan = dit_weights.load_wan_transformer(TRANSFORMER, scan_layers=scan_layers)
    return wan, weights.materialise(wan.params), jax.jit(wan.module.apply)


def _clip_tokens(k, patch_size):
    """Clip k of the reference as soraax tokens: (tokens [N, P], coords [N, 3], t [N], grid)."""
    ref = _reference()
    latent_THWC = ref[f"latent_{k}"].transpose(1, 2, 3, 0)
    tokens, coords = patches.patchify(latent_THWC, patch_size)
    # diffusers flattens its per-token timesteps in (t, h, w) order, as soraax orders tokens.
    return tokens, coords, ref[f"timestep_{k}"] / 1000.0, patches.grid_shape(latent_THWC.shape, patch_size)


def _velocity_CxFxHxW(v_NxP, grid, patch_size):
    return patches.unpatchify(np.asarray(v_NxP), grid, patch_size).transpose(3, 0, 1, 2)


def _run(wan, params, apply, rows):
    """rows: per row a list of (tokens, coords, t, text) segments, packed in order and padded to the longest."""
    length = max(sum(len(s[0]) for s in row) for row in rows) + 3  # padding tokens too
    text_length = max(sum(len(s[3]) for s in row) for row in rows) + 2
    batch = len(rows)
    tokens = np.zeros((batch, length, wan.module.patch_dim), np.float32)
    coords = np.zeros((batch, length, 3), np.int32)
    segment_ids, t = np.zeros((batch, length), np.int32), np.zeros((batch, length), np.float32)
    text = np.zeros((batch, text_length, wan.text_dim), np.float32)
    text_segment_ids = np.zeros((batch, text_length), np.int32)
    for b, row in enumerate(rows):
        start = text_start = 0
        for segment, (tok, crd, tt, txt) in enumerate(row, 1):
            n, m = len(tok), len(txt)
            tokens[b, start:start + n], coords[b, start:start + n], t[b, start:start + n] = tok, crd, tt
            segment_ids[b, start:start + n] = segment
            text[b, text_start:text_start + m], text_segment_ids[b, text_start:text_start + m] = txt, segment
            start, text_start = start + n, text_start + m
        tokens[b, start:] = 7.0  # padding content must not matter
    out = apply({"params": params}, jnp.asarray(tokens), jnp.asarray(coords), jnp.asarray(segment_ids),
                jnp.asarray(t), jnp.asarray(text), jnp.asarray(text_segment_ids))
    return np.asarray(out), segment_ids


@pytest.mark.parametrize("scan_layers", [True, False])
def test_velocity_matches_diffusers(scan_layers):
    wan, params, apply = _loaded(scan_layers)
    ref = _reference()
    for k in range(2):
        tokens, coords, t, grid = _clip_tokens(k, wan.patch_size)
        out, _ = _run(wan, params, apply, [[(tokens, coords, t, ref["umt5_states"])]])
        v = _velocity_CxFxHxW(out[0, :len(tokens)], grid, wan.patch_size)
        error = np.abs(v - ref[f"velocity_{k}"]).max()
        assert error < ATOL, f"clip {k}: max abs error {error} against diffusers' WanTransformer3DModel"


def test_packed_row_of_two_clips_equals_each_alone_and_diffusers():
    wan, params, apply = _loaded()
    ref = _reference()
    clips = [_clip_tokens(k, wan.patch_size) for k in range(2)]
    short_text = ref["umt5_states"][:4]
    segments = [(c[0], c[1], c[2], text) for c, text in zip(clips, (ref["umt5_states"], short_text))]
    packed, segment_ids = _run(wan, params, apply, [segments])
    alone = [_run(wan, params, apply, [[s]])[0][0, :len(s[0])] for s in segments]
    start = 0
    for k, segment in enumerate(segments):
        n = len(segment[0])
        np.testing.assert_allclose(packed[0, start:start + n], alone[k], atol=ATOL, rtol=0)
        start += n
    assert np.all(packed[0, segment_ids[0] == 0] == 0), "padding tokens must get exactly 0"
    # The first clip has the reference caption, so the packed row also matches diffusers on it.
    v = _velocity_CxFxHxW(packed[0, :len(clips[0][0])], clips[0][3], wan.patch_size)
    assert np.abs(v - ref["velocity_0"]).max() < ATOL


def test_zero_padded_caption_gives_what_wan_pipeline_conditioning_gives():
    # Wan's pipeline pads each caption's states with zeros and its DiT attends to them all; soraax's sampler
    # does the same by giving the padding the caption's segment id (model.text_pad_len).
    wan, params, apply = _loaded()
    ref = _reference()
    pad = json.load(open(os.path.join(DATA, "versions.json")))["text_pad_len"]
    padded = np.zeros((pad, wan.text_dim), np.float32)
    padded[:len(ref["umt5_states"])] = ref["umt5_states"]
    tokens, coords, t, grid = _clip_tokens(0, wan.patch_size)
    out, _ = _run(wan, params, apply, [[(tokens, coords, t, padded)]])
    v = _velocity_CxFxHxW(out[0, :len(tokens)], grid, wan.patch_size)
    assert np.abs(v - ref["velocity_0_padded"]).max() < ATOL
    # ...and it is not the masked caption's velocity: the padding changes the output.
    assert np.abs(ref["velocity_0_padded"] - ref["velocity_0"]).mean() > 0.1


def test_sampler_rows_attend_to_each_captions_zero_padding(tmp_path):
    from soraax import sampling
    config_file = _tiny_config_file(tmp_path)
    run = sampling.load_weights_run(str(config_file), DATA)
    clips = [sampling.make_clip(run, prompt, frames=5, height=32, width=48, key=jax.random.PRNGKey(i))
             for i, prompt in enumerate(["a red cat runs", "the sky"])]
    batch, _ = sampling._packed_rows(run, clips, [[0, 1]], 1)
    lengths = [len(run.models.tokenizer.encode(c.prompt, run.cfg.text_len)) for c in clips]
    pad = TINY_WAN["model.text_pad_len"]
    expected_encoder = np.zeros(run.cfg.text_len, np.int32)
    expected_encoder[:lengths[0]], expected_encoder[pad:pad + lengths[1]] = 1, 2
    expected_attend = np.zeros(run.cfg.text_len, np.int32)
    expected_attend[:pad], expected_attend[pad:2 * pad] = 1, 2
    np.testing.assert_array_equal(batch["text_segment_ids"][0], expected_encoder)
    np.testing.assert_array_equal(batch["text_attend_ids"][0], expected_attend)
    empty = len(run.models.tokenizer.empty_ids)
    assert batch["uncond_segment_ids"][0, :pad].sum() == empty and batch["uncond_attend_ids"][0, :pad].min() == 1


def test_umt5_states_match_transformers():
    folder = load_wan_folder(DATA)
    ref = _reference()
    ids = ref["input_ids"][None]
    # jitted: op by op this took 6 s
    states = jax.jit(folder.text.module.apply)({"params": weights.materialise(folder.text.params)},
                                               jnp.asarray(ids), jnp.ones_like(jnp.asarray(ids)))
    assert np.abs(np.asarray(states)[0] - ref["umt5_states"]).max() < ATOL
    # soraax's tokenizer frames the prompt as transformers' did.
    prompt = json.load(open(os.path.join(DATA, "versions.json")))["prompt"]
    np.testing.assert_array_equal(folder.text.tokenizer.encode(prompt, 64), ref["input_ids"])


def test_export_loads_back_identically(tmp_path):
    wan, params, _ = _loaded()
    dit_weights.save_wan_transformer(str(tmp_path), wan, params)
    again = dit_weights.load_wan_transformer(str(tmp_path))
    assert again.module == wan.module
    jax.tree_util.tree_map(np.testing.assert_array_equal, weights.materialise(again.params), params)
    # The same tensors, names and bits as diffusers wrote: the export is the checkpoint it came from.
    original, exported = load_file(WEIGHTS), load_file(str(tmp_path / dit_weights.WEIGHTS))
    assert sorted(original) == sorted(exported)
    for name in original:
        np.testing.assert_array_equal(original[name], exported[name], err_msg=name)


def test_sharded_export_and_index_load(tmp_path):
    wan, params, _ = _loaded()
    dit_weights.save_wan_transformer(str(tmp_path), wan, params, max_shard_bytes=20_000)
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".safetensors")]) > 1
    assert os.path.isfile(tmp_path / (dit_weights.WEIGHTS + ".index.json"))
    again = weights.materialise(dit_weights.load_wan_transformer(str(tmp_path)).params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)


def test_places_into_shardings_reading_slices():
    wan, params, _ = _loaded()
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("fsdp",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    placed = weights.place(wan.params, jax.tree_util.tree_map(lambda _: sharding, params))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), placed, params)
    stacked = wan.params["blocks"]["self_attn"]["query"]["kernel"]
    index = (slice(1, 2), slice(3, 9), slice(None))
    np.testing.assert_array_equal(stacked.read(index), params["blocks"]["self_attn"]["query"]["kernel"][index])


# ----------------------------------------------------------------------------------- refused clearly


def _edited_copy(tmp_path, edit):
    folder = tmp_path / "transformer"
    shutil.copytree(TRANSFORMER, folder)
    tensors = load_file(str(folder / dit_weights.WEIGHTS))
    edit(tensors)
    save_file(tensors, str(folder / dit_weights.WEIGHTS))
    return str(folder)


def test_missing_tensor_is_named(tmp_path):
    folder = _edited_copy(tmp_path, lambda t: t.pop("blocks.1.attn2.norm_k.weight"))
    with pytest.raises(weights.WeightsError, match=r"blocks\.1\.attn2\.norm_k\.weight.*missing"):
        dit_weights.load_wan_transformer(folder)


def test_misshaped_tensor_is_named(tmp_path):
    def edit(t):
        t["patch_embedding.weight"] = np.zeros((24, 16, 1, 2, 3), np.float32)
    shapes = r"\[24, 16, 1, 2, 3\].*\[24, 16, 1, 2, 2\]"
    with pytest.raises(weights.WeightsError, match=r"patch_embedding\.weight.*" + shapes):
        dit_weights.load_wan_transformer(_edited_copy(tmp_path, edit))


def test_unexpected_tensor_is_named(tmp_path):
    def edit(t):
        t["blocks.0.attn2.add_k_proj.weight"] = np.zeros((24, 24), np.float32)
    with pytest.raises(weights.WeightsError, match=r"add_k_proj"):
        dit_weights.load_wan_transformer(_edited_copy(tmp_path, edit))


def test_image_to_video_config_is_refused(tmp_path):
    folder = tmp_path / "transformer"
    shutil.copytree(TRANSFORMER, folder)
    config = json.load(open(folder / "config.json"))
    config["image_dim"] = 1280
    json.dump(config, open(folder / "config.json", "w"))
    with pytest.raises(weights.WeightsError, match="image_dim"):
        dit_weights.load_wan_transformer(str(folder))


# ----------------------------------------------------------------------------------- a run from Wan weights

WAN_CONFIG = os.path.join(ROOT, "configs", "wan21_t2v_1_3b.py")
# configs/wan21_t2v_1_3b.py at the size of the tiny reference model.
TINY_WAN = {"init_from": DATA, "model.width": 24, "model.depth": 2, "model.heads": 2, "model.mlp_dim": 40,
            "model.freq_dim": 16, "vae.latent_channels": 16, "seq_len": 64, "data.token_budget": 64,
            "text_len": 32, "batch_size": 1, "max_segments": 2, "model.dtype": "float32", "model.attn_impl": "xla",
            "model.remat_policy": "none", "data.workers": 0, "data.max_frames": 5, "model.text_pad_len": 16,
            # the tiny vae/: base_dim 4, one res block (the decoder one more)
            "vae.widths": (4, 8, 16, 16), "vae.num_res_blocks": 1, "vae.decoder_res_blocks": 2}


def test_init_from_places_the_wan_transformer_in_a_fresh_train_state():
    from soraax import config, sharding, train
    cfg = config.validate(config.load(WAN_CONFIG, TINY_WAN))
    task = train.dit_task(cfg)
    mesh = sharding.make_mesh(cfg.mesh)
    init, _, abstract = train.create_state(cfg, task, mesh)
    state = train.start_from_weights(cfg, init(jax.random.PRNGKey(0)), abstract)
    _, params, _ = _loaded()
    for field in (state.params["dit"], state.ema_params["dit"]):
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), field, params)


def test_init_from_that_does_not_fit_the_config_names_the_key():
    from soraax import config
    with pytest.raises(config.ConfigError, match=r"config\.model\.depth: is 3 but the Wan transformer .* has 2"):
        config.validate(config.load(WAN_CONFIG, {**TINY_WAN, "model.depth": 3}))


def test_wan_configs_describe_the_real_wan_vae():
    """configs/wan21_t2v_*.py's vae.* build the module load_wan_vae builds from the real Wan 2.1 vae/config.json
    (so --dry_run and --compile_only see the real VAE); under init_from a vae.* that differs is named."""
    from soraax import config
    from soraax.models import build_vae
    from soraax.wan.vae_weights import vae_from_config
    with open(os.path.join(DATA, "vae_shapes_wan21.json")) as f:
        real = vae_from_config(json.load(f)["config"])
    for name in ("wan21_t2v_1_3b.py", "wan21_t2v_14b.py"):
        cfg = config.load(os.path.join(ROOT, "configs", name))
        assert build_vae(cfg.vae, real.latent_mean, real.latent_std) == real
    with pytest.raises(config.ConfigError, match=r"config\.vae\.decoder_res_blocks: is 3 but the Wan VAE"):
        config.validate(config.load(WAN_CONFIG, {**TINY_WAN, "vae.decoder_res_blocks": 3}))


def test_init_from_encodes_with_the_folders_vae():
    from soraax import config, models
    from soraax.wan.vae_weights import load_wan_vae
    cfg = config.validate(config.load(WAN_CONFIG, TINY_WAN))
    assert models.build(cfg).vae == load_wan_vae(os.path.join(DATA, "vae")).module


def _tiny_config_file(tmp_path):
    """configs/wan21_t2v_1_3b.py at the tiny model's size: what a user's config for another Wan size looks like."""
    overrides = {k: v for k, v in TINY_WAN.items() if k != "init_from"}
    config_file = tmp_path / "wan_tiny.py"
    config_file.write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('base', {WAN_CONFIG!r})\n"
        "base = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(base)\n\n\n"
        "def get_config(arg=None):\n    c = base.get_config(arg)\n"
        + "".join(f"    c.{k} = {v!r}\n" for k, v in overrides.items()) + "    return c\n")
    return config_file


def test_sample_cli_samples_from_a_wan_folder(tmp_path):
    from soraax import sample
    config_file = _tiny_config_file(tmp_path)
    out = tmp_path / "clip.mp4"
    written = sample.main(["--weights", DATA, "--config", str(config_file), "--prompt", "a red cat runs",
                           "--frames", "5", "--height", "32", "--width", "48", "--steps", "2", "--out", str(out)])
    assert str(out) in written and os.path.getsize(out) > 0
    with pytest.raises(SystemExit):  # --weights without --config: one line, exit 2
        sample.main(["--weights", DATA, "--prompt", "a cat", "--out", str(out)])


def test_training_batches_attend_to_caption_padding_as_the_sampler_does():
    """With model.text_pad_len the packer gives each caption text_pad_len slots (pad ids, zero states) and
    the train step's DiT attends to all of them, kept or dropped: the layout of the sampler's rows."""
    import grain
    from soraax import config, packing, train
    cfg = config.validate(config.load(WAN_CONFIG, TINY_WAN))
    pad, width = cfg.model.text_pad_len, 8
    text_len = 2 * pad + 8  # room for both captions in one row
    rng = np.random.default_rng(0)

    def clip(caption_len):
        tokens, coords = patches.patchify(rng.normal(size=(1, 2, 2, 4)).astype(np.float32), (1, 1, 1))
        return {"tokens": tokens, "coords": coords, "cond_mask": np.zeros(len(tokens), bool),
                "text_tokens": rng.integers(1, 200, size=caption_len).astype(np.int32),
                "text_states": rng.normal(size=(caption_len, width)).astype(np.float32) + 3}

    clips = [clip(5), clip(pad + 3)]  # one shorter than the padding, one longer (kept whole)
    ds = grain.MapDataset.source(clips).to_iter_dataset()
    (row,) = list(packing.pack_clips(ds, seq_len=cfg.seq_len, text_len=text_len, max_segments=2,
                                     num_packing_bins=1, strategy="first_fit", with_text_states=True,
                                     text_pad_len=pad))
    ids, states = row["text_segment_ids"], row["text_states"]
    by_segment = {int(s): np.flatnonzero(ids == s) for s in (1, 2)}
    lengths = sorted(len(v) for v in by_segment.values())
    assert lengths == [pad, pad + 3]
    short = by_segment[min(by_segment, key=lambda s: len(by_segment[s]))]
    np.testing.assert_array_equal(row["text_tokens"][short[5:]], 0)
    np.testing.assert_array_equal(states[short[5:]], 0)
    assert np.all(states[short[:5]] != 0)

    # The train step's text conditioning: every slot of a caption is attended, with or without dropout;
    # a dropped caption is the empty caption's states, then zeros (Wan's unconditional input).
    empty = rng.normal(size=(2, width)).astype(np.float32)
    batch = {k: jnp.asarray(row[k])[None] for k in ("text_states", "text_segment_ids")}
    for rate in (0.0, 1.0):
        cfg.diffusion.text_dropout = rate
        out_states, out_ids = train.text_conditioning(None, cfg, empty)(None, batch, jax.random.PRNGKey(0))
        np.testing.assert_array_equal(out_ids[0], ids)
        expected = states.copy()
        if rate:
            expected[:] = 0
            for slots in by_segment.values():
                expected[slots[:2]] = empty
        np.testing.assert_allclose(np.asarray(out_states[0]), expected)


def test_training_encoder_path_gives_the_cached_paths_padded_states():
    """Without the text cache the train step runs the encoder on the packed pad ids: it masks them from the
    encoder (each caption's states are its own, as cached), zeroes their states, and the DiT attends to them."""
    from soraax import config, models as models_lib, train
    from soraax.text.encoders import frozen_params
    cfg = config.validate(config.load(WAN_CONFIG, {**TINY_WAN, "diffusion.text_dropout": 0.0}))
    models = models_lib.build(cfg)
    params = {"text": frozen_params(models.text)}
    pad, length = cfg.model.text_pad_len, cfg.text_len
    caption = np.asarray(models.tokenizer.encode("a red cat runs", length), np.int32)
    tokens, ids = np.zeros((1, length), np.int32), np.zeros((1, length), np.int32)
    tokens[0, :len(caption)], ids[0, :pad] = caption, 1  # what the packer makes of one padded caption
    batch = {"text_tokens": jnp.asarray(tokens), "text_segment_ids": jnp.asarray(ids)}
    # jitted: op by op the two UMT5 calls took 10 s
    states, attend = jax.jit(train.text_conditioning(models, cfg))(params, batch, jax.random.PRNGKey(0))
    alone = jax.jit(models.text_encoder.apply)({"params": params["text"]}, jnp.asarray(caption)[None],
                                               jnp.ones((1, len(caption)), jnp.int32))
    np.testing.assert_array_equal(np.asarray(attend), ids)
    np.testing.assert_allclose(np.asarray(states[0, :len(caption)]), np.asarray(alone[0]), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(states[0, len(caption):]), 0)
