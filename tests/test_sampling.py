"""Sampling, the sample CLI and eval, on a real (tiny, untrained) workdir: packing in generation is exact,
guidance is the reference cfg formula (1: the conditional model alone, 0: the unconditional one), clips are a
function of (seed, index), the CLI writes what it says and refuses bad sizes before computing, and eval's
JSON has its fields in range."""
import dataclasses
import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soraax import checkpoints, config, patches, sample, sampling, train, word_binding
from soraax import eval as evaluation
from soraax.data.video_io import read_video
from helpers import perturb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# configs/tiny.py shrunk until XLA:CPU compile time is small: 8-pixel patches (4x VAE, 2x2 patch).
TINY = {
    "model.width": 32, "model.depth": 1, "model.heads": 4, "model.text_width": 16, "model.text_depth": 1,
    "model.text_heads": 2, "vae.widths": (4, 4, 4), "vae.spatial_factor": 4, "vae.temporal_factor": 4,
    "vae.norm_groups": 2, "vae.latent_channels": 4, "vae.crop": (5, 16, 16), "vae.train_steps": 2,
    "total_steps": 2, "checkpoint_every": 1, "batch_size": 2, "seq_len": 64, "text_len": 96,
    "max_segments": 4, "data.token_budget": 32, "diffusion.sample_steps": 2, "diffusion.guidance": 3.0,
    "model.text_encoder": "bytes", "model.text_cache": False, "model.text_layers": (-1,), "vae.patch_size": 1,
    "curriculum.steps": 0,  # configs/tiny.py's 1200 would be refused with total_steps 2
}
LATENT_MEAN, LATENT_STD = (0.1, -0.2, 0.0, 0.3), (0.5, 1.5, 1.0, 2.0)
PROMPT = "a red square moving left"


def _save(cfg, task, workdir, params, ema_params, step):
    tx, _ = train.make_optimizer(cfg, task.learning_rate, task.total_steps)
    state = train.TrainState(jnp.asarray(step, jnp.int32), params, ema_params, tx.init(params))
    mngr = checkpoints.manager(workdir, keep=2, every=1)
    checkpoints.save(mngr, step, state, force=True)
    mngr.wait_until_finished()
    mngr.close()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A DiT workdir laid out as train.run leaves it (config.json, checkpoints/, vae/ with latent stats),
    with random params instead of trained ones: training would spend a minute compiling its two steps."""
    workdir = str(tmp_path_factory.mktemp("run"))
    cfg = config.validate(config.load(os.path.join(ROOT, "configs", "tiny.py"), TINY))
    checkpoints.write_config(workdir, cfg)
    key = jax.random.key(0, impl="unsafe_rbg")  # compiles inits in seconds, not tens (see test_vae)

    vae_cfg = cfg.copy_and_resolve_references()
    vae_cfg.task = "vae"
    vae_task = train.vae_task(vae_cfg)
    vae_params = nn.meta.unbox(jax.jit(vae_task.init_params)(key))
    vae_dir = os.path.join(workdir, "vae")
    _save(vae_cfg, vae_task, vae_dir, perturb(vae_params, jax.random.fold_in(key, 1), 0.3), vae_params, 2)
    with open(os.path.join(vae_dir, train.LATENT_STATS_FILE), "w") as f:
        json.dump({"mean": LATENT_MEAN, "std": LATENT_STD}, f)

    dit_task = train.dit_task(cfg)
    params = nn.meta.unbox(jax.jit(dit_task.init_params)(jax.random.fold_in(key, 2)))
    raw, ema = perturb(params, jax.random.fold_in(key, 3), 0.1), perturb(params, jax.random.fold_in(key, 4), 0.1)
    _save(cfg, dit_task, workdir, raw, ema, 2)
    return workdir, raw, ema


@pytest.fixture(scope="module")
def run(saved):
    return sampling.load_run(saved[0])


def _clip(prompt, grid, index, seed=0):
    return sampling.Clip(prompt, grid, sampling.clip_key(seed, index))


# ------------------------------------------------------------------------------------------ loading


def test_load_run_restores_the_saved_params(saved, run):
    workdir, raw, ema = saved
    assert run.step == 2 and run.ema
    jax.tree_util.tree_map(np.testing.assert_array_equal, run.params, ema)
    raw_run = sampling.load_run(workdir, use_ema=False)
    jax.tree_util.tree_map(np.testing.assert_array_equal, raw_run.params, raw)
    assert run.models.vae.latent_mean == LATENT_MEAN and run.models.vae.latent_std == LATENT_STD


def test_load_run_names_the_workdir_when_it_holds_no_run(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        sampling.load_run(str(tmp_path))
    checkpoints.write_config(str(tmp_path), checkpoints.read_config(saved[0]))
    with pytest.raises(FileNotFoundError, match="no checkpoints yet"):
        sampling.load_run(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"step 7.*steps \[2\]"):
        sampling.load_run(saved[0], step=7)


# -------------------------------------------------------------------------------------------- sizes


def test_sizes_are_checked_with_the_nearest_valid_values(run):
    cfg = run.cfg  # 8 pixels a patch, 4 frames a latent frame, seq_len 64
    assert sampling.check_size(cfg, frames=5, height=16, width=24) == (2, 2, 3)
    assert sampling.check_size(cfg, frames=1, height=8, width=8) == (1, 1, 1)
    with pytest.raises(ValueError, match=r"--height 20 .* multiple of 8 .*nearest valid: 16 or 24"):
        sampling.check_size(cfg, frames=5, height=20, width=24)
    with pytest.raises(ValueError, match=r"--width 4 .*nearest valid: 8$"):
        sampling.check_size(cfg, frames=5, height=16, width=4)
    with pytest.raises(ValueError, match=r"--frames 16 .*1 \+ 4\*n.*nearest valid: 13 or 17"):
        sampling.check_size(cfg, frames=16, height=16, width=24)
    with pytest.raises(ValueError, match=r"80 tokens .*seq_len=64.*--height 24 --width 32 fits"):
        sampling.check_size(cfg, frames=17, height=32, width=32)


def test_default_size_is_the_largest_3x2_frame_within_the_token_budget(run):
    # 17 frames = 5 latent frames; a budget of 32 leaves 6 patches a frame: 2 x 3 patches of 8 pixels.
    assert sampling.default_size(run.cfg, 17) == (16, 24)
    assert sampling.default_size(run.cfg, 17, (2, 3)) == (24, 16)
    assert sampling.default_size(run.cfg, 1) == (32, 48)  # 4 x 6 = 24 <= 32 < 5 x 8
    assert sampling.default_size(run.cfg, 5, (1, 1)) == (32, 32)  # 2 latent frames: 16 patches a frame


@pytest.mark.parametrize("tokens, num_rows", [([30, 30, 30], 2), ([12, 40, 8, 8, 50, 4, 4, 4, 4, 64], 4),
                                              ([1] * 9, 3)])
def test_pack_rows_fills_rows_within_every_limit(tokens, num_rows):
    text = [5 + (3 * i) % 11 for i in range(len(tokens))]
    rows = sampling.pack_rows(tokens, text, seq_len=64, text_len=40, max_segments=4)
    assert sorted(i for row in rows for i in row) == list(range(len(tokens)))
    for row in rows:
        assert sum(tokens[i] for i in row) <= 64 and sum(text[i] for i in row) <= 40 and len(row) <= 4
    assert len(rows) == num_rows


# ----------------------------------------------------------------------------------------- sampling

# Shapes of several sizes, so rows mix clips: together 84 tokens, more than one row of 64.
CLIPS = [("a blue circle moving up", (2, 3, 2)), (PROMPT, (2, 2, 3)), ("a green triangle", (1, 2, 2)),
         ("a large yellow diamond moving down quickly", (2, 4, 4)), ("", (2, 4, 3))]


def test_packing_is_exact_in_generation(run):
    clips = [_clip(prompt, grid, i) for i, (prompt, grid) in enumerate(CLIPS)]
    packed = sampling.sample_latents(run, clips, steps=2, guidance=3.0)
    rows = sampling.pack_rows([c.num_tokens for c in clips], [20] * 5, seq_len=64, text_len=96, max_segments=4)
    assert len(rows) == 2 and max(len(r) for r in rows) >= 3  # shared rows, and a padded batch of 2 rows
    for clip, latent in zip(clips, packed):
        alone = sampling.sample_latents(run, [clip], steps=2, guidance=3.0)[0]
        assert latent.shape == (clip.grid[0], 2 * clip.grid[1], 2 * clip.grid[2], 4)
        np.testing.assert_allclose(latent, alone, atol=1e-5, rtol=1e-5)
        assert np.abs(latent).max() > 0.1


def _reference_latent(run, prompt, grid, key, *, steps, guidance):
    """The sampler written out for one clip alone, unpadded: Euler steps on the shifted grid, with
    v = v_uncond + g (v_cond - v_uncond) from separate DiT calls."""
    p = run.models.dit.patch_dim
    n = math.prod(grid)
    coords = jnp.asarray(patches.grid_coords(grid))[None]
    segment_ids = jnp.ones((1, n), jnp.int32)

    encode = jax.jit(lambda tokens, ids: run.models.text_encoder.apply({"params": run.params["text"]}, tokens, ids))

    def text(caption):
        tokens = jnp.asarray(run.models.tokenizer.encode(caption, run.cfg.text_len))[None]
        return encode(tokens, jnp.ones_like(tokens)), jnp.ones_like(tokens)

    @jax.jit
    def velocity(x, t, states, ids):
        return run.models.dit.apply({"params": run.params["dit"]}, x, coords, segment_ids,
                                    jnp.full((1, n), t), states, ids)

    cond, uncond = text(prompt), text("")
    alpha = math.sqrt(n / run.cfg.diffusion.base_tokens)  # the resolution shift of an n-token clip
    ts = [alpha * u / (1 + (alpha - 1) * u) for u in 1 - np.arange(steps + 1) / steps]
    x = jax.random.normal(key, (n, p))[None]
    for t, t_next in zip(ts[:-1], ts[1:]):
        v_cond = velocity(x, t, *cond)
        v = v_cond
        if guidance != 1:
            v_uncond = velocity(x, t, *uncond)
            v = v_uncond + guidance * (v_cond - v_uncond)
        x = x + (t_next - t) * v
    return np.asarray(patches.unpatchify(x[0], grid, run.models.patch_size))


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_guidance_matches_the_reference_sampler(run, guidance):
    grid, key = (2, 2, 3), sampling.clip_key(5, 0)
    expected = _reference_latent(run, PROMPT, grid, key, steps=2, guidance=guidance)
    (got,) = sampling.sample_latents(run, [sampling.Clip(PROMPT, grid, key)], steps=2, guidance=guidance)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_guidance_zero_is_the_unconditional_model(run):
    grid = (2, 2, 3)
    (guided,) = sampling.sample_latents(run, [_clip(PROMPT, grid, 0)], steps=2, guidance=0.0)
    (empty,) = sampling.sample_latents(run, [_clip("", grid, 0)], steps=2, guidance=1.0)
    (conditional,) = sampling.sample_latents(run, [_clip(PROMPT, grid, 0)], steps=2, guidance=1.0)
    np.testing.assert_allclose(guided, empty, atol=1e-5, rtol=1e-5)
    assert np.abs(conditional - empty).max() > 1e-3  # the prompt does reach the model


def test_conditioning_tokens_are_held_at_their_clean_values(run):
    grid = (2, 2, 3)
    n, p = math.prod(grid), run.models.dit.patch_dim
    clean = np.asarray(jax.random.normal(jax.random.PRNGKey(9), (n, p)))
    first_frame = patches.grid_coords(grid)[:, 0] == 0
    clip = sampling.Clip(PROMPT, grid, sampling.clip_key(0, 0), clean, first_frame)
    held, _ = sampling.sample_latents(run, [clip, _clip("", (2, 4, 4), 1)], steps=2, guidance=3.0)
    tokens, _ = patches.patchify(held, run.models.patch_size)
    np.testing.assert_array_equal(tokens[first_frame], clean[first_frame])
    (free,) = sampling.sample_latents(run, [_clip(PROMPT, grid, 0)], steps=2, guidance=3.0)
    assert np.abs(patches.patchify(free, run.models.patch_size)[0][~first_frame] - tokens[~first_frame]).max() > 1e-3
    with pytest.raises(ValueError, match="clean_tokens must be"):
        sampling.sample_latents(run, [sampling.Clip(PROMPT, grid, clip.key, clean[1:], first_frame[1:])],
                                steps=2, guidance=3.0)


def test_generate_is_deterministic_by_seed_and_index(run):
    size = dict(frames=5, height=16, width=24, steps=2, guidance=3.0)
    videos = sampling.generate(run, [PROMPT, "a blue circle", PROMPT], seed=0, **size)
    assert videos.shape == (3, 5, 16, 24, 3) and videos.dtype == np.uint8
    alone = sampling.generate(run, [PROMPT], seed=0, **size)
    # Clip 0 alone and clip 0 packed with two others: the same noise key, the same clip (to rounding).
    assert np.abs(alone[0].astype(int) - videos[0]).max() <= 1
    assert np.abs(videos[2].astype(int) - videos[0]).mean() > 1  # same prompt, next index: new noise
    np.testing.assert_array_equal(sampling.generate(run, [PROMPT], seed=0, **size), alone)
    assert np.abs(sampling.generate(run, [PROMPT], seed=1, **size).astype(int) - alone).mean() > 1


# ---------------------------------------------------------------------------------------------- CLI


def test_sample_cli_writes_videos_images_and_numbered_files(saved, tmp_path, capsys):
    workdir = saved[0]
    out = str(tmp_path / "clip.mp4")
    written = sample.main(["--workdir", workdir, "--prompt", PROMPT, "--out", out, "--frames", "5"])
    assert written == [out, str(tmp_path / "clip_sheet.png")]
    height, width = sampling.default_size(checkpoints.read_config(workdir), 5)
    assert read_video(out).shape == (5, height, width, 3)
    assert read_video(written[1]).shape[0] == 1
    assert "step 2 (EMA params)" in capsys.readouterr().out

    image = sample.main(["--workdir", workdir, "--prompt", "a red square", "--out", str(tmp_path / "still.mp4"),
                         "--frames", "1", "--height", "16", "--width", "24"])
    assert image == [str(tmp_path / "still.png")] and read_video(image[0]).shape == (1, 16, 24, 3)

    first = sample.main(["--workdir", workdir, "--prompt", PROMPT, "--out", str(tmp_path / "first.png"),
                         "--frames", "5", "--height", "16", "--width", "24", "--raw"])
    assert first == [str(tmp_path / "first.png")] and read_video(first[0]).shape == (1, 16, 24, 3)

    two = sample.main(["--workdir", workdir, "--prompt", PROMPT, "--out", str(tmp_path / "many.mp4"),
                       "--frames", "5", "--height", "16", "--width", "24", "--num", "2", "--seed", "3"])
    assert [os.path.basename(p) for p in two] == ["many_0.mp4", "many_0_sheet.png", "many_1.mp4",
                                                  "many_1_sheet.png"]
    clips = [read_video(two[0]), read_video(two[2])]
    assert clips[0].shape == clips[1].shape == (5, 16, 24, 3)
    assert np.abs(clips[0].astype(int) - clips[1]).mean() > 1


def test_sample_cli_refuses_a_bad_height_before_computing(saved):
    result = subprocess.run(
        [sys.executable, "-m", "soraax.sample", "--workdir", saved[0], "--prompt", PROMPT, "--height", "20"],
        capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --height 20 must be a positive multiple of 8 (vae.spatial_factor=4 x patch 2); "
        "nearest valid: 16 or 24"]
    assert result.stdout == ""


def test_sample_cli_errors_are_one_line_with_exit_code_2(tmp_path, saved, capsys):
    for argv, message in [(["--workdir", str(tmp_path), "--prompt", "x"], "holds no config.json"),
                          (["--workdir", saved[0], "--prompt", "x", "--frames", "4"], "--frames 4"),
                          (["--workdir", saved[0], "--prompt", "x", "--out", "x.avi"], "unsupported extension"),
                          (["--workdir", saved[0], "--prompt", "x", "--num", "0"], "--num must be >= 1"),
                          (["--prompt", "x"], "--workdir")]:
        with pytest.raises(SystemExit) as exit_info:
            sample.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err, err


# --------------------------------------------------------------------------------------------- eval


def test_eval_reports_prompt_following_and_vae_psnr(run):
    result = evaluation.evaluate_run(run, num_prompts=2, steps=2, frames=5, num_vae_clips=2, num_gap_clips=2,
                                     aspect_ratios=((3, 2), (2, 3)))
    json.dumps(result)  # plain JSON
    following = result["prompt_following"]
    assert following["num_clips"] == 4 and len(following["clips"]) == 4
    for name in ("colour", "shape", "direction", "overall"):
        assert 0.0 <= following[name] <= 1.0
    assert 0.0 <= following["background"] <= 1.0  # short prompts name the background too
    assert following["left_right_confusions"] + following["up_down_confusions"] <= 4
    assert set(following["by_aspect_ratio"]) == {"3:2", "2:3"}
    assert following["sizes"] == {"3:2": [24, 32], "2:3": [32, 24]}
    assert {c["prompt"] for c in following["clips"]} == {"a red circle moving left on a black background",
                                                        "a blue square moving right on a white background"}
    assert result["vae"]["num_clips"] == 2 and 0.0 < result["vae"]["psnr_min"] <= result["vae"]["psnr"] < 100.0
    # The saved VAE's EMA params are its init, and a fresh shortcut VAE is exactly a 4x4x4 average pool,
    # which keeps colour and motion: the ceiling the eval reports is then met in full.
    assert result["vae"]["reconstruction_following"]["colour"] == 1.0
    assert result["vae"]["reconstruction_following"]["direction"] == 1.0
    assert result["step"] == 2 and result["params"] == "ema" and result["steps"] == 2
    gaps = result["caption_gaps"]
    assert gaps["noise_levels"] == list(word_binding.NOISE_LEVELS) and len(gaps["loss"]) == 3
    assert all(gaps[a]["num_clips"] == 2 and len(gaps[a]["gap"]) == 3 for a in word_binding.ATTRIBUTES)


def test_swapped_captions_change_one_word_to_another_value():
    swapped = word_binding.swapped_captions("a red square moving left")
    assert swapped == {"colour": "a green square moving left", "shape": "a red circle moving left",
                       "direction": "a red square moving right"}
    assert set(word_binding.swapped_captions("a blue diamond")) == {"colour", "shape"}  # an image: no motion


def test_caption_gaps_lay_a_caption_out_as_sampling_does(run):
    # The gaps are losses of the model sampling runs: the same caption must reach the DiT the same way.
    prompt = "a red circle moving left"
    clip = sampling.make_clip(run, prompt, frames=5, height=24, width=32, key=sampling.clip_key(0, 0))
    batch, _ = sampling._packed_rows(run, [clip], [[0]], 1)
    tokens, segments, attend = word_binding._caption_inputs(run, prompt)
    n = tokens.shape[1]
    assert n == int((batch["text_attend_ids"][0] > 0).sum()) and tokens[0, 0] != 0
    np.testing.assert_array_equal(tokens, batch["text_tokens"][:, :n])
    np.testing.assert_array_equal(segments, batch["text_segment_ids"][:, :n])
    np.testing.assert_array_equal(attend, batch["text_attend_ids"][:, :n])


def test_caption_gaps_are_zero_exactly_when_the_dit_cannot_read_the_caption(run):
    videos, captions = evaluation.heldout_clips(run, num_clips=2, frames=5, aspect_ratios=((3, 2),))
    reads = word_binding.caption_gaps(run, videos, captions, noise_levels=(0.9,))
    assert max(abs(reads[a]["gap"][0]) for a in word_binding.ATTRIBUTES) > 1e-4
    # Cut the caption off: zero its projections into the DiT (cross-attention's input and the pooled path).
    dit_params = dict(run.params["dit"])
    for name in ("text_proj", "pooled_text_proj"):
        if name in dit_params:
            dit_params[name] = jax.tree_util.tree_map(jnp.zeros_like, dit_params[name])
    deaf = dataclasses.replace(run, params={**run.params, "dit": dit_params})
    blind = word_binding.caption_gaps(deaf, videos, captions, noise_levels=(0.9,))
    for attribute in word_binding.ATTRIBUTES:
        assert abs(blind[attribute]["gap"][0]) < 1e-6, (attribute, blind[attribute])
    assert blind["direction"]["num_clips"] == 2


def test_eval_cli_writes_its_json_to_the_workdir(saved, capsys):
    result = evaluation.main(["--workdir", saved[0], "--num_prompts", "1", "--steps", "2", "--frames", "5",
                              "--vae_clips", "1", "--gap_clips", "0"])
    with open(os.path.join(saved[0], "eval.json")) as f:
        assert json.load(f) == json.loads(json.dumps(result))
    assert result["prompt_following"]["num_clips"] == len(evaluation.ASPECT_RATIOS)
    assert "caption_gaps" not in result  # --gap_clips 0 skips it
    assert "overall" in json.loads(capsys.readouterr().out)["prompt_following"]  # stdout is one JSON object
    with pytest.raises(SystemExit) as exit_info:
        evaluation.main(["--workdir", saved[0], "--frames", "1"])
    assert exit_info.value.code == 2 and "describe motion" in capsys.readouterr().err


@pytest.mark.slow  # ~70 s on 2 shared cores, nearly all of it compiling the two train steps
def test_a_trained_run_samples_and_evaluates(tmp_path):
    cfg = config.load(os.path.join(ROOT, "configs", "tiny.py"),
                      {**TINY, "data.num_examples": 64, "data.packing_bins": 2, "log_every": 1, "warmup_steps": 0,
                       "vae.batch_size": 1})
    workdir = str(tmp_path / "run")
    train.run(cfg, workdir)
    out = str(tmp_path / "clip.mp4")
    sample.main(["--workdir", workdir, "--prompt", PROMPT, "--out", out, "--frames", "5"])
    assert read_video(out).shape == (5, *sampling.default_size(cfg, 5), 3)
    result = evaluation.evaluate(workdir, num_prompts=1, steps=2, frames=5, num_vae_clips=1, num_gap_clips=1)
    assert result["step"] == 2 and 0.0 < result["vae"]["psnr"]
