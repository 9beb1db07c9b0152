"""T5 / UMT5 encoders: equal to Hugging Face's, exact under packing, and loaded or refused with clear errors.

The reference is tests/data/t5: tiny random checkpoints that transformers saved, with its outputs (see
tests/data/make_t5_reference.py and versions.json). No torch here; one test re-derives a reference live
where torch and transformers are installed.
"""
import functools
import importlib.util
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from soraax import weights
from soraax.text.t5 import T5Encoder, load_t5_encoder, relative_position_buckets

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "t5")
NAMES = ("t5_v1_1", "t5_v1_0", "umt5")
# float32 through two layers of a 32-wide model: what separates a correct port from a summation order.
ATOL = 1e-5


@functools.lru_cache(maxsize=None)
def _loaded(name):
    text = load_t5_encoder(os.path.join(DATA, name))
    return text, weights.materialise(text.params), jax.jit(text.module.apply)


def _encode(name, tokens, segment_ids):
    _, params, apply = _loaded(name)
    return np.asarray(apply({"params": params}, jnp.asarray(tokens, jnp.int32), jnp.asarray(segment_ids, jnp.int32)))


@pytest.mark.parametrize("name", NAMES)
def test_matches_hugging_face_reference(name):
    ref = np.load(os.path.join(DATA, f"{name}.npz"))
    # HF's attention mask is 1 on real tokens: as segment ids, one caption a row, right-padded.
    states = _encode(name, ref["input_ids"], ref["attention_mask"])
    real = ref["attention_mask"].astype(bool)
    error = np.abs(states - ref["last_hidden_state"])[real].max()
    assert error < ATOL, f"{name}: max abs error {error} against transformers' last_hidden_state"
    assert np.all(states[~real] == 0)


def test_buckets_match_hugging_face():
    table = np.load(os.path.join(DATA, "buckets.npz"))
    relative = jnp.asarray(table["relative_position"])
    for key in (k for k in table.files if k.startswith("buckets_")):
        num_buckets, max_distance = map(int, key.split("_")[1:])
        np.testing.assert_array_equal(np.asarray(relative_position_buckets(relative, num_buckets, max_distance)),
                                      table[key], err_msg=key)


def _pack(captions, length):
    tokens, segment_ids = np.zeros((1, length), np.int32), np.zeros((1, length), np.int32)
    start = 0
    for segment, caption in enumerate(captions, 1):
        tokens[0, start:start + len(caption)] = caption
        segment_ids[0, start:start + len(caption)] = segment
        start += len(caption)
    return tokens, segment_ids


def _captions(seed, lengths):
    rng = np.random.default_rng(seed)
    return [np.concatenate([rng.integers(3, 64, n - 1), [1]]).astype(np.int32) for n in lengths]


@pytest.mark.parametrize("name", ["t5_v1_1", "umt5"])  # one shared bias table, and one per layer
def test_packed_captions_encode_as_if_alone(name):
    # 23 tokens: past the exact buckets (8 either side at 32 buckets), so the log-spaced ones are packed too.
    captions = _captions(0, (23, 9, 4))
    tokens, segment_ids = _pack(captions, 40)
    packed = _encode(name, tokens, segment_ids)[0]
    start = 0
    for caption in captions:
        alone = _encode(name, caption[None], np.ones((1, len(caption)), np.int32))[0]
        np.testing.assert_allclose(packed[start:start + len(caption)], alone, atol=ATOL, rtol=0)
        start += len(caption)
    assert np.all(packed[start:] == 0), "padding rows must be exactly 0"


def test_changing_one_caption_leaves_the_others_unchanged():
    captions = _captions(1, (11, 6, 8))
    tokens, segment_ids = _pack(captions, 32)
    changed = tokens.copy()
    changed[segment_ids == 2] = (changed[segment_ids == 2] + 7) % 61 + 3
    changed[segment_ids == 0] = 5  # padding's ids must not matter either
    before, after = _encode("umt5", tokens, segment_ids), _encode("umt5", changed, segment_ids)
    others = segment_ids[0] != 2
    # Other captions' keys get exactly zero weight, so their states are equal bit for bit.
    np.testing.assert_array_equal(before[0, others], after[0, others])
    assert not np.allclose(before[0, ~others], after[0, ~others])


def test_bfloat16_is_close_and_float16_is_refused():
    ref = np.load(os.path.join(DATA, "umt5.npz"))
    text = load_t5_encoder(os.path.join(DATA, "umt5"), dtype=jnp.bfloat16)
    states = np.asarray(text.module.apply({"params": weights.materialise(text.params)},
                                          jnp.asarray(ref["input_ids"]), jnp.asarray(ref["attention_mask"])))
    real = ref["attention_mask"].astype(bool)
    assert states.dtype == np.float32 and np.all(states[~real] == 0)
    # bfloat16 keeps 8 bits of mantissa: ~0.4% per op, through two layers of unit-scale states.
    assert np.abs(states - ref["last_hidden_state"])[real].max() < 0.1
    with pytest.raises(ValueError, match="float16"):
        load_t5_encoder(os.path.join(DATA, "umt5"), dtype=jnp.float16)


def test_params_carry_logical_axis_names():
    module = T5Encoder(vocab_size=64, width=32, depth=2, heads=4, head_dim=6, mlp=64, per_layer_bias=True)
    tokens = jnp.zeros((1, 8), jnp.int32)
    boxed = jax.eval_shape(module.init, jax.random.PRNGKey(0), tokens, tokens + 1)["params"]
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    for path, leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), f"{jax.tree_util.keystr(path)} has no logical axis names"
        assert len(leaf.names) == leaf.value.ndim
    names = {jax.tree_util.keystr(p): leaf.names for p, leaf in leaves}
    assert names["['block_0']['attn']['query']['kernel']"] == ("embed", "heads")
    assert names["['block_1']['mlp']['wo']['kernel']"] == ("mlp", "embed")
    assert names["['token_embed']['embedding']"] == ("vocab", "embed")


def test_tokenizer_frames_captions_with_eos():
    tokenizer = _loaded("t5_v1_1")[0].tokenizer
    assert tokenizer.encode("", 8).tolist() == [1]  # "</s>"
    assert tokenizer.empty_ids == (1,)
    ids = tokenizer.encode("A red cat runs slowly", 4)
    assert ids.tolist()[-1] == 1 and len(ids) == 4


# ------------------------------------------------------------------------------------------ loading


def _copy(tmp_path, name="umt5", dest="model"):
    folder = str(tmp_path / dest)
    shutil.copytree(os.path.join(DATA, name), folder)
    return folder


def _edit_tensors(folder, edit):
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _edit_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


def test_missing_tensor_is_named(tmp_path):
    folder = _copy(tmp_path)
    name = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"
    _edit_tensors(folder, lambda t: t.pop(name))
    with pytest.raises(weights.WeightsError, match=f"{name}.*missing"):
        load_t5_encoder(folder)


def test_misshaped_tensor_is_named_with_both_shapes(tmp_path):
    folder = _copy(tmp_path)
    name = "encoder.block.0.layer.1.DenseReluDense.wi_1.weight"
    _edit_tensors(folder, lambda t: t.update({name: t[name][:63]}))
    with pytest.raises(weights.WeightsError, match=rf"{name}.*\[63, 32\].*\[64, 32\]"):
        load_t5_encoder(folder)


def test_unknown_tensor_is_refused_but_decoder_and_lm_head_are_ignored(tmp_path):
    folder = _copy(tmp_path)
    _edit_tensors(folder, lambda t: t.update({
        "decoder.block.0.layer.0.SelfAttention.q.weight": np.zeros((32, 32), np.float32),
        "lm_head.weight": np.zeros((64, 32), np.float32)}))
    load_t5_encoder(folder)  # a full UMT5Model / T5ForConditionalGeneration folder
    _edit_tensors(folder, lambda t: t.update({"encoder.block.0.layer.0.SelfAttention.extra": np.zeros(3, np.float32)}))
    with pytest.raises(weights.WeightsError, match="SelfAttention.extra"):
        load_t5_encoder(folder)


@pytest.mark.parametrize("keep", ["encoder.embed_tokens.weight", "both"])
def test_embedding_stored_under_either_tied_name(tmp_path, keep):
    folder = _copy(tmp_path, "t5_v1_1")

    def retie(tensors):
        tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"]
        if keep != "both":
            del tensors["shared.weight"]

    _edit_tensors(folder, retie)
    text = load_t5_encoder(folder)
    np.testing.assert_array_equal(weights.materialise(text.params)["token_embed"]["embedding"],
                                  _loaded("t5_v1_1")[1]["token_embed"]["embedding"])
    _edit_tensors(folder, lambda t: [t.pop(n, None) for n in ("shared.weight", "encoder.embed_tokens.weight")])
    with pytest.raises(weights.WeightsError, match="shared.weight"):
        load_t5_encoder(folder)


def test_bad_config_values_are_named(tmp_path):
    folder = _copy(tmp_path)
    _edit_config(folder, feed_forward_proj="gated-silu")
    with pytest.raises(ValueError, match="feed_forward_proj 'gated-silu'"):
        load_t5_encoder(folder)
    _edit_config(folder, feed_forward_proj="gated-gelu", model_type="bert")
    with pytest.raises(ValueError, match="model_type 'bert'"):
        load_t5_encoder(folder)


def test_missing_folder_or_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_t5_encoder(str(tmp_path / "nowhere"))
    folder = _copy(tmp_path)
    os.remove(os.path.join(folder, "config.json"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_t5_encoder(folder)


def test_tokenizer_found_in_sibling_folder(tmp_path):
    # The diffusers layout: text_encoder/ and tokenizer/ side by side.
    folder = _copy(tmp_path, dest="text_encoder")
    os.makedirs(tmp_path / "tokenizer")
    shutil.move(os.path.join(folder, "tokenizer.json"), tmp_path / "tokenizer" / "tokenizer.json")
    text = load_t5_encoder(folder)
    assert text.tokenizer.path == str(tmp_path / "tokenizer" / "tokenizer.json")
    assert text.tokenizer.encode("", 4).tolist() == [1]


def test_sentencepiece_only_asks_for_tokenizer_json(tmp_path):
    folder = _copy(tmp_path)
    os.remove(os.path.join(folder, "tokenizer.json"))
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_t5_encoder(folder)
    open(os.path.join(folder, "spiece.model"), "wb").close()
    with pytest.raises(FileNotFoundError, match=r"spiece.model.*save_pretrained"):
        load_t5_encoder(folder)


def test_live_umt5_matches_transformers(tmp_path):
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
        pytest.skip("torch/transformers not installed: the stored reference in tests/data/t5 is checked instead")
    import torch
    from transformers import UMT5Config, UMT5EncoderModel

    spec = importlib.util.spec_from_file_location("make_t5_reference",
                                                  os.path.join(os.path.dirname(DATA), "make_t5_reference.py"))
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    # A fresh seed and shape from the stored ones: 3 layers, heads * d_kv (48) != d_model (40), HF's buckets.
    config = UMT5Config(vocab_size=64, d_model=40, d_kv=12, num_heads=4, d_ff=72, num_layers=3, dropout_rate=0.0,
                        relative_attention_num_buckets=32, relative_attention_max_distance=128,
                        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    model = UMT5EncoderModel(config).eval()
    reference.redraw(model, seed=20240607)
    folder = str(tmp_path / "umt5")
    model.save_pretrained(folder, safe_serialization=True)
    shutil.copy(os.path.join(DATA, "umt5", "tokenizer.json"), folder)
    input_ids, attention_mask = reference.inputs(seed=7)
    with torch.no_grad():
        expected = model(input_ids=torch.from_numpy(input_ids),
                         attention_mask=torch.from_numpy(attention_mask)).last_hidden_state.numpy()
    text = load_t5_encoder(folder)
    states = np.asarray(text.module.apply({"params": weights.materialise(text.params)},
                                          jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32)))
    real = attention_mask.astype(bool)
    error = np.abs(states - expected)[real].max()
    assert error < ATOL, f"max abs error {error} against transformers' UMT5EncoderModel"
