"""The shape curriculum: its steps draw only its clips, then the configured data; resume is exact across it."""
import re

import numpy as np
import pytest

from soraax import config, curriculum, packing, train
from soraax.data import pipeline
from helpers import TINY, micro_config
from test_train import _losses, vae_dir  # noqa: F401 (vae_dir: a fixture, the micro VAE the DiT trains on)

SQUARE = dict(curriculum__steps=2, curriculum__aspect_ratios=((1, 1),), curriculum__min_frames=9,
              curriculum__image_fraction=0.0, curriculum__high_noise_rate=1.0)


def test_stage_config_overrides_the_named_keys_and_gives_no_frames():
    cfg = micro_config(**SQUARE)
    stage = curriculum.stage_config(cfg)
    assert stage.data.synthetic_aspect_ratios == ((1, 1),)
    assert stage.data.synthetic_min_frames == 9 and stage.data.synthetic_image_fraction == 0.0
    assert stage.diffusion.high_noise_rate == 1.0
    assert all(stage.data[f"cond_{kind}_rate"] == 0.0 for kind in ("first_frame", "past_frames", "future_frames",
                                                                  "ends"))
    # Everything else, and the config it came from, unchanged.
    assert cfg.data.synthetic_aspect_ratios != ((1, 1),) and cfg.data.cond_first_frame_rate > 0
    assert stage.model.to_dict() == cfg.model.to_dict() and stage.total_steps == cfg.total_steps
    config.validate(stage)


def test_the_curriculum_batches_hold_only_its_clips():
    cfg = micro_config(**SQUARE)
    stage = curriculum.stage_config(cfg)
    source, _ = pipeline.clip_source(stage.data, seed=0)
    clips = [source[i] for i in range(40)]
    assert {c["aspect_ratio"] for c in clips} == {"1:1"} and {len(c["video"]) for c in clips} == {9}
    mixed, _ = pipeline.clip_source(cfg.data, seed=0)
    assert len({mixed[i]["aspect_ratio"] for i in range(40)}) > 3

    def encode(video):  # 4x4 pixel means, 4 frames a latent after the first: the VAE's shape, no weights
        t, h, w, _ = video.shape
        frames = np.concatenate([video[:1], video[1:].reshape(-1, 4, h, w, 3).mean(1)])
        return np.repeat(frames.reshape(len(frames), h // 4, 4, w // 4, 4, 3).mean((2, 4)), 3, -1)[..., :8]

    for batch in [b for _, b in zip(range(4), pipeline.dit_batches(stage, encode))]:
        assert not batch["cond_mask"].any()
        for row in range(batch["segment_ids"].shape[0]):
            for clip in packing.unpack_row({k: v[row] for k, v in batch.items()}):
                t, h, w = clip["grid"]
                assert h == w and t == 3  # square, and 9 frames: 3 latent frames, never an image


@pytest.mark.parametrize("overrides, message", [
    (dict(curriculum__steps=4), "config.curriculum.steps: 4 leaves none of total_steps=4"),
    (dict(curriculum__steps=-1), "config.curriculum.steps: must be >= 0"),
    (dict(curriculum__aspect_ratios=((1, 0),)), "config.curriculum.aspect_ratios: must be a tuple of (width, height)"),
    (dict(curriculum__high_noise_rate=2.0), "config.curriculum.high_noise_rate: must be in [0, 1]"),
    (dict(curriculum__min_frames=2), "config.curriculum.min_frames: must be >= 5"),
    (dict(data__synthetic_aspect_ratios=(3, 2)), "config.data.synthetic_aspect_ratios: must be a tuple of"),
    (dict(data__synthetic_image_fraction=-0.1), "config.data.synthetic_image_fraction: must be in [0, 1]"),
])
def test_bad_curriculum_values_name_their_key(overrides, message):
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        config.validate(micro_config(**{**SQUARE, **overrides}))


def test_a_curriculum_needs_the_synthetic_source_and_a_known_key(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("")
    with pytest.raises(config.ConfigError, match=re.escape("config.curriculum.steps: the curriculum draws its clips "
                                                           "from the synthetic source; with data.source='folder'")):
        config.validate(micro_config(**SQUARE, data__source="folder", data__manifest=str(manifest)))
    config.validate(micro_config(**SQUARE, task="vae"))  # the VAE task has no curriculum: nothing to refuse
    cfg = micro_config(**SQUARE)
    with cfg.unlocked():
        cfg.curriculum.aspect_ratio = ((1, 1),)  # a typo in a config file (the command line refuses it itself)
    with pytest.raises(config.ConfigError, match=re.escape("config.curriculum.aspect_ratio: is not a curriculum key")):
        config.validate(cfg)


def test_the_tiny_default_has_a_curriculum_within_its_steps():
    cfg = config.validate(config.load(TINY))
    assert 0 < curriculum.steps(cfg) < cfg.total_steps
    assert "1:1" in curriculum.describe(cfg)


def test_run_trains_the_curriculum_first_then_the_data_and_resumes_exactly_across_it(vae_dir, tmp_path,
                                                                                     monkeypatch, capsys):
    cfg = micro_config(**SQUARE, vae__checkpoint=vae_dir)
    stages = []
    real_train = train.train

    def spy(stage_cfg, workdir, task, **kwargs):
        stages.append((tuple(map(tuple, stage_cfg.data.synthetic_aspect_ratios)),
                       kwargs.get("stop_at"), kwargs.get("fresh_data_at")))
        return real_train(stage_cfg, workdir, task, **kwargs)

    monkeypatch.setattr(train, "train", spy)
    whole = str(tmp_path / "whole")
    records = train.run(cfg, whole)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert stages == [(((1, 1),), 2, None), (tuple(map(tuple, cfg.data.synthetic_aspect_ratios)), None, 2)]
    assert "curriculum: steps 1-2 on synthetic clips at 1:1" in capsys.readouterr().out

    # Stopped inside the curriculum (step 1), and again inside the data that follows it (step 3): a rerun
    # resumes each, the data starting at its beginning after the curriculum, as uninterrupted.
    stage = curriculum.stage_config(cfg)
    stats = train.vae_latent_stats(cfg, vae_dir)
    vae = train.load_vae_params(cfg, vae_dir)
    parts = str(tmp_path / "parts")
    real_train(stage, parts, train.dit_task(stage, vae, stats), stop_at=1)
    real_train(stage, parts, train.dit_task(stage, vae, stats), stop_at=2)
    real_train(cfg, parts, train.dit_task(cfg, vae, stats), stop_at=3, fresh_data_at=2)
    stages.clear()
    train.run(cfg, parts)
    assert stages == [(tuple(map(tuple, cfg.data.synthetic_aspect_ratios)), None, 2)]  # the curriculum is done
    np.testing.assert_allclose(_losses(parts), _losses(whole), rtol=1e-6)
