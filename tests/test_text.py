"""Byte tokenizer round trips; the text encoder is exact under packing and silent on padding."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soraax.text import ByteTokenizer, TextEncoder

TOKENIZER = ByteTokenizer()
ROW = 48  # packed text row length in these tests
CAPTIONS = ("a red fox jumps", "Ünïcödé: 视频 🎬", "")


def test_round_trip_including_multibyte_utf8():
    for caption in CAPTIONS + ("tab\tand\nnewline", "ÿ\x00"):
        ids = TOKENIZER.encode(caption, max_len=64)
        assert ids.dtype == np.int32 and ids[0] == TOKENIZER.bos_id and ids[-1] == TOKENIZER.eos_id
        assert len(ids) == len(caption.encode("utf-8")) + 2
        assert np.all((ids > 0) & (ids < TOKENIZER.vocab_size))
        assert TOKENIZER.decode(ids) == caption


def test_vocab_is_bytes_plus_specials():
    assert TOKENIZER.vocab_size == 256 + 3
    assert TOKENIZER.pad_id == 0 and {TOKENIZER.bos_id, TOKENIZER.eos_id} == {1, 2}


def test_empty_caption_is_bos_eos():
    np.testing.assert_array_equal(TOKENIZER.encode("", max_len=8), [TOKENIZER.bos_id, TOKENIZER.eos_id])


def test_truncation_keeps_eos_and_whole_characters():
    ids = TOKENIZER.encode("x" * 100, max_len=10)
    assert len(ids) == 10 and ids[-1] == TOKENIZER.eos_id and TOKENIZER.decode(ids) == "x" * 8
    # "é" is two bytes: a cut through it drops it rather than leaving half a character.
    for max_len in range(2, 9):
        ids = TOKENIZER.encode("aé" * 4, max_len=max_len)
        text = TOKENIZER.decode(ids)
        assert len(ids) <= max_len and ids[-1] == TOKENIZER.eos_id
        assert ("aé" * 4).startswith(text) and "\ufffd" not in text
        assert len(text.encode("utf-8")) >= max_len - 3  # at most one byte of a split character is lost


def test_encode_rejects_non_strings_by_type():
    with pytest.raises(TypeError, match="bytes"):
        TOKENIZER.encode(b"caption", max_len=8)
    with pytest.raises(TypeError, match="NoneType"):
        TOKENIZER.encode(None, max_len=8)
    with pytest.raises(ValueError, match="max_len"):
        TOKENIZER.encode("a", max_len=1)


def test_pad_batch():
    batch = TOKENIZER.pad_batch([TOKENIZER.encode(c, 32) for c in CAPTIONS], 32)
    assert batch.shape == (3, 32) and batch.dtype == np.int32
    assert [TOKENIZER.decode(row) for row in batch] == list(CAPTIONS)
    with pytest.raises(ValueError, match="sequence 0 has 5 tokens"):
        TOKENIZER.pad_batch([np.ones(5, np.int32)], 4)


def _pack(captions, first_id=1):
    """One packed row: captions back to back with ids first_id, first_id + 1, ..., then padding."""
    tokens = [TOKENIZER.encode(c, max_len=ROW) for c in captions]
    ids = [np.full(len(t), first_id + i, np.int32) for i, t in enumerate(tokens)]
    return TOKENIZER.pad_batch([np.concatenate(tokens)], ROW), TOKENIZER.pad_batch([np.concatenate(ids)], ROW)


ENCODER = TextEncoder(width=32, depth=2, heads=4, mlp_ratio=2.0, max_len=ROW)
PARAMS = jax.jit(ENCODER.init)(jax.random.key(0), *_pack(CAPTIONS))


@functools.partial(jax.jit, static_argnames="attn_impl")
def _encode(tokens, segment_ids, attn_impl="xla"):
    return ENCODER.clone(attn_impl=attn_impl).apply(PARAMS, tokens, segment_ids)


@pytest.mark.parametrize("attn_impl", ["xla", "chunked"])
def test_packed_captions_encode_as_if_alone(attn_impl):
    tokens, segment_ids = _pack(CAPTIONS)
    packed = np.asarray(_encode(tokens, segment_ids, attn_impl))[0]
    start = 0
    for caption in CAPTIONS:
        # Alone, in the first slot of its own row and with a different segment id than in the packed row.
        alone_tokens, alone_ids = _pack([caption], first_id=7)
        n = int((alone_ids != 0).sum())
        alone = np.asarray(_encode(alone_tokens, alone_ids, attn_impl))[0]
        np.testing.assert_allclose(packed[start:start + n], alone[:n], atol=1e-5, rtol=1e-5)
        start += n
    assert np.all(packed[start:] == 0)


def test_padding_outputs_exact_zeros():
    tokens, segment_ids = _pack(CAPTIONS)
    states = np.asarray(_encode(tokens, segment_ids))[0]
    is_text = segment_ids[0] != 0
    assert np.all(states[~is_text] == 0) and np.all(np.abs(states[is_text]).sum(-1) > 0)


def test_changing_one_caption_leaves_the_others_unchanged():
    before = np.asarray(_encode(*_pack(CAPTIONS)))[0]
    edited = (CAPTIONS[0], "a blue whale sings", CAPTIONS[2])
    tokens, segment_ids = _pack(edited)
    after = np.asarray(_encode(tokens, segment_ids))[0]
    len0, len1 = (len(TOKENIZER.encode(c, ROW)) for c in CAPTIONS[:2])
    new_len1 = len(TOKENIZER.encode(edited[1], ROW))
    np.testing.assert_array_equal(after[:len0], before[:len0])
    # The third caption moved (the second one's length changed) and still reads the same.
    np.testing.assert_allclose(after[len0 + new_len1:len0 + new_len1 + 2], before[len0 + len1:len0 + len1 + 2],
                               atol=1e-5, rtol=1e-5)
    assert not np.allclose(after[len0:len0 + 3], before[len0:len0 + 3])


def test_params_carry_logical_axis_names():
    boxes = jax.tree.leaves(PARAMS, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(b, nn.LogicallyPartitioned) for b in boxes)
    names = {n for b in boxes for n in b.names}
    assert names == {"vocab", "embed", "heads", "mlp", "text_length"}  # projections fold kv into heads
    params = nn.meta.unbox(PARAMS)["params"]
    assert params["position_embed"]["embedding"].shape == (ROW, 32)
    assert params["token_embed"]["embedding"].shape == (TOKENIZER.vocab_size, 32)


def test_bfloat16_encoder_is_finite():
    tokens, segment_ids = _pack(CAPTIONS)
    states = jax.jit(ENCODER.clone(dtype=jnp.bfloat16).apply)(PARAMS, tokens, segment_ids)
    assert states.dtype == jnp.bfloat16 and bool(jnp.isfinite(states.astype(jnp.float32)).all())


def test_rows_longer_than_max_len_and_bad_impl_are_refused():
    tokens, segment_ids = _pack(CAPTIONS)
    long_tokens, long_ids = np.pad(tokens, ((0, 0), (0, 1))), np.pad(segment_ids, ((0, 0), (0, 1)))
    with pytest.raises(ValueError, match="row length 49 exceeds the byte encoder's 48 positions"):
        ENCODER.apply(PARAMS, long_tokens, long_ids)
    with pytest.raises(ValueError, match="attn_impl='flash'"):
        ENCODER.clone(attn_impl="flash").apply(PARAMS, tokens, segment_ids)
