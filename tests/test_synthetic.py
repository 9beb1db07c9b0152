"""The synthetic dataset: reproducible, varied in shape and duration, captions that tell the truth."""

import dataclasses
import itertools
import pickle
import time

import grain
import numpy as np
import pytest

from soraax.data import synthetic
from soraax.data.synthetic import (ASPECT_RATIOS, BACKGROUNDS, COLOURS, DIRECTIONS, HELDOUT_COMBOS, SHAPES,
                                   SIZES, SPEEDS, ClipSpec, SyntheticClips, caption_detailed, caption_short,
                                   frame_size, heldout_prompts, render_clip, sample_spec)

NUM_ITEMS = 400


@pytest.fixture(scope="module")
def train_items():
    dataset = SyntheticClips(num_examples=10_000, seed=7, split="train")
    return [dataset[i] for i in range(NUM_ITEMS)]


def _triple(item):
    return item["shape"], item["colour"], item["direction"]


def _coverage(video_THWC, spec):
    """float [T, H, W] object coverage, read back from pixels of a spec with a plain (unshaded) background."""
    background = np.asarray(BACKGROUNDS[spec.background], np.float64)
    contrast = np.asarray(COLOURS[spec.colour], np.float64) - background
    return (video_THWC - background) @ contrast / (contrast @ contrast)


def _centroids(video_THWC, spec):
    coverage_THW = _coverage(video_THWC, spec)
    area_T = coverage_THW.sum(axis=(1, 2))
    height, width = coverage_THW.shape[1:]
    cx_T = coverage_THW.sum(axis=1) @ (np.arange(width) + 0.5) / area_T
    cy_T = coverage_THW.sum(axis=2) @ (np.arange(height) + 0.5) / area_T
    return cx_T, cy_T


def test_same_index_same_bytes_other_index_other_clip():
    a = SyntheticClips(num_examples=100, seed=3)
    b = SyntheticClips(num_examples=100, seed=3)
    for i in (0, 1, 57, 99):
        x, y = a[i], b[i]
        assert x.keys() == y.keys()
        assert x["video"].tobytes() == y["video"].tobytes()
        assert all(x[k] == y[k] for k in x if k != "video")
    differing = [a[i]["video"].tobytes() != a[i + 1]["video"].tobytes() for i in range(20)]
    assert all(differing)
    other_seed = SyntheticClips(num_examples=100, seed=4)
    assert sum(a[i]["caption_detailed"] != other_seed[i]["caption_detailed"] for i in range(20)) > 10


def test_item_fields_are_plain(train_items):
    item = train_items[0]
    assert item["video"].dtype == np.uint8 and item["video"].ndim == 4 and item["video"].shape[-1] == 3
    for key in ("caption", "caption_detailed", "shape", "colour", "size", "direction", "speed", "background",
                "aspect_ratio"):
        assert type(item[key]) is str, key


def test_every_aspect_ratio_and_duration_occurs(train_items):
    aspects = {item["aspect_ratio"] for item in train_items}
    assert aspects == {f"{w}:{h}" for w, h in ASPECT_RATIOS}
    assert {item["video"].shape[0] for item in train_items} == set(range(1, 18))
    for item in train_items:
        w, h = (int(n) for n in item["aspect_ratio"].split(":"))
        _, height, width, _ = item["video"].shape
        assert max(height, width) in synthetic.NATIVE_SIZES
        # Integer frame sizes round the aspect ratio by at most half a pixel on the short side.
        assert abs(width / height - w / h) <= (w / h) * 0.5 / min(height, width) + 1e-9
    images = [item for item in train_items if item["video"].shape[0] == 1]
    assert 0.05 < len(images) / len(train_items) < 0.3
    assert all(item["direction"] == "" and item["speed"] == "" for item in images)
    assert all(item["direction"] in DIRECTIONS for item in train_items if item["video"].shape[0] > 1)


def test_frame_size_orientation():
    assert frame_size((16, 9), 128) == (72, 128)
    assert frame_size((9, 16), 128) == (128, 72)
    assert frame_size((21, 9), 64) == (27, 64)
    assert frame_size((1, 1), 96) == (96, 96)


def test_heldout_combos_only_in_heldout_split(train_items):
    assert not {_triple(item) for item in train_items} & set(HELDOUT_COMBOS)
    rng = np.random.default_rng(0)
    specs = [sample_spec(rng, "train") for _ in range(3000)]
    triples = {(s.shape, s.colour, s.direction) for s in specs}
    assert not triples & set(HELDOUT_COMBOS)
    # Everything else does occur, so the held-out set is exactly what train lacks.
    every = set(itertools.product(SHAPES, COLOURS, DIRECTIONS))
    assert triples == every - set(HELDOUT_COMBOS)

    heldout = SyntheticClips(num_examples=200, seed=7, split="heldout")
    heldout_items = [heldout[i] for i in range(100)]
    assert {_triple(item) for item in heldout_items} == set(HELDOUT_COMBOS)
    assert all(item["video"].shape[0] > 1 for item in heldout_items)

    prompts = heldout_prompts()
    assert [(s.shape, s.colour, s.direction) for _, s in prompts] == list(HELDOUT_COMBOS)
    assert all(caption == caption_short(spec) for caption, spec in prompts)
    assert {s.background for _, s in prompts} == set(BACKGROUNDS)
    assert {s.size for _, s in prompts} == set(SIZES) and {s.speed for _, s in prompts} == set(SPEEDS)


def test_captions_name_exactly_the_spec(train_items):
    vocabulary = {*SHAPES, *COLOURS, *SIZES, *SPEEDS, *BACKGROUNDS}
    for item in train_items:
        moving = item["video"].shape[0] > 1
        expected = (f"a {item['colour']} {item['shape']}" + (f" moving {item['direction']}" if moving else "")
                    + f" on a {item['background']} background")
        assert item["caption"] == expected
        words = set(item["caption_detailed"].lower().replace(".", "").split())
        named = {item[k] for k in ("shape", "colour", "size", "speed", "background") if item[k]}
        assert words & vocabulary == named, item["caption_detailed"]
        direction_words = {"left", "right", "upward", "downward"}
        phrase = {"left": "left", "right": "right", "up": "upward", "down": "downward"}
        assert words & direction_words == ({phrase[item["direction"]]} if moving else set())
        assert ("still" in words) == (not moving)


def test_caption_examples():
    spec = ClipSpec("square", "red", "small", "left", "slowly", "black")
    assert caption_short(spec) == "a red square moving left on a black background"
    assert caption_detailed(spec).startswith("A small red square moves slowly to the left across a plain "
                                             "black background.")
    image = dataclasses.replace(spec, direction=None, speed=None)
    assert caption_short(image) == "a red square on a black background"
    assert "still" in caption_detailed(image) and "slowly" not in caption_detailed(image)


@pytest.mark.parametrize("aspect", [(21, 9), (9, 16), (1, 1)])
def test_direction_names_image_axes(aspect):
    """'left' decreases x (the column index) and 'up' decreases y (the row index), and nothing else moves."""
    height, width = frame_size(aspect, 96)
    for direction in DIRECTIONS:
        spec = ClipSpec("circle", "green", "small", direction, "quickly", "grey", placement=(0.3, 0.7))
        cx_T, cy_T = _centroids(render_clip(spec, 9, height, width), spec)
        dx, dy = np.diff(cx_T), np.diff(cy_T)
        along, across = (dx, dy) if direction in ("left", "right") else (dy, dx)
        sign = -1 if direction in ("left", "up") else 1
        assert np.all(sign * along > 0.5), (direction, along)
        # Antialiasing and 8-bit rounding wobble a small object's centroid by a few hundredths of a pixel.
        np.testing.assert_allclose(across, 0.0, atol=0.05)
        np.testing.assert_allclose(along, along.mean(), rtol=0.03)


def test_quickly_is_twice_slowly():
    for direction in DIRECTIONS:
        steps = {}
        for speed in SPEEDS:
            spec = ClipSpec("square", "blue", "large", direction, speed, "white")
            cx_T, cy_T = _centroids(render_clip(spec, 5, 54, 128), spec)
            steps[speed] = np.hypot(np.diff(cx_T), np.diff(cy_T)).mean()
        np.testing.assert_allclose(steps["quickly"], 2 * steps["slowly"], rtol=0.02)


def test_object_whole_in_every_frame():
    """All of the object is inside the frame: the border stays background and its area never shrinks."""
    rng = np.random.default_rng(1)
    for aspect in ASPECT_RATIOS:
        for _ in range(6):
            spec = dataclasses.replace(sample_spec(rng, "train"), shading=0.0, size="large", speed="quickly",
                                       placement=tuple(rng.choice([0.0, 1.0], size=2)))
            height, width = frame_size(aspect, int(rng.choice(synthetic.NATIVE_SIZES)))
            video = render_clip(spec, 17, height, width)
            background = np.asarray(BACKGROUNDS[spec.background], np.uint8)
            border = np.concatenate([video[:, 0], video[:, -1], video[:, :, 0], video[:, :, -1]], axis=1)
            assert np.all(border == background), (spec, aspect)
            area_T = _coverage(video.astype(np.float64), spec).sum(axis=(1, 2))
            np.testing.assert_allclose(area_T, area_T[0], rtol=0.01)


def test_shading_is_the_only_background_variation():
    spec = ClipSpec("diamond", "yellow", "small", None, None, "grey", shading=20.0)
    video = render_clip(spec, 1, 64, 64).astype(np.float64)
    assert video[0, -1, 0, 0] - video[0, 0, 0, 0] == pytest.approx(20.0 * 63 / 64, abs=1.0)
    np.testing.assert_array_equal(video[0, :, 0], video[0, :, -1])


def test_picklable_and_a_grain_source():
    dataset = SyntheticClips(num_examples=30, seed=11, split="heldout", durations=(5, 9),
                             aspect_ratios=((16, 9), (9, 16)), native_sizes=(64,))
    restored = pickle.loads(pickle.dumps(dataset))
    assert restored[4]["video"].tobytes() == dataset[4]["video"].tobytes()
    source = grain.MapDataset.source(dataset)
    assert len(source) == 30 and source[12]["caption"] == dataset[12]["caption"]
    assert {dataset[i]["video"].shape[0] for i in range(30)} <= {5, 9}


def test_rejects_what_it_cannot_make():
    dataset = SyntheticClips(num_examples=5)
    with pytest.raises(IndexError):
        dataset[5]
    with pytest.raises(ValueError, match="speed"):
        ClipSpec("square", "red", "small", "left", None, "black")
    with pytest.raises(ValueError, match="colour"):
        ClipSpec("square", "magenta", "small", None, None, "black")
    with pytest.raises(ValueError, match="split"):
        SyntheticClips(split="test")
    with pytest.raises(ValueError, match="heldout"):
        SyntheticClips(split="heldout", durations=(1,))


def test_fast():
    dataset = SyntheticClips(num_examples=1000, seed=5)
    start = time.perf_counter()
    for i in range(200):
        dataset[i]
    assert time.perf_counter() - start < 2.0
