"""Reads a clip back into the captioned attributes of `soraax.data.synthetic`: the prompt-following eval.

A generated clip comes out of a VAE and a diffusion model, so it is blurry and noisy and its colours drift.
The reading is therefore built from statistics that survive that:
  * background: the per-channel median of every frame's border, named by the nearest background colour;
  * object: pixels far (in RGB) from their frame's background; its colour is the median of its core
    pixels, named by the object colour whose mix with the background comes nearest (blur only mixes);
  * coverage: each pixel's position between background and object colour (0 = background, 1 = object),
    which is exactly what antialiasing and blur produce, so areas and centroids stay sub-pixel;
  * shape: two numbers built from cumulants of the coverage mass, which a symmetric blur leaves unchanged
    above the second order, divided by powers of the area, which removes scale: the vertical third
    cumulant (negative only for the apex-up triangle) and "squareness", the fourth cumulants along the
    axes minus those along the diagonals (negative for a square, zero for a circle, positive for a
    diamond, which is a square turned 45 degrees); medians over frames;
  * direction: the least-squares slope of the centroid track, the larger of its x and y parts; None when
    the object travels less than a quarter of what "slowly" would cover, and always for a single frame.

`score` compares readings with what captions say (via `parse_caption`), attribute by attribute.

Dimension key: T frames, H height, W width, C = 3 RGB channels.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import numpy as np

from soraax.data.synthetic import BACKGROUNDS, COLOURS, SHAPES, SIZES, SPEED_FRACTION, SPEEDS

SCORED_ATTRIBUTES = ("colour", "shape", "direction", "background")

# Every object colour is >= 100 from every background in RGB, so half of that separates object from
# background with room for blur and noise on either side.
_OBJECT_DISTANCE = 50.0
_MIN_OBJECT_PIXELS = 4
# Coverage below this is treated as background: keeps sensor-like noise out of areas and centroids.
_COVERAGE_FLOOR = 0.25
# Ideal shape invariants (see `_frame_moments`): skew -0.021 for the apex-up triangle, 0 otherwise;
# squareness -1/120 square, 0 circle, +1/120 diamond. Blur shrinks both toward 0 (the coverage floor cuts
# the blurred rim), so thresholds sit nearer 0 than midway; measured on blur sigma 1.5 px at 8 px objects.
_TRIANGLE_SKEW = -0.007
_SQUARENESS = 0.003
# An object counts as moving once it travels a quarter of what "slowly" covers in the same frames (and at
# least this many pixels): far enough that jitter of a still object does not pass for motion and win a
# quarter of the direction score by chance, near enough to accept a model that moves things too slowly.
_MOVING_FRACTION_OF_SLOW = 0.25
_MOVING_PIXELS = 0.1


@dataclasses.dataclass(frozen=True)
class ClipReading:
    """What `analyse_clip` reads from a clip; attributes are None where no object was found."""

    colour: str | None
    shape: str | None
    direction: str | None
    background: str
    displacement: tuple[float, float]  # (dx, dy) in pixels over the clip, from the fitted centroid track
    object_fraction: float  # mean fraction of a frame's area the object covers

    def attributes(self) -> dict[str, str | None]:
        return {name: getattr(self, name) for name in SCORED_ATTRIBUTES}


def _nearest(palette: dict[str, tuple[int, int, int]], rgb: np.ndarray) -> str:
    names = tuple(palette)
    colours = np.asarray([palette[n] for n in names], np.float32)
    return names[int(np.argmin(np.sum((colours - rgb[None, :]) ** 2, axis=-1)))]


def _nearest_object_colour(rgb: np.ndarray, background_rgb: np.ndarray) -> str:
    """The object colour c whose mix with the background, bg + a (c - bg) for a in [0, 1], comes nearest.

    A small object blurred into its background never reaches its own colour anywhere; it stays on the line
    from the background to that colour, where plain nearest-colour would name a darker or paler neighbour.
    """
    names = tuple(COLOURS)
    contrasts_Kx3 = np.asarray([COLOURS[n] for n in names], np.float32) - background_rgb[None, :]
    offset = rgb - background_rgb
    mix_K = np.clip(contrasts_Kx3 @ offset / np.maximum(np.sum(contrasts_Kx3 ** 2, axis=-1), 1.0), 0.0, 1.0)
    residual_K = np.sum((offset[None, :] - mix_K[:, None] * contrasts_Kx3) ** 2, axis=-1)
    return names[int(np.argmin(residual_K))]


def _border_pixels(frames_THWC: np.ndarray) -> np.ndarray:
    """float [T, 2H + 2W, C]: the four edges of every frame."""
    return np.concatenate([frames_THWC[:, 0], frames_THWC[:, -1], frames_THWC[:, :, 0], frames_THWC[:, :, -1]],
                          axis=1)


def _classify_shape(skew: float, squareness: float) -> str:
    if skew <= _TRIANGLE_SKEW:
        return "triangle"
    if squareness <= -_SQUARENESS:
        return "square"
    return "diamond" if squareness >= _SQUARENESS else "circle"


def _cumulants(mass_HW: np.ndarray, coordinate_HW: np.ndarray, area: float) -> tuple[float, float, float]:
    """Mean, third and fourth cumulants of a coordinate under the normalised mass."""
    mean = float(np.sum(mass_HW * coordinate_HW) / area)
    d = coordinate_HW - mean
    d2 = d * d
    m2 = np.sum(mass_HW * d2) / area
    return mean, float(np.sum(mass_HW * d2 * d) / area), float(np.sum(mass_HW * d2 * d2) / area - 3 * m2 * m2)


def _frame_moments(coverage_HW: np.ndarray):
    """(area, cx, cy, skew, squareness) of the object in one frame, or None if it is not there.

    Only a box around the object (its median pixel +- sqrt(its pixel count) + 4) counts, so that stray
    noise far away cannot dominate the high-order moments.
    """
    ys, xs = np.nonzero(coverage_HW > 0.5)
    if ys.size < _MIN_OBJECT_PIXELS:
        return None
    half = np.sqrt(ys.size) + 4
    my, mx = np.median(ys), np.median(xs)
    y0, y1 = int(max(0, np.floor(my - half))), int(np.ceil(my + half)) + 1
    x0, x1 = int(max(0, np.floor(mx - half))), int(np.ceil(mx + half)) + 1
    mass_HW = coverage_HW[y0:y1, x0:x1]
    area = float(mass_HW.sum())
    if area <= 0.0:  # scattered specks (a failed generation), none of them near their median
        return None
    y_HW, x_HW = np.meshgrid(np.arange(y0, y0 + mass_HW.shape[0], dtype=np.float64) + 0.5,
                             np.arange(x0, x0 + mass_HW.shape[1], dtype=np.float64) + 0.5, indexing="ij")
    cx, _, k4x = _cumulants(mass_HW, x_HW, area)
    cy, k3y, k4y = _cumulants(mass_HW, y_HW, area)
    _, _, k4u = _cumulants(mass_HW, (x_HW + y_HW) / np.sqrt(2.0), area)
    _, _, k4v = _cumulants(mass_HW, (x_HW - y_HW) / np.sqrt(2.0), area)
    # Cumulants above the second are unchanged by a symmetric blur, and dividing by powers of the area
    # (also unchanged) removes scale: these two numbers depend on the shape alone.
    skew = k3y / area ** 1.5
    squareness = (k4x + k4y - k4u - k4v) / area ** 2
    return area, cx, cy, skew, squareness


def _direction(dx: float, dy: float, frames: float, height: int, width: int, size: float) -> str | None:
    horizontal = abs(dx) >= abs(dy)
    room = max((width if horizontal else height) - size, 0.0)
    slowest = SPEED_FRACTION["slowly"] * room * frames
    if max(abs(dx), abs(dy)) < max(_MOVING_PIXELS, _MOVING_FRACTION_OF_SLOW * slowest):
        return None
    if horizontal:
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def analyse_clip(video_THWC) -> ClipReading:
    """Reads colour, shape, direction and background of the one object in a uint8 (or 0..255 float) clip."""
    video_THWC = np.asarray(video_THWC)
    if video_THWC.ndim != 4 or video_THWC.shape[-1] != 3 or min(video_THWC.shape[1:3]) < 3:
        raise ValueError(f"analyse_clip expects a clip [T, H, W, 3] with H, W >= 3; got {video_THWC.shape}")
    frames_THWC = video_THWC.astype(np.float32)
    num_frames, height, width, _ = frames_THWC.shape

    # Per frame, so that generated flicker in overall brightness does not read as an object.
    background_Tx3 = np.median(_border_pixels(frames_THWC), axis=1)
    background = _nearest(BACKGROUNDS, np.median(background_Tx3, axis=0))
    offset_THWC = frames_THWC - background_Tx3[:, None, None, :]
    distance_THW = np.sqrt(np.sum(offset_THWC * offset_THWC, axis=-1))

    candidates = distance_THW > _OBJECT_DISTANCE
    nothing = ClipReading(None, None, None, background, (0.0, 0.0), 0.0)
    if candidates.sum() < _MIN_OBJECT_PIXELS:
        return nothing
    # The core (the far half of candidate distances) excludes antialiased and blurred rims from the colour.
    core = candidates & (distance_THW >= np.median(distance_THW[candidates]))
    object_rgb = np.median(frames_THWC[core], axis=0)
    colour = _nearest_object_colour(object_rgb, np.median(background_Tx3, axis=0))

    contrast_Tx3 = object_rgb[None, :] - background_Tx3
    contrast_sq_T = np.maximum(np.sum(contrast_Tx3 * contrast_Tx3, axis=-1), 1.0)
    coverage_THW = np.einsum("thwc,tc->thw", offset_THWC, contrast_Tx3) / contrast_sq_T[:, None, None]
    coverage_THW = np.clip(coverage_THW, 0.0, 1.0)
    coverage_THW = np.where(coverage_THW >= _COVERAGE_FLOOR, coverage_THW, 0.0)

    frames = [_frame_moments(coverage_HW) for coverage_HW in coverage_THW]
    present_T = np.array([m is not None for m in frames])
    if not present_T.any():
        return nothing
    moments_Fx5 = np.array([m for m in frames if m is not None])
    area_F, cx_F, cy_F, skew_F, squareness_F = moments_Fx5.T
    shape = _classify_shape(float(np.median(skew_F)), float(np.median(squareness_F)))

    dx = dy = span = 0.0
    t_F = np.flatnonzero(present_T).astype(np.float64)
    if t_F.size >= 2:
        span = t_F[-1] - t_F[0]
        t_centred = t_F - t_F.mean()
        dx = float(np.dot(t_centred, cx_F - cx_F.mean()) / np.dot(t_centred, t_centred) * span)
        dy = float(np.dot(t_centred, cy_F - cy_F.mean()) / np.dot(t_centred, t_centred) * span)
    size = float(np.sqrt(np.median(area_F)))
    direction = _direction(dx, dy, span, height, width, size) if num_frames > 1 else None
    object_fraction = float(area_F.sum() / (num_frames * height * width))
    return ClipReading(colour, shape, direction, background, (dx, dy), object_fraction)


_DIRECTION_WORDS = {"left": "left", "right": "right", "up": "up", "upward": "up", "upwards": "up",
                    "down": "down", "downward": "down", "downwards": "down"}
_STILL_WORDS = ("still", "stationary", "motionless")


def parse_caption(caption: str) -> dict[str, str | None]:
    """The attributes a caption mentions, as synthetic attribute values; the inverse of the synthetic captions.

    A background colour is the word before "background"; a caption that says the object stands still
    gives direction None; attributes the caption does not mention are absent from the result.
    """
    text = caption.lower()
    found: dict[str, str | None] = {}
    background = re.search(r"\b([a-z]+) background\b", text)
    if background and background.group(1) in BACKGROUNDS:
        found["background"] = background.group(1)
        text = text[:background.start()] + text[background.end():]
    words = re.findall(r"[a-z]+", text)
    for name, vocabulary in (("colour", COLOURS), ("shape", SHAPES), ("size", SIZES), ("speed", SPEEDS)):
        hit = next((w for w in words if w in vocabulary), None)
        if hit is not None:
            found[name] = hit
    direction = next((_DIRECTION_WORDS[w] for w in words if w in _DIRECTION_WORDS), None)
    if direction is not None:
        found["direction"] = direction
    elif any(re.search(rf"\b{phrase}\b", text) for phrase in _STILL_WORDS):
        found["direction"] = None
    return found


def score(clips: Sequence[Any], captions: Sequence[str]) -> dict[str, float | int | None]:
    """How often each clip shows what its caption says; plain numbers, ready for JSON.

    Returns, for each of colour/shape/direction/background, the fraction of clips whose reading matches,
    over the clips whose caption mentions that attribute (None if no caption does); `overall`, the fraction
    of clips whose every mentioned attribute matches; and counts of axis confusions: `left_right_confusions`
    (asked left, moves right, or the reverse) and `up_down_confusions`.
    """
    if len(clips) != len(captions):
        raise ValueError(f"score got {len(clips)} clips but {len(captions)} captions")
    matches = {name: 0 for name in SCORED_ATTRIBUTES}
    mentions = {name: 0 for name in SCORED_ATTRIBUTES}
    all_right = left_right = up_down = 0
    for clip, caption in zip(clips, captions):
        wanted = parse_caption(caption)
        read = analyse_clip(clip).attributes()
        ok = True
        for name in SCORED_ATTRIBUTES:
            if name in wanted:
                mentions[name] += 1
                hit = read[name] == wanted[name]
                matches[name] += hit
                ok &= hit
        all_right += ok
        pair = {wanted.get("direction"), read["direction"]}
        left_right += pair == {"left", "right"}
        up_down += pair == {"up", "down"}
    result: dict[str, float | int | None] = {
        name: (matches[name] / mentions[name] if mentions[name] else None) for name in SCORED_ATTRIBUTES}
    result["overall"] = all_right / len(clips) if len(clips) else None
    result["left_right_confusions"] = left_right
    result["up_down_confusions"] = up_down
    result["num_clips"] = len(clips)
    return result
