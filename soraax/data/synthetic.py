"""Synthetic captioned clips: one moving shape on a plain background, the dataset that needs no download.

Every example is a pure function of (seed, split, index), so a Grain pipeline over `SyntheticClips` is
reproducible and resumable without storing a byte. The attributes are few and unambiguous at low resolution
so that `soraax.analyser` can read a generated clip back and score prompt following, and `HELDOUT_COMBOS`
names (shape, colour, direction) triples that the train split never shows, to measure whether a model
composes attributes it only saw apart.

Conventions that captions and the analyser rely on:
  * image coordinates: x is the column index and grows rightward, y is the row index and grows downward;
    "left" means x decreases over time, "up" means y decreases;
  * sizes are fractions of the frame's short side, so a caption means the same thing at every aspect ratio;
  * speeds are per frame: "quickly" crosses the free room along the motion axis in 16 frames (the longest
    default clip), "slowly" in 32, so the whole object stays inside the frame in every frame;
  * an image (T = 1) has no direction and no speed, and its captions say nothing about motion.

Dimension key: T frames, H height, W width, C = 3 RGB channels.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Sequence

import numpy as np

SHAPES = ("square", "circle", "triangle", "diamond")
# Chosen far apart in RGB (>= 110 between any two object colours, >= 100 from any background) so that a
# blurry generated object still lands nearest its own name.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 90, 230),
    "yellow": (240, 210, 40),
    "purple": (140, 40, 200),
    "cyan": (40, 200, 210),
}
SIZES = ("small", "large")
DIRECTIONS = ("left", "right", "up", "down")
SPEEDS = ("slowly", "quickly")
# Background names share no word with object colours ("navy", not "dark blue"), so captions parse by word.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "grey": (128, 128, 128),
    "navy": (20, 30, 90),
}
SPLITS = ("train", "heldout")

# Held out of the train split; each pair inside a triple (shape+colour, shape+direction, colour+direction)
# still occurs in train with the third attribute changed, so the held-out prompts test composition.
HELDOUT_COMBOS: tuple[tuple[str, str, str], ...] = (
    ("circle", "red", "left"),
    ("square", "blue", "right"),
    ("triangle", "green", "up"),
    ("diamond", "yellow", "down"),
    ("circle", "purple", "right"),
    ("square", "cyan", "left"),
    ("triangle", "red", "down"),
    ("diamond", "blue", "up"),
)

# (width, height): landscape, square and portrait.
ASPECT_RATIOS: tuple[tuple[int, int], ...] = (
    (1, 1), (3, 2), (2, 3), (4, 3), (3, 4), (16, 9), (9, 16), (21, 9),
)
NATIVE_SIZES = (64, 96, 128)  # long side in pixels; the pipeline resizes to its token budget afterwards
DURATIONS = tuple(range(1, 18))  # frame counts; 1 is an image
IMAGE_FRACTION = 0.15

SIZE_FRACTION = {"small": 0.3, "large": 0.5}
SPEED_FRACTION = {"slowly": 1 / 32, "quickly": 1 / 16}
_MARGIN = 1.5  # px between the object's edge and the frame border, so antialiasing never touches the border
_MAX_SHADING = 24.0  # top-to-bottom background brightness change, in 8-bit levels


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """What one clip shows. `direction` and `speed` are None for a still image.

    `placement` (x, y) in [0, 1]^2 puts the box swept by the object over the clip inside the frame (0 = at the
    left/top margin, 1 = at the right/bottom one); `shading` is the background's top-to-bottom brightness
    change in 8-bit levels. Neither is captioned: they are the nuisance variation a model must ignore.
    """

    shape: str
    colour: str
    size: str
    direction: str | None
    speed: str | None
    background: str
    placement: tuple[float, float] = (0.5, 0.5)
    shading: float = 0.0

    def __post_init__(self):
        for field, value, allowed in (("shape", self.shape, SHAPES), ("colour", self.colour, tuple(COLOURS)),
                                      ("size", self.size, SIZES),
                                      ("background", self.background, tuple(BACKGROUNDS))):
            if value not in allowed:
                raise ValueError(f"ClipSpec.{field}={value!r}; expected one of {allowed}")
        if self.direction is None and self.speed is None:
            pass
        elif self.direction not in DIRECTIONS or self.speed not in SPEEDS:
            raise ValueError(f"ClipSpec direction={self.direction!r}, speed={self.speed!r}: a moving clip needs "
                             f"a direction in {DIRECTIONS} and a speed in {SPEEDS}; a still one needs both None")
        if not all(0.0 <= p <= 1.0 for p in self.placement) or len(self.placement) != 2:
            raise ValueError(f"ClipSpec.placement={self.placement}; expected (x, y) in [0, 1]^2")

    @property
    def moving(self) -> bool:
        return self.direction is not None

    def attributes(self) -> dict[str, str]:
        """The captioned attributes as plain strings ('' for the direction and speed of an image)."""
        return {"shape": self.shape, "colour": self.colour, "size": self.size,
                "direction": self.direction or "", "speed": self.speed or "", "background": self.background}


def caption_short(spec: ClipSpec) -> str:
    """'a red square moving left on a black background'; an image: 'a red square on a black background'.

    The background is named because the same object is brighter than a black background and darker than a
    white one: with the background unknown, the mean latent of "moving left" is nearly that of "moving
    right" (tiny VAE, 2000 clips: 0.003 per latent element between opposite directions, 0.036 between two
    colours), and a DiT given every other word exactly did not learn direction at high noise until it was
    also given the background (docs/train.md, "Why the direction word is not learned").
    """
    motion = f" moving {spec.direction}" if spec.moving else ""
    return f"a {spec.colour} {spec.shape}{motion} on a {spec.background} background"


_DIRECTION_PHRASES = {"left": "to the left", "right": "to the right", "up": "upward", "down": "downward"}


def caption_detailed(spec: ClipSpec) -> str:
    """Every captioned attribute in a full sentence, as a prompt expander would write it."""
    subject = f"A {spec.size} {spec.colour} {spec.shape}"
    if spec.moving:
        action = f"moves {spec.speed} {_DIRECTION_PHRASES[spec.direction]} across"
    else:
        action = "stands still on"
    return (f"{subject} {action} a plain {spec.background} background. "
            "The camera is static and nothing else is in view.")


def sample_spec(rng: np.random.Generator, split: str = "train", moving: bool = True) -> ClipSpec:
    """A random spec of `split`: 'train' never yields a `HELDOUT_COMBOS` triple, 'heldout' yields only those."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; expected one of {SPLITS}")
    if split == "heldout":
        if not moving:
            raise ValueError("the heldout split is (shape, colour, direction) triples: it has no still images")
        shape, colour, direction = HELDOUT_COMBOS[rng.integers(len(HELDOUT_COMBOS))]
    else:
        while True:
            shape = SHAPES[rng.integers(len(SHAPES))]
            colour = tuple(COLOURS)[rng.integers(len(COLOURS))]
            direction = DIRECTIONS[rng.integers(len(DIRECTIONS))] if moving else None
            if (shape, colour, direction) not in HELDOUT_COMBOS:
                break
    size = SIZES[rng.integers(len(SIZES))]
    speed = SPEEDS[rng.integers(len(SPEEDS))] if moving else None
    background = tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    placement = (float(rng.random()), float(rng.random()))
    shading = float(rng.uniform(-_MAX_SHADING, _MAX_SHADING)) if rng.random() < 0.5 else 0.0
    return ClipSpec(shape, colour, size, direction, speed, background, placement, shading)


def heldout_prompts() -> list[tuple[str, ClipSpec]]:
    """One (short caption, spec) per held-out triple, for evaluation.

    Size, speed and background cycle deterministically over the triples so that the specs cover them all;
    the short caption names colour, shape, direction and background.
    """
    prompts = []
    for i, (shape, colour, direction) in enumerate(HELDOUT_COMBOS):
        spec = ClipSpec(shape, colour, SIZES[i % len(SIZES)], direction, SPEEDS[(i // 2) % len(SPEEDS)],
                        tuple(BACKGROUNDS)[i % len(BACKGROUNDS)])
        prompts.append((caption_short(spec), spec))
    return prompts


def frame_size(aspect_ratio: tuple[int, int], long_side: int) -> tuple[int, int]:
    """(height, width) of a frame with `aspect_ratio` = (width, height) and the given long side."""
    aw, ah = aspect_ratio
    if aw >= ah:
        return max(1, round(long_side * ah / aw)), long_side
    return long_side, max(1, round(long_side * aw / ah))


def object_extent(spec: ClipSpec, height: int, width: int) -> float:
    """Side of the object's bounding box in pixels (every shape is as wide as it is tall)."""
    return SIZE_FRACTION[spec.size] * min(height, width)


def object_centres(spec: ClipSpec, num_frames: int, height: int, width: int) -> np.ndarray:
    """float [T, 2] (x, y) centre of the object's bounding box in each frame, in pixel units.

    The step along the motion axis is a fixed fraction of the free room on that axis, shortened only when a
    clip is longer than 17 frames, so that the object is whole in every frame.
    """
    extent = object_extent(spec, height, width)
    lo = _MARGIN + extent / 2
    room = np.array([width, height], np.float64) - extent - 2 * _MARGIN  # free travel of the centre, (x, y)
    if np.any(room < 0):
        raise ValueError(f"a {height}x{width} frame is too small for a {spec.size} object of {extent:.1f} px")
    t = np.arange(num_frames, dtype=np.float64)
    centres = np.empty((num_frames, 2))
    if spec.moving and num_frames > 1:
        axis = 0 if spec.direction in ("left", "right") else 1
        step = min(room[axis] * SPEED_FRACTION[spec.speed], room[axis] / (num_frames - 1))
        travel = step * (num_frames - 1)
        start = lo + spec.placement[axis] * (room[axis] - travel)
        forward = spec.direction in ("right", "down")
        centres[:, axis] = start + step * t if forward else start + travel - step * t
        across = 1 - axis
        centres[:, across] = lo + spec.placement[across] * room[across]
    else:
        centres[:] = lo + np.asarray(spec.placement) * room
    return centres


def _signed_distance(shape: str, dx, dy, extent: float):
    """Approximate signed distance (px, negative inside) to the outline of a shape centred at the origin.

    Polygons are intersections of half-planes, and the bounding box is one of them: without it the
    distance near an acute vertex is too small and its antialiased halo would reach past the box.
    """
    half = extent / 2
    box = np.maximum(np.abs(dx), np.abs(dy)) - half
    if shape == "square":
        return box
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - half
    if shape == "diamond":
        return np.maximum(box, (np.abs(dx) + np.abs(dy) - half) / math.sqrt(2.0))
    if shape == "triangle":
        # Apex up, base at the bottom, as wide as tall; the two slanted edges have normals (+-2, -1)/sqrt(5).
        return np.maximum(box, (2 * np.abs(dx) - dy - half) / math.sqrt(5.0))
    raise ValueError(f"shape={shape!r}; expected one of {SHAPES}")


def render_background(spec: ClipSpec, height: int, width: int) -> np.ndarray:
    """float32 [H, W, C] background of a spec: its colour, plus the vertical shading."""
    colour = np.asarray(BACKGROUNDS[spec.background], np.float32)
    y = (np.arange(height, dtype=np.float32) + 0.5) / height - 0.5
    column = colour[None, :] + np.float32(spec.shading) * y[:, None]
    return np.broadcast_to(np.clip(column, 0, 255)[:, None, :], (height, width, 3))


def render_clip(spec: ClipSpec, num_frames: int, height: int, width: int) -> np.ndarray:
    """uint8 [T, H, W, C] clip of `spec`, antialiased (coverage from the signed distance at pixel centres).

    Only a window around the object is shaded in each frame, which keeps a clip near a millisecond.
    """
    if num_frames < 1 or height < 8 or width < 8:
        raise ValueError(f"render_clip needs num_frames >= 1 and a frame of at least 8x8; "
                         f"got num_frames={num_frames}, height={height}, width={width}")
    background_HWC = render_background(spec, height, width)
    video_THWC = np.empty((num_frames, height, width, 3), np.uint8)
    video_THWC[:] = np.rint(background_HWC).astype(np.uint8)

    extent = object_extent(spec, height, width)
    centres_Tx2 = object_centres(spec, num_frames, height, width)
    win_w = min(width, math.ceil(extent) + 3)
    win_h = min(height, math.ceil(extent) + 3)
    x0_T = np.clip(np.floor(centres_Tx2[:, 0] - extent / 2 - 1).astype(np.int64), 0, width - win_w)
    y0_T = np.clip(np.floor(centres_Tx2[:, 1] - extent / 2 - 1).astype(np.int64), 0, height - win_h)
    cols_TxW = x0_T[:, None] + np.arange(win_w)[None, :]
    rows_TxH = y0_T[:, None] + np.arange(win_h)[None, :]
    dx = (cols_TxW + 0.5 - centres_Tx2[:, 0:1])[:, None, :]
    dy = (rows_TxH + 0.5 - centres_Tx2[:, 1:2])[:, :, None]
    coverage_THW = np.clip(0.5 - _signed_distance(spec.shape, dx, dy, extent), 0.0, 1.0).astype(np.float32)

    rows, cols = rows_TxH[:, :, None], cols_TxW[:, None, :]
    under_THWC = background_HWC[rows, cols]
    colour = np.asarray(COLOURS[spec.colour], np.float32)
    blended = under_THWC + coverage_THW[..., None] * (colour - under_THWC)
    frames = np.arange(num_frames)[:, None, None]
    video_THWC[frames, rows, cols] = np.rint(blended).astype(np.uint8)
    return video_THWC


def _check_choices(name: str, values: Sequence[Any], allowed=None) -> tuple:
    values = tuple(values)
    if not values or (allowed is not None and any(v not in allowed for v in values)):
        raise ValueError(f"SyntheticClips {name}={values}: expected a non-empty subset of {allowed}")
    return values


class SyntheticClips:
    """Grain `RandomAccessDataSource` of captioned synthetic clips at native aspect ratio and duration.

    `self[i]` is a pure function of (seed, split, i):
      {video uint8 [T, H, W, C], caption (short), caption_detailed, shape, colour, size,
       direction ('' for an image), speed ('' for an image), background, aspect_ratio ('W:H')}.
    T is 1 with probability `image_fraction` (if 1 is among `durations`), otherwise uniform over the other
    durations; the heldout split has no images. Aspect ratios (width, height) and long sides are uniform.
    """

    def __init__(self, num_examples: int = 100_000, seed: int = 0, split: str = "train",
                 aspect_ratios: Sequence[tuple[int, int]] = ASPECT_RATIOS,
                 durations: Sequence[int] = DURATIONS, native_sizes: Sequence[int] = NATIVE_SIZES,
                 image_fraction: float = IMAGE_FRACTION):
        if split not in SPLITS:
            raise ValueError(f"SyntheticClips split={split!r}; expected one of {SPLITS}")
        if num_examples < 0:
            raise ValueError(f"SyntheticClips num_examples={num_examples}; expected >= 0")
        self.num_examples = int(num_examples)
        self.seed = int(seed)
        self.split = split
        self.aspect_ratios = tuple((int(w), int(h)) for w, h in _check_choices("aspect_ratios", aspect_ratios))
        self.durations = tuple(int(t) for t in _check_choices("durations", durations))
        self.native_sizes = tuple(int(s) for s in _check_choices("native_sizes", native_sizes))
        if any(t < 1 for t in self.durations) or any(s < 16 for s in self.native_sizes):
            raise ValueError(f"SyntheticClips durations={self.durations} must be >= 1 and "
                             f"native_sizes={self.native_sizes} >= 16")
        self.image_fraction = float(image_fraction)
        self._video_durations = tuple(t for t in self.durations if t > 1)
        if split == "heldout" and not self._video_durations:
            raise ValueError("the heldout split has only moving clips: durations must include one above 1")

    def __len__(self) -> int:
        return self.num_examples

    def __repr__(self) -> str:
        return (f"SyntheticClips(num_examples={self.num_examples}, seed={self.seed}, split={self.split!r}, "
                f"aspect_ratios={self.aspect_ratios}, durations={self.durations}, "
                f"native_sizes={self.native_sizes}, image_fraction={self.image_fraction})")

    def _num_frames(self, rng: np.random.Generator) -> int:
        can_be_image = 1 in self.durations and self.split == "train"
        if can_be_image and (not self._video_durations or rng.random() < self.image_fraction):
            return 1
        return self._video_durations[rng.integers(len(self._video_durations))]

    def __getitem__(self, index) -> dict[str, Any]:
        index = operator.index(index)
        if not 0 <= index < self.num_examples:
            raise IndexError(f"SyntheticClips index {index} out of range [0, {self.num_examples})")
        rng = np.random.default_rng((self.seed, SPLITS.index(self.split), index))
        num_frames = self._num_frames(rng)
        spec = sample_spec(rng, self.split, moving=num_frames > 1)
        aspect = self.aspect_ratios[rng.integers(len(self.aspect_ratios))]
        height, width = frame_size(aspect, self.native_sizes[rng.integers(len(self.native_sizes))])
        return {
            "video": render_clip(spec, num_frames, height, width),
            "caption": caption_short(spec),
            "caption_detailed": caption_detailed(spec),
            **spec.attributes(),
            "aspect_ratio": f"{aspect[0]}:{aspect[1]}",
        }
