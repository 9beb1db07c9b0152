"""A shape curriculum: the DiT's first `curriculum.steps` steps train on one frame shape, at high noise.

Why: the tiny default learns a caption's colour in a few hundred steps but its motion direction not at all
in 1800 steps of the native-aspect mix (docs/train.md). "Moving left" is a layout decided at high noise, and
every aspect ratio is its own token grid with its own object-to-frame proportions: the same high-noise
examples spread over a dozen grids leave each too few for the word to be read. Spent first on one grid and
all at high noise, they are enough, and what is learned there carries over to every shape once the mix
follows (1:1, 3:2 and 2:3 prompts all follow direction; docs/train.md).

The curriculum is the first part of one run: the same optimizer, schedule and EMA, its own pipeline of the
synthetic source. `stage_config` is the config those steps run under.
"""
from __future__ import annotations

import ml_collections

from soraax.data import conditioning, synthetic

# The curriculum's own keys, each overriding one key of the config for its steps.
OVERRIDES = {
    "aspect_ratios": "data.synthetic_aspect_ratios",
    "min_frames": "data.synthetic_min_frames",
    "image_fraction": "data.synthetic_image_fraction",
    "high_noise_rate": "diffusion.high_noise_rate",
}


def steps(cfg) -> int:
    """How many of the run's first steps the curriculum takes: 0 without a curriculum group, and for every
    task but the text-to-video DiT (a VAE or SR stage has none)."""
    group = cfg.get("curriculum")
    if group is None or cfg.get("task", "dit") != "dit":
        return 0
    return int(group.get("steps", 0))


def stage_config(cfg) -> ml_collections.ConfigDict:
    """The config the curriculum's steps train under: `cfg` with each curriculum key in place of the key it
    overrides, and no frames given (every clip is text->video: held frames would leave a one-shape,
    all-high-noise clip partly clean, which is not what these steps are for)."""
    out = cfg.copy_and_resolve_references()
    with out.unlocked():
        for key, target in OVERRIDES.items():
            if key in cfg.curriculum:
                section, leaf = target.split(".")
                out[section][leaf] = cfg.curriculum[key]
        for kind in conditioning.KINDS:
            out.data[f"cond_{kind}_rate"] = 0.0
    return out


def describe(cfg) -> str:
    """One line for the log: what the curriculum's clips are."""
    stage = stage_config(cfg)
    d, diffusion = stage.data, stage.diffusion
    shapes = ", ".join(f"{w}:{h}" for w, h in d.get("synthetic_aspect_ratios", synthetic.ASPECT_RATIOS))
    return (f"synthetic clips at {shapes}, videos of >= {d.get('synthetic_min_frames', 5)} frames (data.max_frames "
            f"at most), {d.get('synthetic_image_fraction', synthetic.IMAGE_FRACTION):.0%} images, no frames given, "
            f"{diffusion.get('high_noise_rate', 0.0):.0%} at high noise")
