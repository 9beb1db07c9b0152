"""Video and image files <-> uint8 frames, through PyAV (FFmpeg).

Frames are always `uint8 [T, H, W, 3]` RGB at the file's native size and aspect: resizing to a token budget
is a later, separate step. Every pixel format FFmpeg decodes gets there the same way (grey, palette, 10- and
16-bit, alpha: see `_to_rgb`). A still image is a one-frame video, so an image folder and a video folder go
through the same code. Anything that cannot be decoded raises `VideoDecodeError`, one type whose message
names the file, so a data pipeline can catch a single exception and count skips by `kind`.

Dimension key: T frames, H height, W width (pixels, after the container's display rotation).
"""

from __future__ import annotations

import io
import os
from fractions import Fraction
from typing import Union

import av
import numpy as np

Source = Union[str, os.PathLike, bytes, bytearray, memoryview]

# Short, stable labels for why a file was unusable; skip counters key on these rather than on FFmpeg's
# free-text messages, which vary by version and by byte offset.
DECODE_FAILURE_KINDS = ("missing", "not_a_file", "unreadable", "empty", "corrupt", "no_video_stream", "no_frames")


class VideoDecodeError(Exception):
    """A file (or byte string) that does not decode to at least one RGB frame.

    `path` names the file, `reason` says what went wrong, `kind` is one of DECODE_FAILURE_KINDS.
    """

    def __init__(self, path: str, reason: str, kind: str = "corrupt"):
        if kind not in DECODE_FAILURE_KINDS:
            raise ValueError(f"kind must be one of {DECODE_FAILURE_KINDS}, got {kind!r}")
        super().__init__(f"cannot decode {path}: {reason}")
        self.path = path
        self.reason = reason
        self.kind = kind

    def __reduce__(self):
        # Grain worker processes send exceptions back pickled; the default reduce would call __init__
        # with the formatted message only.
        return type(self), (self.path, self.reason, self.kind)


# Errors PyAV raises for unreadable input: FFmpegError subclasses ValueError/OSError; UnicodeDecodeError
# comes from malformed metadata; EOFError from truncated image pipes.
_AV_ERRORS = (av.FFmpegError, OSError, ValueError, EOFError, UnicodeDecodeError)


def _display_name(source: Source, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return os.fspath(source)


def _open(source: Source, name: str):
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise VideoDecodeError(name, "no bytes", "empty")
        file = io.BytesIO(source)
    else:
        path = os.fspath(source)
        if not os.path.exists(path):
            raise VideoDecodeError(name, "no such file", "missing")
        if not os.path.isfile(path):
            # A FIFO or device would block FFmpeg's read forever; a folder is a manifest typo.
            what = "a directory" if os.path.isdir(path) else "not a regular file"
            raise VideoDecodeError(name, f"is {what}, not a video or image file", "not_a_file")
        if os.path.getsize(path) == 0:
            raise VideoDecodeError(name, "file is empty (0 bytes)", "empty")
        file = path
    try:
        return av.open(file, metadata_errors="replace")
    except PermissionError as e:
        raise VideoDecodeError(name, f"no permission to read it ({e})", "unreadable") from e
    except _AV_ERRORS as e:
        raise VideoDecodeError(name, f"FFmpeg cannot open it ({e})", "corrupt") from e


def _video_stream(container, name: str):
    if not container.streams:
        # What FFmpeg opens of an MP4 cut before its index (moov): a container without a single stream.
        raise VideoDecodeError(name, "the container holds no streams; truncated, or not a media file", "corrupt")
    if not container.streams.video:
        raise VideoDecodeError(
            name, f"no video stream (streams: {[s.type for s in container.streams]})", "no_video_stream")
    return container.streams.video[0]


def _to_rgb(frame: av.VideoFrame) -> np.ndarray:
    """uint8 [H, W, 3] as the file is meant to be shown.

    - Deeper than 8 bits (10-bit video, 16-bit PNG): converted at 16 bits and rounded to 8 here, since
      swscale's direct path to 8 bits biases (a 16-bit v lands up to 2 levels off round(v / 257)).
    - Alpha (RGBA, grey+alpha, palettes with transparency, yuva): composited over white. The colour under
      a transparent pixel is undefined (editors often store black or leftovers there), so dropping alpha
      would train on colours no viewer shows; white is what a transparent image shows on a page.
    - Phone videos store portrait clips as landscape frames plus a display rotation, so the rotation is
      applied to keep the native aspect.
    """
    pixel_format = frame.format
    deep = any(component.bits > 8 for component in pixel_format.components)
    # A palette may carry alpha (PNG tRNS) though its format lists no alpha component.
    alpha = pixel_format.has_palette or any(component.is_alpha for component in pixel_format.components)
    if alpha:
        rgb_HxWx3 = _over_white(frame.to_ndarray(format="rgba64le" if deep else "rgba"))
    elif deep:
        rgb_HxWx3 = _to_8bit(frame.to_ndarray(format="rgb48le"))
    else:
        rgb_HxWx3 = frame.to_ndarray(format="rgb24")
    quarter_turns = round(frame.rotation / 90) % 4
    if quarter_turns:
        rgb_HxWx3 = np.rot90(rgb_HxWx3, k=quarter_turns)
    return rgb_HxWx3


def _to_8bit(pixels_uint16: np.ndarray) -> np.ndarray:
    """round(v * 255 / 65535), in integers: 0 -> 0, 65535 -> 255, v * 257 -> v."""
    return ((pixels_uint16.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _over_white(rgba_HxWx4: np.ndarray) -> np.ndarray:
    """uint8 or uint16 [H, W, 4] straight (not premultiplied) alpha -> uint8 [H, W, 3] composited on white."""
    top = float(np.iinfo(rgba_HxWx4.dtype).max)
    colour, alpha = rgba_HxWx4[..., :3].astype(np.float32) / top, rgba_HxWx4[..., 3:].astype(np.float32) / top
    return np.rint(255.0 * (colour * alpha + (1.0 - alpha))).astype(np.uint8)


def read_video(source: Source, max_frames: int | None = None, *, name: str | None = None) -> np.ndarray:
    """Decodes a video or still image (path or encoded bytes) to uint8 [T, H, W, 3] at native size.

    Args:
      source: a path, or the file's bytes (e.g. from an ArrayRecord shard).
      max_frames: stop after this many frames (the first ones); None decodes the whole stream.
      name: how error messages name the file; defaults to the path.

    Raises:
      VideoDecodeError: missing, not a file, unreadable, empty, corrupt or truncated input, no video stream,
        or zero frames.
    """
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1 or None, got {max_frames}")
    name = _display_name(source, name)
    frames = []
    with _open(source, name) as container:
        stream = _video_stream(container, name)
        try:
            for frame in container.decode(stream):
                frames.append(_to_rgb(frame))
                if len(frames) == max_frames:
                    break
        except _AV_ERRORS as e:
            reason = f"decoding failed after {len(frames)} frames ({e}); truncated or corrupt"
            raise VideoDecodeError(name, reason, "corrupt") from e
    if not frames:
        raise VideoDecodeError(name, "the video stream has no decodable frames", "no_frames")
    sizes = sorted({f.shape for f in frames})
    if len(sizes) > 1:
        raise VideoDecodeError(name, f"frame size changes mid-stream: {sizes}", "corrupt")
    return np.stack(frames)


def probe(source: Source, *, name: str | None = None) -> tuple[int, int, int]:
    """(num_frames, height, width), decoding only the first frame.

    Height and width come from that frame (so they include the display rotation and prove the file decodes
    at all). The frame count is the number of video packets, read without decoding: it is right where the
    container has no count (images, GIF, WebM), and a count short of the container's own index means the
    file was cut off. Damage inside packets after the first frame is only found by read_video.
    """
    name = _display_name(source, name)
    _, height, width, _ = read_video(source, max_frames=1, name=name).shape
    with _open(source, name) as container:
        stream = _video_stream(container, name)
        try:
            num_frames = sum(1 for packet in container.demux(stream) if packet.size)
        except _AV_ERRORS as e:
            raise VideoDecodeError(name, f"demuxing failed ({e})", "corrupt") from e
        if num_frames < stream.frames:
            raise VideoDecodeError(
                name, f"truncated: the index lists {stream.frames} frames, the file holds {num_frames}",
                "corrupt")
    return num_frames, height, width


def _check_frames(frames_THWC: np.ndarray, path: str) -> np.ndarray:
    frames_THWC = np.asarray(frames_THWC)
    if frames_THWC.dtype != np.uint8 or frames_THWC.ndim != 4 or frames_THWC.shape[-1] != 3:
        raise ValueError(
            f"writing {path}: frames must be uint8 [T, H, W, 3], got {frames_THWC.dtype} {frames_THWC.shape}")
    if frames_THWC.shape[0] == 0:
        raise ValueError(f"writing {path}: no frames (shape {frames_THWC.shape})")
    return frames_THWC


def _pad_to_even(frames_THWC: np.ndarray) -> np.ndarray:
    _, height, width, _ = frames_THWC.shape
    return np.pad(frames_THWC, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")


def _encode_stream(path: str, frames_THWC: np.ndarray, codec: str, pix_fmt: str, fps, options: dict) -> None:
    _, height, width, _ = frames_THWC.shape
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.options = options
        for rgb_HxWx3 in frames_THWC:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb_HxWx3, format="rgb24")))
        container.mux(stream.encode(None))


def write_video(path: str | os.PathLike, frames_THWC: np.ndarray, fps: float = 8) -> None:
    """Writes uint8 [T, H, W, 3] frames; the format follows the extension.

    - `.mp4`: H.264 (libx264, CRF 18, yuv420p so every player opens it). yuv420p needs even sizes, so an odd
      height or width is padded by one row/column replicating the edge; even sizes are kept exactly.
    - `.gif`: a coarse fixed 8-bit palette, for quick looks in a browser.
    - `.png`: exactly one frame, lossless.
    """
    path = os.fspath(path)
    frames_THWC = _check_frames(frames_THWC, path)
    extension = os.path.splitext(path)[1].lower()
    if extension == ".png":
        if frames_THWC.shape[0] != 1:
            raise ValueError(f"writing {path}: .png holds one frame, got {frames_THWC.shape[0]}; use .mp4")
        write_image(path, frames_THWC[0])
    elif extension == ".mp4":
        _encode_stream(path, _pad_to_even(frames_THWC), "libx264", "yuv420p", fps, {"crf": "18"})
    elif extension == ".gif":
        _encode_stream(path, frames_THWC, "gif", "rgb8", fps, {})
    else:
        raise ValueError(f"writing {path}: unsupported extension {extension!r}; use .mp4, .gif or .png")


def encode_png(image_HxWx3: np.ndarray) -> bytes:
    """uint8 [H, W, 3] (or [H, W] grey) -> PNG file bytes."""
    image = np.asarray(image_HxWx3)
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 3)):
        raise ValueError(f"an image must be uint8 [H, W, 3] or [H, W], got {image.dtype} {image.shape}")
    pix_fmt = "gray" if image.ndim == 2 else "rgb24"
    encoder = av.CodecContext.create("png", "w")
    encoder.width, encoder.height, encoder.pix_fmt = image.shape[1], image.shape[0], pix_fmt
    packets = encoder.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format=pix_fmt))
    packets += encoder.encode(None)
    return b"".join(bytes(packet) for packet in packets)


def write_image(path: str | os.PathLike, image_HxWx3: np.ndarray) -> None:
    """Writes a uint8 [H, W, 3] (or [H, W] grey) image as PNG."""
    path = os.fspath(path)
    if os.path.splitext(path)[1].lower() != ".png":
        raise ValueError(f"write_image writes PNG; {path} should end in .png")
    png = encode_png(image_HxWx3)
    with open(path, "wb") as f:
        f.write(png)


def contact_sheet(frames_THWC: np.ndarray, columns: int, gap: int = 2) -> np.ndarray:
    """Frames laid out left to right, top to bottom on a white grid: uint8 [rows*(H+gap)-gap, ...]."""
    frames_THWC = _check_frames(frames_THWC, "contact sheet")
    if columns < 1 or gap < 0:
        raise ValueError(f"contact_sheet needs columns >= 1 and gap >= 0, got columns={columns}, gap={gap}")
    num_frames, height, width, _ = frames_THWC.shape
    columns = min(columns, num_frames)
    rows = -(-num_frames // columns)
    sheet = np.full((rows * (height + gap) - gap, columns * (width + gap) - gap, 3), 255, np.uint8)
    for index, frame in enumerate(frames_THWC):
        top, left = (index // columns) * (height + gap), (index % columns) * (width + gap)
        sheet[top:top + height, left:left + width] = frame
    return sheet
