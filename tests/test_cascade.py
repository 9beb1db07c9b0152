"""The super-resolution cascade: upsampling follows the causal VAE's frame arithmetic, the SR DiT packs exactly,
its batches carry the low-res latent aligned token for token, an SR stage trains and checkpoints, and the
cascade writes the higher resolution (and frame rate), with the low-res conditioning reaching its output."""
import dataclasses
import json
import math
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soraax import cascade, checkpoints, config, dit, packing, patches, sample, sampling, train
from soraax.data import pipeline
from soraax.data.video_io import read_video
from soraax.vae import pool_pixels
from helpers import ROOT, perturb
from test_sampling import TINY

# test_sampling's micro base (8-pixel patches: 4x VAE, 2x2 patch) and its 2x SR stage, 4x the tokens.
BASE = {**TINY, "diffusion.sample_steps": 1}
SR = {**BASE, "seq_len": 128, "data.token_budget": 32, "data.max_frames": 5, "data.packing_bins": 4,
      "checkpoint_every": 2, "log_every": 1, "warmup_steps": 1}
PROMPT = "a red square moving left"


def sr_config(vae_dir="unused", **overrides):
    return config.load(os.path.join(ROOT, "configs", "sr_tiny.py"),
                       {**SR, "vae.checkpoint": vae_dir, **{k.replace("__", "."): v for k, v in overrides.items()}})


def _save(cfg, task, workdir, params, step=2):
    checkpoints.write_config(workdir, cfg)
    tx, _ = train.make_optimizer(cfg, task.learning_rate, task.total_steps)
    state = train.TrainState(jnp.asarray(step, jnp.int32), params, params, tx.init(params))
    mngr = checkpoints.manager(workdir, keep=2, every=1)
    checkpoints.save(mngr, step, state, force=True)
    mngr.wait_until_finished()
    mngr.close()


def _random_params(task, seed):
    key = jax.random.key(seed, impl="unsafe_rbg")  # compiles inits in seconds (see test_vae)
    params = nn.meta.unbox(jax.jit(task.init_params)(key))
    return perturb(params, jax.random.fold_in(key, 1), 0.1)  # past adaLN-Zero's zero heads


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A base DiT workdir laid out as train.run leaves it, with its VAE in base/vae: random params."""
    workdir = str(tmp_path_factory.mktemp("base"))
    cfg = config.validate(config.load(os.path.join(ROOT, "configs", "tiny.py"), BASE))
    vae_cfg = cfg.copy_and_resolve_references()
    vae_cfg.task = "vae"
    vae_task = train.vae_task(vae_cfg)
    _save(vae_cfg, vae_task, os.path.join(workdir, "vae"), _random_params(vae_task, 0))
    with open(os.path.join(workdir, "vae", train.LATENT_STATS_FILE), "w") as f:
        json.dump({"mean": [0.1, -0.2, 0.0, 0.3], "std": [0.5, 1.5, 1.0, 2.0]}, f)
    dit_task = train.dit_task(cfg)
    _save(cfg, dit_task, workdir, _random_params(dit_task, 1))
    return workdir


@pytest.fixture(scope="module")
def sr_dir(base_dir, tmp_path_factory):
    """The SR stage trained for two steps on the base's VAE, by the same entry point as the CLI."""
    workdir = str(tmp_path_factory.mktemp("sr"))
    records = train.run(sr_config(os.path.join(base_dir, "vae")), workdir)
    return workdir, records


# ------------------------------------------------------------------------------------------ upsampling


def test_upsampling_follows_the_causal_frame_arithmetic():
    # Latent frames 1 + n -> 1 + 2n; high-res latent k >= 1 lies inside low-res latent ceil(k / 2).
    np.testing.assert_array_equal(cascade.time_weights(3, 2, "nearest").argmax(axis=1), [0, 1, 1, 2, 2])
    for method in cascade.UPSAMPLE_METHODS:
        for weights in (cascade.time_weights(4, 2, method), cascade.space_weights(5, 2, method)):
            np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-6)  # a constant stays constant
            assert (weights >= 0).all()
        np.testing.assert_array_equal(cascade.time_weights(3, 1, method), np.eye(3))  # factor 1 changes nothing
    # Linear upsampling is exact on a linear ramp away from the clamped edges (half-pixel centres).
    ramp = np.arange(5.0)
    up = cascade.space_weights(5, 2, "trilinear") @ ramp
    np.testing.assert_allclose(up[1:-1], (np.arange(1, 9) + 0.5) / 2 - 0.5, atol=1e-6)
    latent = np.random.default_rng(0).normal(size=(3, 2, 3, 4)).astype(np.float32)
    nearest, linear = (cascade.upsample_latent(latent, 2, 2, method) for method in ("nearest", "trilinear"))
    assert nearest.shape == linear.shape == (5, 4, 6, 4)
    np.testing.assert_array_equal(nearest[3, 1::2, ::2], latent[2])  # latent 3 of 1 + 2n lies in latent 2
    # Frame 0 is the image alone in both clips; linear 2x in space keeps each channel's mean.
    np.testing.assert_allclose(linear[0].mean(axis=(0, 1)), latent[0].mean(axis=(0, 1)), atol=1e-6)
    # The low-res clip: every 2nd frame of 1 + 2m, 2x2 pixel means.
    video = np.random.default_rng(1).uniform(-1, 1, (9, 8, 12, 3)).astype(np.float32)
    small = cascade.downscale_video(video, 2, 2)
    assert small.shape == (5, 4, 6, 3)
    np.testing.assert_allclose(small[2, 1, 3], video[4, 2:4, 6:8].mean(axis=(0, 1)), rtol=1e-6)
    with pytest.raises(ValueError, match="does not downscale"):
        cascade.downscale_video(video[:8], 2, 2)


@pytest.mark.parametrize("spatial, temporal", [(2, 1), (2, 2), (3, 1)])
def test_sr_clips_fit_the_budget_and_downscale_to_whole_latents(spatial, temporal):
    cfg = sr_config(sr__spatial_factor=spatial, sr__temporal_factor=temporal, data__max_frames=17)
    budget = cascade.sr_budget(cfg)
    for native in [(17, 96, 128), (17, 128, 64), (1, 64, 64), (9, 4000, 16)]:
        frames, height, width = pipeline.fit_to_budget(*native, **budget)
        # The high-res latent tiles into patches and its low-res version is whole VAE latents.
        hi = (1 + (frames - 1) // 4, height // 4, width // 4)
        assert height % 4 == 0 and width % 4 == 0 and hi[1] % 2 == 0 and hi[2] % 2 == 0
        lo_frames, lo_h, lo_w = cascade.downscale_video(np.zeros((frames, height, width, 3)), spatial, temporal).shape[:3]
        assert lo_h % 4 == 0 and lo_w % 4 == 0 and (lo_frames - 1) % 4 == 0
        lo = np.zeros((1 + (lo_frames - 1) // 4, lo_h // 4, lo_w // 4, 4))
        assert cascade.upsample_latent(lo, spatial, temporal, "nearest").shape[:3] == hi
        assert math.prod(hi) // 4 <= cfg.data.token_budget and frames <= native[0]


# -------------------------------------------------------------------------------------------- the DiT


def _sr_row(clips, seq_len):
    """Clips [(tokens, lowres, aug, grid)] packed into one padded row (batch of 1), text one token each."""
    n = sum(c[0].shape[0] for c in clips)

    def cat(parts, fill):
        parts = list(parts) + [np.full((seq_len - n, *np.shape(parts[0])[1:]), fill, np.float32)]
        return jnp.asarray(np.concatenate(parts).astype(np.float32))[None]
    segment_ids = np.zeros(seq_len, np.int32)
    start = 0
    for k, (tokens, *_rest) in enumerate(clips, start=1):
        segment_ids[start:start + tokens.shape[0]] = k
        start += tokens.shape[0]
    coords = np.concatenate([patches.grid_coords(c[3]) for c in clips] + [np.zeros((seq_len - n, 3), np.int32)])
    text = np.random.default_rng(5).normal(size=(len(clips), 6)).astype(np.float32)
    return dict(tokens_BxSxP=cat([c[0] for c in clips], 7.0), coords_BxSx3=jnp.asarray(coords)[None],
                segment_ids_BxS=jnp.asarray(segment_ids)[None],
                t_BxS=cat([0.3 + c[2] for c in clips], 0.5),  # each clip its own t
                text_BxLxT=jnp.asarray(text)[None], text_segment_ids_BxL=jnp.arange(1, len(clips) + 1)[None],
                lowres_BxSxQ=cat([c[1] for c in clips], -3.0), aug_BxS=cat([c[2] for c in clips], 0.9))


def test_sr_dit_packs_exactly_and_sees_its_own_low_res_clip():
    model = dit.DiT(patch_dim=8, lowres_dim=8, width=32, depth=1, heads=2, mlp_ratio=2.0)
    rng = np.random.default_rng(0)
    clips = []
    for grid, aug in (((2, 2, 3), 0.1), ((1, 3, 2), 0.4)):  # a video and an image: different shapes
        n = math.prod(grid)
        clips.append((rng.normal(size=(n, 8)), rng.normal(size=(n, 8)), np.full(n, aug), grid))
    row = _sr_row(clips, 24)
    params = perturb(nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), **row)), jax.random.PRNGKey(1), 0.2)
    apply = jax.jit(model.apply)
    packed = apply(params, **row)[0]
    start = 0
    for i, clip in enumerate(clips):
        n = clip[0].shape[0]
        alone = _sr_row([clip], n)
        alone["text_BxLxT"] = row["text_BxLxT"][:, i:i + 1]
        np.testing.assert_allclose(packed[start:start + n], apply(params, **alone)[0], atol=1e-5, rtol=1e-5)
        start += n
    np.testing.assert_array_equal(packed[start:], 0.0)  # padding: exactly zero
    # The first clip's low-res tokens and augmentation level reach its output, and only its output.
    for key, value in (("lowres_BxSxQ", row["lowres_BxSxQ"].at[0, :12].add(1.0)),
                       ("aug_BxS", row["aug_BxS"].at[0, :12].set(0.3))):
        changed = apply(params, **{**row, key: value})[0]
        assert float(jnp.abs(changed[:12] - packed[:12]).max()) > 1e-3
        np.testing.assert_array_equal(changed[12:], packed[12:])
    # lowres_dim = 0 (the default) is the text-to-video DiT, with its params unchanged.
    plain = dit.DiT(patch_dim=8, width=32, depth=1, heads=2, mlp_ratio=2.0)
    plain_row = {k: v for k, v in row.items() if k not in ("lowres_BxSxQ", "aug_BxS")}
    plain_params = nn.meta.unbox(jax.eval_shape(plain.init, jax.random.PRNGKey(0), **plain_row))["params"]
    assert "aug_embedder" not in plain_params and plain_params["patch_embed"]["kernel"].shape == (8, 32)
    assert params["params"]["patch_embed"]["kernel"].shape == (16, 32)
    with pytest.raises(ValueError, match="lowres_dim=0"):
        plain.apply({"params": plain_params}, **row)


# -------------------------------------------------------------------------------------------- batches


@pytest.mark.slow  # encodes through the VAE at a dozen clip shapes; .ci/run runs it
def test_sr_batches_carry_the_low_res_latent_token_for_token():
    # A parameter-free "VAE" (4x4 pixel and 4-frame causal means): the low-res latent of the 2x-downscaled
    # crop is then exactly the 2x2 mean of the high-res latent, so nearest upsampling must give it back.
    cfg = sr_config(vae__latent_channels=3, vae__shortcuts=False, sr__upsample="nearest")
    encode = lambda video: np.asarray(pool_pixels(jnp.asarray(video)[None], 4, 4)[0])  # noqa: E731
    batch = next(iter(pipeline.sr_batches(cfg, encode)))
    p = patches.patch_dim((1, 2, 2), 3)
    assert batch["tokens"].shape == batch["lowres_tokens"].shape == (2, 128, p)
    np.testing.assert_array_equal(batch["lowres_tokens"][batch["segment_ids"] == 0], 0.0)
    segments = 0
    for r in range(2):
        row = {k: v[r] for k, v in batch.items()}
        for clip in packing.unpack_row(row):
            where = row["segment_ids"] == clip["segment_id"]
            hi = patches.unpatchify(clip["tokens"], clip["grid"], (1, 2, 2))
            lo = patches.unpatchify(row["lowres_tokens"][where], clip["grid"], (1, 2, 2))
            t, h, w, c = hi.shape
            box = hi.reshape(t, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
            np.testing.assert_allclose(lo, cascade.upsample_latent(box, 2, 1, "nearest"), atol=1e-5)
            assert not clip["cond_mask"].any()
            segments += 1
    assert segments >= 2


# -------------------------------------------------------------------------------------------- training


@pytest.mark.slow  # trains the SR stage fixture (sr_dir); .ci/run runs it
def test_sr_stage_trains_and_checkpoints(sr_dir):
    workdir, records = sr_dir
    assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["loss"]) for r in records)
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]
    assert checkpoints.read_config(workdir).task == "sr"
    assert os.path.isfile(os.path.join(workdir, "metrics_sr.jsonl"))


def test_dry_run_describes_the_sr_stage():
    info = train.describe(sr_config(), compile_step=False)
    assert info["task"] == "sr" and info["batch"]["lowres_tokens"] == [2, 128, 16]
    base = train.describe(config.load(os.path.join(ROOT, "configs", "tiny.py"), {**SR, "task": "dit"}),
                          compile_step=False)
    assert info["params"] > base["params"] and info["flops_per_token"] > base["flops_per_token"]


@pytest.mark.parametrize("key, value, message", [
    ("sr.spatial_factor", 1, "sr.spatial_factor: and sr.temporal_factor are both 1"),
    ("sr.max_aug", 1.0, "config.sr.max_aug: must be in [0, 1)"),
    ("sr.sample_aug", 0.7, "config.sr.sample_aug: must be in [0, 0.5]"),
    ("sr.upsample", "cubic", "config.sr.upsample: must be one of"),
    ("vae.checkpoint", "", "config.vae.checkpoint: an SR stage encodes with its base run's frozen VAE"),
    ("data.cond_first_frame_rate", 0.1, "config.data.cond_first_frame_rate: must be 0 for an SR stage"),
    ("model.patch_size", (2, 2, 2), None),
])
def test_sr_keys_are_validated_with_their_names(key, value, message):
    overrides = {key.replace(".", "__"): value}
    if key == "model.patch_size":
        overrides["sr__temporal_factor"], message = 2, "config.sr.temporal_factor: temporal SR"
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        config.validate(sr_config(**overrides))


# -------------------------------------------------------------------------------------------- cascade


@pytest.mark.slow  # trains the SR stage fixture (sr_dir); .ci/run runs it
def test_cascade_cli_writes_the_sr_size(base_dir, sr_dir, tmp_path, capsys):
    out = str(tmp_path / "x.mp4")
    written = sample.main(["--cascade", f"{base_dir},{sr_dir[0]}", "--prompt", PROMPT, "--out", out,
                           "--frames", "5"])
    assert written[0] == out
    base_h, base_w = sampling.default_size(checkpoints.read_config(base_dir), 5)
    assert read_video(out).shape == (5, 2 * base_h, 2 * base_w, 3)
    assert f"5x{base_h}x{base_w} -> 5x{2 * base_h}x{2 * base_w}" in capsys.readouterr().out


@pytest.fixture(scope="module")
def stages(base_dir, sr_dir, tmp_path_factory):
    """The loaded base and the trained SR stage with perturbed params (two steps from adaLN-Zero leave its
    output near zero), and a temporal SR stage (2x frame rate too) with random params."""
    base = sampling.load_run(base_dir)
    trained = sampling.load_run(sr_dir[0], task="sr")
    spatial = dataclasses.replace(trained, params=perturb(trained.params, jax.random.PRNGKey(3), 0.1))
    cfg = sr_config(os.path.join(base_dir, "vae"), sr__temporal_factor=2)
    workdir = str(tmp_path_factory.mktemp("tsr"))
    _save(cfg, train.sr_task(cfg), workdir, _random_params(train.sr_task(cfg), 2))
    return base, spatial, sampling.load_run(workdir, task="sr")


@pytest.mark.slow  # trains the SR stage fixture (sr_dir); .ci/run runs it
def test_low_res_conditioning_reaches_the_sr_output(stages):
    base, sr, _ = stages
    keys = [sampling.clip_key(0, 0)]
    (latent,) = sampling.sample_latents(base, [sampling.Clip(PROMPT, (2, 2, 3), keys[0])], steps=1, guidance=3.0)
    (up,) = cascade.super_resolve(sr, [latent], [PROMPT], keys, steps=1, guidance=3.0)
    assert up.shape == (2, 8, 12, 4)
    (again,) = cascade.super_resolve(sr, [latent], [PROMPT], keys, steps=1, guidance=3.0)
    np.testing.assert_array_equal(again, up)
    (other,) = cascade.super_resolve(sr, [latent + 1.0], [PROMPT], keys, steps=1, guidance=3.0)
    assert np.abs(other - up).max() > 1e-2


@pytest.mark.slow  # trains the SR stage fixture (sr_dir); .ci/run runs it
def test_temporal_sr_doubles_the_frame_rate(stages):
    base, _, temporal = stages
    videos = cascade.generate([base, temporal], [PROMPT], frames=9, height=32, width=48, seed=0)
    assert videos.shape == (1, 9, 32, 48, 3) and videos.dtype == np.uint8  # base: 5 x 16 x 24


@pytest.mark.slow  # trains the SR stage fixture (sr_dir); .ci/run runs it
def test_cascade_cli_refuses_bad_stages_and_sizes_before_computing(base_dir, sr_dir, tmp_path, capsys):
    sr = sr_dir[0]
    for argv, message in [
            ([f"{base_dir},{tmp_path / 'nope'}"], "is not a folder"),
            ([f"{sr},{base_dir}"], "the first stage must be a DiT run"),
            ([f"{base_dir},{base_dir}"], "every stage after the first must be a super-resolution run"),
            ([base_dir], "give the base run and the SR run(s)"),
            ([f"{base_dir},{sr}", "--frames", "4"], "--frames 4 with --cascade"),
            ([f"{base_dir},{sr}", "--height", "20"], "--height 20 with --cascade must be a positive multiple of 16"),
            ([f"{base_dir},{sr}", "--height", "64", "--width", "128"], "more than a packed row holds"),
            ([f"{base_dir},{sr}", "--loop"], "does not combine with --loop")]:
        with pytest.raises(SystemExit) as exit_info:
            sample.main(["--cascade", *argv, "--prompt", "x", "--out", str(tmp_path / "x.mp4")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err, err
    with pytest.raises(ValueError, match="an SR run samples as a stage of --cascade"):
        sampling.load_run(sr)
