"""Sampling-time capabilities on a tiny untrained workdir (test_sampling's): every mode writes a clip of the
right size and length; held frames come back as their VAE round trip (the sampler never changes a held
token, trained or not); SDEdit at strength 0 is the input without a DiT call and at strength 1 is
text->video; two-condition guidance is the InstructPix2Pix formula with the held tokens released in the
unconditional pass; the window arithmetic of extension adds exactly the frames asked for; the CLI refuses
bad inputs before computing."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from soraax import capabilities, checkpoints, patches, sample, sampling
from soraax.data.video_io import read_video, write_image, write_video
from test_sampling import PROMPT, TINY, run, saved  # noqa: F401 (fixtures: a tiny workdir and its Run)

SIZE = dict(height=16, width=24)  # 2 x 3 patches of 8 pixels
FT = TINY["vae.temporal_factor"]
FAST = dict(steps=2, guidance=3.0)


def _video(frames, height, width, phase=0.0):
    """uint8 [frames, height, width, 3]: colour waves drifting right, so crops, resizes and frames differ."""
    t, y, x = np.meshgrid(np.arange(frames), np.arange(height) / height, np.arange(width) / width, indexing="ij")
    channels = [np.sin(2 * np.pi * (x + 0.5 * y) + 0.6 * t + phase + c) for c in (0.0, 2.0, 4.0)]
    return np.round(127.5 + 110 * np.stack(channels, -1)).astype(np.uint8)


def _max_diff(a, b):
    return int(np.abs(a.astype(int) - b.astype(int)).max())


# ------------------------------------------------------------------------------------- text->image


@pytest.mark.parametrize("height, width", [(16, 24), (24, 16), (8, 40)])
def test_text_to_image_at_any_aspect(run, height, width):
    images = sampling.generate(run, [PROMPT, "a blue circle"], frames=1, height=height, width=width, seed=0, **FAST)
    assert images.shape == (2, 1, height, width, 3) and images.dtype == np.uint8
    assert _max_diff(images[0], images[1]) > 0


# ----------------------------------------------------------------------------------------- inputs


def test_fit_video_crops_about_the_centre_then_resizes():
    wide = np.zeros((2, 10, 40, 3), np.uint8)
    wide[:, :, 15:25] = 255  # a white band in the middle, outside a centred 3:2 crop's black margins
    fitted = capabilities.fit_video(wide, 8, 12)
    assert fitted.shape == (2, 8, 12, 3) and fitted.dtype == np.uint8
    # The centred crop is columns 12.5..27.5: the band fills its middle two thirds.
    np.testing.assert_array_equal(fitted[:, :, 3:9], 255)
    assert fitted[:, :, 0].max() < 128 and fitted[:, :, -1].max() < 128
    image = capabilities.fit_video(_video(1, 45, 30)[0], 24, 16)  # one frame, grown and cropped
    assert image.shape == (1, 24, 16, 3)


# ---------------------------------------------------------------------------------- image->video


@pytest.mark.parametrize("image_guidance", [None, 2.0])
def test_image_to_video_holds_the_image_as_frame_0(run, image_guidance):
    image = _video(1, 30, 50)[0]  # 5:3, cropped to 3:2
    video = capabilities.image_to_video(run, image, PROMPT, frames=9, image_guidance=image_guidance, **SIZE,
                                        **FAST)
    assert video.shape == (9, 16, 24, 3) and video.dtype == np.uint8
    expected = capabilities.round_trip(run, capabilities.fit_video(image, **SIZE))[0]
    assert _max_diff(video[0], expected) <= 1
    assert np.abs(video[1:].astype(int) - expected).mean() > 1  # the rest is generated, not a still


def _held_first_frame_clip(run, grid=(3, 2, 3), seed=4):
    n, p = math.prod(grid), run.models.dit.patch_dim
    clean = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (n, p)))
    held = patches.grid_coords(grid)[:, 0] == 0
    return sampling.Clip(PROMPT, grid, sampling.clip_key(seed, 0), clean, held)


def _reference_two_condition(run, clip, *, steps, guidance, image_guidance):
    """The two-condition sampler written out for one clip, with separate DiT calls: v = v_u + s_i (v_i - v_u)
    + s_t (v_f - v_i), where v_u sees the empty caption and the held tokens at the clip's t on the path
    from their clean values to the clip's noise, v_i the empty caption and v_f the caption, both with the
    held tokens clean at t = 0."""
    n, p = clip.num_tokens, run.models.dit.patch_dim
    coords = jnp.asarray(patches.grid_coords(clip.grid))[None]
    segment_ids = jnp.ones((1, n), jnp.int32)
    encode = jax.jit(lambda tokens, ids: run.models.text_encoder.apply({"params": run.params["text"]}, tokens, ids))

    def text(caption):
        tokens = jnp.asarray(run.models.tokenizer.encode(caption, run.cfg.text_len))[None]
        return encode(tokens, jnp.ones_like(tokens)), jnp.ones_like(tokens)

    @jax.jit
    def velocity(x, t_tokens, states, ids):
        return run.models.dit.apply({"params": run.params["dit"]}, x, coords, segment_ids, t_tokens, states, ids)

    caption, empty = text(clip.prompt), text("")
    held = jnp.asarray(clip.cond_mask)[None]
    clean = jnp.asarray(clip.clean_tokens)[None]
    noise = jax.random.normal(clip.key, (n, p))[None]
    alpha = math.sqrt(n / run.cfg.diffusion.base_tokens)
    ts = [alpha * u / (1 + (alpha - 1) * u) for u in 1 - np.arange(steps + 1) / steps]
    x = jnp.where(held[..., None], clean, noise)
    for t, t_next in zip(ts[:-1], ts[1:]):
        t_held = jnp.where(held, 0.0, t)
        v_full, v_image = velocity(x, t_held, *caption), velocity(x, t_held, *empty)
        released = jnp.where(held[..., None], (1 - t) * clean + t * noise, x)
        v_uncond = velocity(released, jnp.full((1, n), t), *empty)
        v = v_uncond + image_guidance * (v_image - v_uncond) + guidance * (v_full - v_image)
        x = jnp.where(held[..., None], clean, x + (t_next - t) * v)
    return np.asarray(patches.unpatchify(x[0], clip.grid, run.models.patch_size))


def test_two_condition_guidance_matches_the_reference_sampler(run):
    clip = _held_first_frame_clip(run)
    expected = _reference_two_condition(run, clip, steps=2, guidance=3.0, image_guidance=2.0)
    # Packed beside a clip holding nothing, as a row would hold them.
    got, _ = sampling.sample_latents(run, [clip, sampling.Clip("", (2, 2, 2), sampling.clip_key(0, 1))],
                                     steps=2, guidance=3.0, image_guidance=2.0)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_two_condition_guidance_reduces_to_text_guidance(run):
    held, free = _held_first_frame_clip(run), sampling.Clip(PROMPT, (2, 2, 3), sampling.clip_key(1, 0))
    text = sampling.sample_latents(run, [held, free], **FAST)
    # image_guidance 1: uncond + (image - uncond) + s (full - image) is text guidance with the frames held.
    for a, b in zip(sampling.sample_latents(run, [held, free], image_guidance=1.0, **FAST), text):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    # A clip holding nothing has image = uncond: text guidance at any image scale.
    strong = sampling.sample_latents(run, [held, free], image_guidance=4.0, **FAST)
    np.testing.assert_allclose(strong[1], text[1], atol=1e-5, rtol=1e-5)
    assert np.abs(strong[0] - text[0]).max() > 1e-3  # and it does act on a clip that holds frames


# -------------------------------------------------------------------------------------- extension


@settings(max_examples=200, deadline=None)
@given(existing=st.integers(1, 12), new=st.integers(1, 40), window=st.integers(2, 9), data=st.data())
def test_extension_windows_add_exactly_the_frames_asked_for(existing, new, window, data):
    direction = data.draw(st.sampled_from(capabilities.DIRECTIONS))
    extra = direction == "backward"
    if window - 1 - extra < 1 or existing - extra < 1:
        return
    overlap = data.draw(st.integers(1, window - 1 - extra))
    windows = capabilities.extension_windows(existing, new, window=window, overlap=overlap, direction=direction)
    assert sum(generated for _, generated in windows) == new
    available = existing - extra
    for held, generated in windows:
        assert generated >= 1 and 1 <= held <= available and held >= min(overlap, available)
        assert held + generated + extra <= window
        if available >= window:  # once the clip is long enough every window is full size: one compile
            assert held + generated + extra == window
        available += generated


def test_extension_plan_counts_frames_and_names_the_flags(run):
    cfg = run.cfg
    plan = capabilities.extension_plan(cfg, 19, 12, window=9)
    assert plan.direction == "forward" and plan.kept_frames == 17 and plan.new_frames == 12 // FT
    assert capabilities.extension_plan(cfg, 5, -8, window=13).direction == "backward"
    with pytest.raises(ValueError, match=r"--extend 10: .*multiple of 4; nearest valid: 8 or 12"):
        capabilities.extension_plan(cfg, 9, 10, window=9)
    with pytest.raises(ValueError, match=r"--extend -2: .*nearest valid: -4$"):
        capabilities.extension_plan(cfg, 9, -2, window=9)
    with pytest.raises(ValueError, match=r"--video has 3 frame\(s\); extending backward needs at least 5"):
        capabilities.extension_plan(cfg, 3, -4, window=9)
    with pytest.raises(ValueError, match=r"--frames 8 "):
        capabilities.extension_plan(cfg, 9, 4, window=8)
    with pytest.raises(ValueError, match=r"--frames 5 is the extension window; a backward window needs at least 9"):
        capabilities.extension_plan(cfg, 9, -4, window=5)


@pytest.mark.parametrize("direction", capabilities.DIRECTIONS)
def test_extend_keeps_the_clip_and_adds_exactly_the_new_frames(run, direction):
    source = _video(6, 24, 36)  # 3:2 at another size; 6 frames, cut to 5
    video = capabilities.extend(run, source, PROMPT, frames=12, direction=direction, window=9, **SIZE, **FAST)
    assert video.shape == (5 + 12, 16, 24, 3) and video.dtype == np.uint8
    if direction == "forward":  # the last 5 input frames, unchanged, then 12 new ones
        np.testing.assert_array_equal(video[:5], capabilities.fit_video(source[-5:], **SIZE))
    else:
        np.testing.assert_array_equal(video[12:], capabilities.fit_video(source[:5], **SIZE))
    new = video[5:] if direction == "forward" else video[:12]
    assert np.abs(np.diff(new.astype(int), axis=0)).mean() > 1  # generated frames, not a repeated one


def test_extension_windows_hold_the_clip_frames_as_given(run):
    clip = capabilities.fit_video(_video(5, 16, 24, phase=1.0), **SIZE)
    key = sampling.clip_key(3, 0)
    # Forward: the window starts with the clip's last 5 frames; decoded, they are their VAE round trip.
    forward = capabilities.extension_clip(run, clip, PROMPT, held=2, generated=1, direction="forward", key=key)
    (latent,) = sampling.sample_latents(run, [forward], **FAST)
    window = sampling.decode(run, [latent])[0]
    assert window.shape == (9, 16, 24, 3)
    assert _max_diff(window[:5], capabilities.round_trip(run, clip)) <= 1
    # Backward: the clip's latent frames 1.. end the window, exactly the encoder's (a held latent never moves).
    backward = capabilities.extension_clip(run, clip, PROMPT, held=1, generated=1, direction="backward", key=key)
    assert backward.cond_mask.tolist() == [False] * 12 + [True] * 6
    (latent,) = sampling.sample_latents(run, [backward], **FAST)
    np.testing.assert_array_equal(latent[-1], capabilities.encode(run, clip)[1])
    assert np.abs(latent[:2]).max() > 0.1


# ------------------------------------------------------------------------------------------ edit


def test_edit_at_strength_0_is_the_round_trip_without_a_dit_call(run, monkeypatch):
    source = _video(9, 16, 24, phase=2.0)
    expected = capabilities.round_trip(run, source)

    def no_dit(*args, **kwargs):
        raise AssertionError("strength 0 called the DiT")

    monkeypatch.setattr(sampling, "_sample_rows", no_dit)
    edited = capabilities.edit(run, source, "a blue circle", strength=0.0, **FAST)
    np.testing.assert_array_equal(edited, expected)


def test_edit_at_strength_1_is_text_to_video_and_between_is_neither(run):
    source = _video(9, 16, 24, phase=2.0)
    full = capabilities.edit(run, source, "a blue circle", strength=1.0, seed=5, **FAST)
    generated = sampling.generate(run, ["a blue circle"], frames=9, seed=5, **SIZE, **FAST)[0]
    np.testing.assert_array_equal(full, generated)
    half = capabilities.edit(run, source, "a blue circle", strength=0.5, seed=5, **FAST)
    assert half.shape == (9, 16, 24, 3)
    for other in (full, capabilities.round_trip(run, source)):
        assert np.abs(half.astype(int) - other).mean() > 0.5
    with pytest.raises(ValueError, match=r"--edit_strength 1.5 must lie in \[0, 1\]"):
        capabilities.edit(run, source, PROMPT, strength=1.5)


# --------------------------------------------------------------------------------- connect, loop


def test_connect_starts_with_a_and_ends_holding_b(run):
    a, b = _video(9, 16, 24, phase=0.0), _video(9, 16, 24, phase=3.0)
    transition = capabilities.connect(run, a, b, PROMPT, frames=13, **SIZE, **FAST)
    assert transition.shape == (13, 16, 24, 3)
    assert _max_diff(transition[0], capabilities.round_trip(run, a[-1:])[0]) <= 1
    clip = capabilities.connect_clip(run, a, b, PROMPT, frames=13, context=1, key=sampling.clip_key(0, 0))
    assert clip.grid == (4, 2, 3) and clip.cond_mask.tolist() == [True] * 6 + [False] * 12 + [True] * 6
    (latent,) = sampling.sample_latents(run, [clip], **FAST)
    np.testing.assert_array_equal(latent[-1], capabilities.encode(run, b[:1 + FT])[1])
    with pytest.raises(ValueError, match=r"--frames 5 .*--frames >= 9"):
        capabilities.connect(run, a, b, PROMPT, frames=5, **SIZE)


def test_loop_starts_as_text_to_video_and_returns_to_its_start(run):
    video = capabilities.loop(run, PROMPT, frames=9, seed=2, **SIZE, **FAST)
    assert video.shape == (8, 16, 24, 3)  # frame 8 would be frame 0 again
    start = sampling.generate(run, [PROMPT], frames=1 + FT, seed=2, **SIZE, **FAST)[0]
    assert _max_diff(video[0], start[0]) <= 1
    seed_latent = np.arange(2 * 4 * 6 * 4, dtype=np.float32).reshape(2, 4, 6, 4)
    clip = capabilities.loop_clip(run, seed_latent, PROMPT, frames=9, context=1, key=sampling.clip_key(0, 0))
    tokens, _ = patches.patchify(seed_latent, run.models.patch_size)
    # Held: the seed's latent frame 0 first, its latent frame 1 (what followed frame 0) last.
    assert clip.grid == (4, 2, 3) and clip.cond_mask.tolist() == [True] * 6 + [False] * 12 + [True] * 6
    np.testing.assert_array_equal(clip.clean_tokens[:6], tokens[:6])
    np.testing.assert_array_equal(clip.clean_tokens[-6:], tokens[6:])


def test_time_patches_longer_than_a_frame_are_refused_clearly(run):
    cfg = run.cfg.copy_and_resolve_references()
    cfg.model.patch_size = (2, 2, 2)
    with pytest.raises(ValueError, match=r"--image holds single latent frames.*patch_size=\(2, 2, 2\)"):
        capabilities.check_image_to_video(cfg, 9)
    assert capabilities.edit_frames(cfg, 20) == 13  # SDEdit holds nothing: 5 + 8n frames fill time patches


# ------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    paths = {"portrait": str(folder / "portrait.png"), "a": str(folder / "a.mp4"), "b": str(folder / "b.mp4"),
             "junk": str(folder / "junk.png")}
    write_image(paths["portrait"], _video(1, 45, 30)[0])
    write_video(paths["a"], _video(10, 24, 36))
    write_video(paths["b"], _video(9, 32, 48, phase=3.0))
    with open(paths["junk"], "w") as f:
        f.write("not an image")
    return paths


def test_every_mode_writes_a_clip_of_the_right_size_and_length(saved, inputs, tmp_path, capsys, monkeypatch):
    # Each CLI call loads the same workdir: load it once (each load took a second or two of restoring and tracing).
    monkeypatch.setattr(sampling, "load_run", functools.cache(sampling.load_run))
    base = ["--workdir", saved[0], "--prompt", PROMPT, "--steps", "2"]
    sized = ["--height", "16", "--width", "24"]
    cases = [  # (flags, frames written, (height, width))
        (["--image", inputs["portrait"], "--frames", "9"], 9, sampling.default_size(checkpoints.read_config(
            saved[0]), 9, (2, 3))),  # the image's 2:3 aspect
        (["--image", inputs["portrait"], "--frames", "9", "--image_guidance", "2"] + sized, 9, (16, 24)),
        (["--video", inputs["a"], "--extend", "8", "--frames", "9"] + sized, 9 + 8, (16, 24)),
        (["--video", inputs["a"], "--extend", "-4", "--frames", "13"] + sized, 9 + 4, (16, 24)),
        (["--video", inputs["a"], "--edit_strength", "0.5", "--frames", "5"] + sized, 5, (16, 24)),
        (["--connect", inputs["a"], inputs["b"], "--frames", "13"] + sized, 13, (16, 24)),
        (["--loop", "--frames", "9"] + sized, 8, (16, 24)),
    ]
    for i, (flags, frames, (height, width)) in enumerate(cases):
        out = str(tmp_path / f"clip{i}.mp4")
        written = sample.main(base + flags + ["--out", out])
        assert written[0] == out and read_video(out).shape == (frames, height, width, 3), flags
    assert "has 10 frames; extending its last 9" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--image", "missing.png"], "--image: cannot decode missing.png: no such file"),
    (["--image", "{junk}"], "--image: cannot decode {junk}"),
    (["--video", "missing.mp4", "--extend", "8"], "--video: cannot decode missing.mp4: no such file"),
    (["--connect", "{a}", "missing.mp4"], "--connect: cannot decode missing.mp4"),
    (["--image", "{portrait}", "--connect", "{a}", "{b}"], "--image and --connect are different modes"),
    (["--image", "{portrait}", "--loop"], "--image and --loop are different modes"),
    (["--video", "{a}", "--edit_strength", "1.5"], "--edit_strength 1.5 must lie in [0, 1]"),
    (["--extend", "8"], "--extend works on a clip: pass it with --video"),
    (["--video", "{a}"], "--video needs exactly one of --extend"),
    (["--video", "{a}", "--extend", "8", "--edit_strength", "0.5"], "--video needs exactly one of"),
    (["--video", "{a}", "--extend", "10"], "nearest valid: 8 or 12"),
    (["--image_guidance", "2"], "--image_guidance scales held frames"),
    (["--image", "{portrait}", "--frames", "1"], "--image with --frames 1"),
    (["--loop", "--frames", "1"], "--loop --frames 1 is too short"),
])
def test_cli_refuses_bad_inputs_before_computing(saved, inputs, monkeypatch, capsys, flags, message):
    def no_compute(*args, **kwargs):
        raise AssertionError("loaded the run before refusing the input")

    monkeypatch.setattr(sampling, "load_run", no_compute)
    flags = [flag.format(**inputs) for flag in flags]
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--workdir", saved[0], "--prompt", PROMPT] + flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message.format(**inputs) in err, err
