"""Image->video, extend, edit (SDEdit) and connect on a run made of Wan 2.1 weights (the tiny reference folder
tests/data/wan): Wan's causal VAE (zero time padding, separable resampling) and its DiT (shared modulation,
caption zero padding attended) through the same capability code as soraax's own runs.

One run is loaded for the whole module and the CLI is pointed at it, so each mode costs its sampling only."""
import numpy as np
import pytest

from soraax import capabilities, sample, sampling
from soraax.data.video_io import read_video, write_image, write_video
from test_wan_dit import DATA, _tiny_config_file

# Every mode samples through Wan's VAE and DiT (~40 s of compiles): out of the 10-minute suite, run by .ci/run.
pytestmark = pytest.mark.slow

PROMPT = "a red cat runs"
H, W = 32, 48  # the tiny VAE's 8x spatial factor times the 1x2x2 patch: multiples of 16


def _video(frames, height, width, phase=0.0):
    """A smooth moving pattern (uint8), so the VAE round trip is close to the input."""
    t, y, x = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
    channels = [np.sin(0.3 * x + 0.2 * y - 0.5 * t + phase + c) for c in range(3)]
    return ((np.stack(channels, -1) + 1) * 127.5).astype(np.uint8)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    config_file = _tiny_config_file(tmp_path_factory.mktemp("wan_config"))
    return sampling.load_weights_run(str(config_file), DATA), str(config_file)


def test_image_to_video_starts_from_the_images_round_trip(run):
    run, _ = run
    image = _video(1, H, W)[0]
    clip = capabilities.image_to_video(run, image, PROMPT, frames=9, height=H, width=W, steps=2)
    assert clip.shape == (9, H, W, 3) and clip.dtype == np.uint8
    # Latent frame 0 is held, and Wan's decoder is causal: frame 0 is the image through the VAE alone.
    expected = capabilities.round_trip(run, image[None])[0]
    assert np.abs(clip[0].astype(int) - expected.astype(int)).max() <= 1


def test_extend_keeps_the_input_frames(run):
    run, _ = run
    video = _video(9, H, W)
    clip = capabilities.extend(run, video, PROMPT, frames=4, window=9, height=H, width=W, steps=2)
    assert clip.shape == (13, H, W, 3)
    np.testing.assert_array_equal(clip[:9], video)


def test_edit_at_strength_0_is_the_round_trip_and_above_changes_the_clip(run):
    run, _ = run
    video = _video(9, H, W)
    kept = capabilities.edit(run, video, PROMPT, strength=0.0, height=H, width=W, steps=2)
    np.testing.assert_array_equal(kept, capabilities.round_trip(run, video))
    edited = capabilities.edit(run, video, PROMPT, strength=0.6, height=H, width=W, steps=2)
    assert edited.shape == (9, H, W, 3) and not np.array_equal(edited, kept)


def test_connect_is_the_transition_only(run):
    run, _ = run
    clip = capabilities.connect(run, _video(9, H, W), _video(9, H, W, phase=3.0), PROMPT, frames=9, height=H, width=W, steps=2)
    assert clip.shape == (9, H, W, 3)


def test_every_mode_of_the_cli_writes_a_clip_of_the_right_size_and_length(run, tmp_path, monkeypatch):
    run, config_file = run
    # The CLI loads the same folder; reuse the module's run so only the sampling is paid for each mode.
    monkeypatch.setattr(sampling, "load_weights_run", lambda config, folder: run)
    image, a, b = str(tmp_path / "image.png"), str(tmp_path / "a.mp4"), str(tmp_path / "b.mp4")
    write_image(image, _video(1, 45, 30)[0])
    write_video(a, _video(10, 24, 36))
    write_video(b, _video(9, H, W, phase=3.0))
    base = ["--weights", DATA, "--config", config_file, "--prompt", PROMPT, "--steps", "2",
            "--height", str(H), "--width", str(W)]
    cases = [  # (flags, frames written)
        (["--image", image, "--frames", "9"], 9),
        (["--video", a, "--extend", "4", "--frames", "9"], 9 + 4),  # a's last 9 frames, then 4 new ones
        (["--video", a, "--edit_strength", "0.5", "--frames", "5"], 5),
        (["--connect", a, b, "--frames", "9"], 9),
    ]
    for i, (flags, frames) in enumerate(cases):
        out = str(tmp_path / f"clip{i}.mp4")
        written = sample.main(base + flags + ["--out", out])
        assert written[0] == out and read_video(out).shape == (frames, H, W, 3), flags


def test_a_run_fine_tuned_from_the_folder_samples_every_mode(tmp_path):
    """Two train steps from init_from (Wan's VAE encodes, captions padded as Wan's sampler pads them), then
    load_run on that workdir: its VAE is the folder's again and each capability gives a clip of its size."""
    from soraax import config, train
    cfg = config.validate(config.load(str(_tiny_config_file(tmp_path)), {
        "init_from": DATA, "total_steps": 2, "checkpoint_every": 2, "log_every": 1, "data.num_examples": 16}))
    workdir = str(tmp_path / "run")
    train.run(cfg, workdir)
    run = sampling.load_run(workdir)
    assert run.step == 2 and run.models.vae.time_padding == "zeros"  # Wan's VAE, from the folder
    video = _video(9, H, W)
    sized = dict(height=H, width=W, steps=1)
    assert capabilities.image_to_video(run, video[0], PROMPT, frames=9, **sized).shape == (9, H, W, 3)
    assert capabilities.extend(run, video, PROMPT, frames=4, window=9, **sized).shape == (13, H, W, 3)
    assert capabilities.edit(run, video, PROMPT, strength=0.5, **sized).shape == (9, H, W, 3)
    assert capabilities.connect(run, video, video[::-1], PROMPT, frames=9, **sized).shape == (9, H, W, 3)
