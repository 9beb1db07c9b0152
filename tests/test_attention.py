"""Segment-masked attention: every backend equals the per-segment definition, zeros where nothing is seen."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from soraax import attention as attention_lib
from soraax.attention import IMPLS
from soraax.attention import attention as eager_attention

# Jitted once per shape and backend and shared by the tests: compiling is what these tests spend time on.
attention = jax.jit(eager_attention, static_argnames=("impl", "block_q", "block_kv"))


@functools.partial(jax.jit, static_argnames=("impl", "block_q", "block_kv"))
def attention_grads(q, k, v, q_ids, kv_ids, cotangent, impl="xla", block_q=512, block_kv=512):
    """d(sum(out * cotangent)) / d(q, k, v)."""
    def loss(q, k, v):
        out = eager_attention(q, k, v, q_ids, kv_ids, impl=impl, block_q=block_q, block_kv=block_kv)
        return (out.astype(jnp.float32) * cotangent).sum()
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

H, D = 2, 8
TOL = dict(atol=1e-5, rtol=1e-5)


def _ids(*segments, length):
    """Contiguous segments given as (id, count) pairs, then padding (id 0) up to `length`."""
    ids = [sid for sid, count in segments for _ in range(count)]
    assert len(ids) <= length
    return ids + [0] * (length - len(ids))


def _qkv(seed, batch, q_len, kv_len, dtype=jnp.float32):
    kq, kk, kv, kg = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(kq, (batch, q_len, H, D), dtype), jax.random.normal(kk, (batch, kv_len, H, D), dtype),
            jax.random.normal(kv, (batch, kv_len, H, D), dtype), jax.random.normal(kg, (batch, q_len, H, D)))


def _reference(q, k, v, q_ids, kv_ids):
    """The definition, one segment at a time in float64: softmax over that segment's keys only."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    q_ids, kv_ids = np.asarray(q_ids), np.asarray(kv_ids)
    out = np.zeros(q.shape)
    for b in range(q.shape[0]):
        for sid in np.unique(q_ids[b][q_ids[b] > 0]):
            rows, cols = q_ids[b] == sid, kv_ids[b] == sid
            if not cols.any():
                continue
            logits = np.einsum("qhd,khd->hqk", q[b, rows], k[b, cols]) / math.sqrt(q.shape[-1])
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            out[b, rows] = np.einsum("hqk,khd->qhd", probs, v[b, cols])
    return out


# Cross-attention shaped (video queries, text keys), odd lengths, three segments and padding on both sides;
# row 0's segment 3 has no key at all and row 0's key segment 4 has no query; row 1 is one segment.
Q_LEN, KV_LEN = 37, 23
Q_IDS = jnp.array([_ids((1, 10), (2, 15), (3, 7), length=Q_LEN), _ids((5, 30), length=Q_LEN)], jnp.int32)
KV_IDS = jnp.array([_ids((1, 5), (2, 10), (4, 3), length=KV_LEN), _ids((5, 3), length=KV_LEN)], jnp.int32)
SEES_NOTHING = np.asarray(Q_IDS == 0) | np.asarray(Q_IDS == 3)
CHUNKED = dict(impl="chunked", block_q=8, block_kv=5)  # neither divides its length


@pytest.mark.parametrize("kwargs", [dict(impl="xla"), CHUNKED, dict(impl="chunked")], ids=["xla", "chunked-8x5",
                                                                                            "chunked-one-block"])
def test_matches_the_per_segment_definition(kwargs):
    q, k, v, _ = _qkv(0, 2, Q_LEN, KV_LEN)
    out = attention(q, k, v, Q_IDS, KV_IDS, **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(out, _reference(q, k, v, Q_IDS, KV_IDS), **TOL)


def test_self_attention_with_packing_matches_the_definition():
    ids = jnp.array([_ids((1, 9), (2, 1), (3, 14), length=29), _ids((7, 29), length=29)], jnp.int32)
    q, k, v, _ = _qkv(1, 2, 29, 29)
    want = _reference(q, k, v, ids, ids)
    for kwargs in (dict(impl="xla"), dict(impl="chunked", block_q=4, block_kv=6)):
        np.testing.assert_allclose(attention(q, k, v, ids, ids, **kwargs), want, **TOL)


def test_xla_hand_written_gradients_equal_autodiff_of_the_definition():
    # xla's backward is written by hand (attention._dense_bwd); here it meets JAX's own derivative of the
    # masked softmax written out, on rows with padding, a query segment with no key and a key nobody sees.
    from soraax.masked_softmax import masked_probs, segment_mask

    def written_out(q, k, v):
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
        probs = masked_probs(logits, segment_mask(Q_IDS, KV_IDS)[:, None])
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v)

    q, k, v, cotangent = _qkv(5, 2, Q_LEN, KV_LEN)
    want = jax.grad(lambda *x: (written_out(*x) * cotangent).sum(), argnums=(0, 1, 2))(q, k, v)
    for w, got in zip(want, attention_grads(q, k, v, Q_IDS, KV_IDS, cotangent, impl="xla")):
        np.testing.assert_allclose(got, w, **TOL)
    assert any(float(jnp.abs(w).max()) > 0.1 for w in want)


def test_chunked_gradients_equal_xla_gradients():
    q, k, v, cotangent = _qkv(2, 2, Q_LEN, KV_LEN)
    want_grads = attention_grads(q, k, v, Q_IDS, KV_IDS, cotangent, impl="xla")
    for want, got in zip(want_grads, attention_grads(q, k, v, Q_IDS, KV_IDS, cotangent, **CHUNKED)):
        np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("kwargs", [dict(impl="xla"), CHUNKED], ids=["xla", "chunked"])
def test_queries_that_see_nothing_give_zeros_and_zero_gradients(kwargs):
    q, k, v, cotangent = _qkv(3, 2, Q_LEN, KV_LEN)
    out = attention(q, k, v, Q_IDS, KV_IDS, **kwargs)
    assert np.all(np.asarray(out)[SEES_NOTHING] == 0)
    dq, dk, dv = attention_grads(q, k, v, Q_IDS, KV_IDS, cotangent, **kwargs)
    assert all(bool(jnp.isfinite(g).all()) for g in (dq, dk, dv))
    assert np.all(np.asarray(dq)[SEES_NOTHING] == 0)
    # Keys no query looks at (padding, and segment 4 of row 0) receive nothing either.
    unseen_keys = np.asarray(KV_IDS == 0) | np.asarray(KV_IDS == 4)
    assert np.all(np.asarray(dk)[unseen_keys] == 0) and np.all(np.asarray(dv)[unseen_keys] == 0)


def test_rows_of_padding_only_are_zero_with_zero_gradients():
    q, k, v, cotangent = _qkv(4, 2, Q_LEN, KV_LEN)
    zeros_q, zeros_kv = jnp.zeros_like(Q_IDS), jnp.zeros_like(KV_IDS)
    for kwargs in (dict(impl="xla"), CHUNKED):
        assert np.all(np.asarray(attention(q, k, v, zeros_q, zeros_kv, **kwargs)) == 0)
        grads = attention_grads(q, k, v, zeros_q, zeros_kv, cotangent, **kwargs)
        assert all(np.all(np.asarray(g) == 0) for g in grads)


@settings(max_examples=15, deadline=None)
@given(q_ids=st.lists(st.integers(0, 3), min_size=13, max_size=13),
       kv_ids=st.lists(st.integers(0, 3), min_size=11, max_size=11))
def test_xla_and_chunked_equal_the_definition_for_any_segment_layout(q_ids, kv_ids):
    # Sorted ids are contiguous segments, as the packer makes them; ids 0..3 drawn on both sides make
    # segments missing from one side, and padding, likely. Shapes stay fixed so nothing recompiles.
    q_ids, kv_ids = jnp.asarray(np.sort(q_ids)[None], jnp.int32), jnp.asarray(np.sort(kv_ids)[None], jnp.int32)
    q, k, v, _ = _qkv(10, 1, 13, 11)
    want = _reference(q, k, v, q_ids, kv_ids)
    np.testing.assert_allclose(attention(q, k, v, q_ids, kv_ids), want, **TOL)
    np.testing.assert_allclose(attention(q, k, v, q_ids, kv_ids, impl="chunked", block_q=4, block_kv=3),
                               want, **TOL)


@pytest.mark.parametrize("kwargs", [dict(impl="xla"), CHUNKED], ids=["xla", "chunked"])
def test_bfloat16_inputs_give_finite_bfloat16_output_close_to_float32(kwargs):
    q, k, v, _ = _qkv(5, 2, Q_LEN, KV_LEN)
    low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out = attention(*low, Q_IDS, KV_IDS, **kwargs)
    assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out.astype(jnp.float32)).all())
    want = _reference(*(x.astype(jnp.float32) for x in low), Q_IDS, KV_IDS)
    np.testing.assert_allclose(out.astype(jnp.float32), want, atol=3e-2, rtol=3e-2)
    grads = attention_grads(*low, Q_IDS, KV_IDS, jnp.ones(q.shape), **kwargs)
    assert all(g.dtype == jnp.bfloat16 and bool(jnp.isfinite(g.astype(jnp.float32)).all()) for g in grads)


def test_chunked_memory_grows_linearly_not_quadratically():
    """Compiled temp memory of forward+backward: xla holds [S, S] logits, chunked only block pairs."""

    def temp_bytes(impl, length):
        x = jax.ShapeDtypeStruct((1, length, 1, 16), jnp.float32)
        ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
        loss = lambda q, k, v, ids: attention(q, k, v, ids, ids, impl=impl, block_q=128, block_kv=128).sum()
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x, ids).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    logits_bytes = 2048 * 2048 * 4
    assert temp_bytes("xla", 2048) >= logits_bytes
    chunked_1k, chunked_2k = temp_bytes("chunked", 1024), temp_bytes("chunked", 2048)
    assert chunked_2k < logits_bytes / 8
    assert chunked_2k < 3 * chunked_1k  # 4x would be quadratic


def test_splash_kernel_matches_xla_in_pallas_interpret_mode():
    """The splash wiring (scale, layout, padding to 128-lane tiles, SegmentIds, zeroing) checked on CPU."""
    q, k, v, cotangent = _qkv(6, 2, Q_LEN, KV_LEN)

    def run(fn):
        out = jax.jit(fn)(q, k, v)
        grads = jax.jit(jax.grad(lambda q, k, v: (fn(q, k, v) * cotangent).sum(), (0, 1, 2)))(q, k, v)
        return out, grads

    splash = lambda q, k, v: attention_lib._splash_attention(q, k, v, Q_IDS, KV_IDS, 128, 128, interpret=True)
    out, grads = run(splash)
    want_out, want_grads = run(lambda q, k, v: attention(q, k, v, Q_IDS, KV_IDS))
    np.testing.assert_allclose(out, want_out, **TOL)
    assert np.all(np.asarray(out)[SEES_NOTHING] == 0)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(got, want, **TOL)


def test_has_key_finds_exactly_the_queries_with_a_key_in_their_segment():
    assert np.array_equal(attention_lib._has_key(Q_IDS, KV_IDS), ~SEES_NOTHING)


@pytest.mark.parametrize("impl,needs", [("splash", "needs a TPU backend; running on cpu"),
                                        ("cudnn", "needs an NVIDIA GPU backend with cuDNN; running on cpu")])
def test_accelerator_backends_refuse_cpu_by_name(impl, needs):
    q, k, v, _ = _qkv(7, 2, Q_LEN, KV_LEN)
    with pytest.raises(RuntimeError, match=f"{impl}.*{needs}"):
        attention(q, k, v, Q_IDS, KV_IDS, impl=impl)


def test_unknown_impl_lists_the_valid_ones():
    q, k, v, _ = _qkv(8, 2, Q_LEN, KV_LEN)
    with pytest.raises(ValueError, match="flash.*'xla', 'chunked', 'splash', 'cudnn'"):
        attention(q, k, v, Q_IDS, KV_IDS, impl="flash")
    assert IMPLS == ("xla", "chunked", "splash", "cudnn")


def test_shape_errors_name_the_wrong_array():
    q, k, v, _ = _qkv(9, 2, Q_LEN, KV_LEN)
    with pytest.raises(ValueError, match="kv_segment_ids must be"):
        attention(q, k, v, Q_IDS, Q_IDS)
    with pytest.raises(ValueError, match="k and v"):
        attention(q, k, v[:, :-1], Q_IDS, KV_IDS)
