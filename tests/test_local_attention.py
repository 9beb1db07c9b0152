"""Self-attention over only the blocks a clip reaches is the whole-row attention, with its gradients."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soraax import attention, local_attention

H, D = 2, 8


def _packed_ids(lengths, seq_len, batch=2, seed=0):
    """Rows of contiguous clips of the given lengths (shuffled per row), padding after them."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((batch, seq_len), np.int32)
    for b in range(batch):
        i = 0
        for k, n in enumerate(rng.permutation(lengths), start=1):
            if i + n > seq_len:
                break
            ids[b, i:i + n] = k
            i += n
    return jnp.asarray(ids)


def _qkv(seq_len, batch=2, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return [jax.random.normal(k, (batch, seq_len, H, D)) for k in keys]


def test_plan_reaches_every_key_of_a_clip_and_declines_short_rows():
    for max_len in (1, 2, 7, 16, 64, 128):
        blocking = local_attention.plan(100 * max_len, max_len)
        block, reach = blocking
        assert reach * block >= max_len - 1
        assert (2 * reach + 1) * block <= 3 * max_len
    assert local_attention.plan(384, 128) is None      # the window (320) would be most of the row
    assert local_attention.plan(768, 128) == (64, 2)


def test_applies_only_to_self_attention_on_the_dense_backends():
    assert local_attention.applies("xla", 768, 768, 128) == local_attention.plan(768, 128) == (64, 2)
    assert local_attention.applies("chunked", 768, 768, 128) == (64, 2)
    assert local_attention.applies("splash", 768, 768, 128) is None     # its own block-sparse mask
    assert local_attention.applies("cudnn", 768, 768, 128) is None
    assert local_attention.applies("xla", 768, 77, 128) is None         # cross-attention to text
    assert local_attention.applies("xla", 768, 768, 0) is None          # clip_tokens unset
    assert local_attention.applies("xla", 384, 384, 128) is None        # window most of the row


def test_fits_accepts_packed_rows_and_rejects_long_or_split_clips():
    assert bool(local_attention.fits(_packed_ids([5, 16, 9, 16, 3], 64), 16))
    assert not bool(local_attention.fits(_packed_ids([17, 3], 64), 16))      # a clip longer than the bound
    split = np.zeros((1, 32), np.int32)
    split[0, :4], split[0, 4:8], split[0, 8:12] = 1, 2, 1                     # clip 1 in two runs
    assert not bool(local_attention.fits(jnp.asarray(split), 16))
    gaps = np.zeros((1, 32), np.int32)
    gaps[0, 2:6], gaps[0, 10:20] = 1, 2                                       # padding between clips is fine
    assert bool(local_attention.fits(jnp.asarray(gaps), 16))


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_local_equals_whole_row_values_and_gradients(impl):
    seq_len, max_len = 96, 12
    ids = _packed_ids([12, 3, 7, 12, 1, 9, 12, 5, 11, 12], seq_len)
    q, k, v = _qkv(seq_len)
    assert local_attention.plan(seq_len, max_len) is not None and bool(local_attention.fits(ids, max_len))

    def run(local_max_len):
        return jax.jit(lambda q, k, v: attention.attention(q, k, v, ids, ids, impl=impl, block_q=32,
                                                           block_kv=32, local_max_len=local_max_len))
    np.testing.assert_allclose(run(max_len)(q, k, v), run(0)(q, k, v), atol=2e-6)
    # The local kernel alone (not the fallback) is the whole-row function.
    block, reach = local_attention.plan(seq_len, max_len)
    local = jax.jit(functools.partial(local_attention.local_attention, block=block, reach=reach))
    np.testing.assert_allclose(local(q, k, v, ids),
                               run(0)(q, k, v), atol=2e-6)
    padding = np.asarray(ids) == 0
    assert (np.asarray(run(max_len)(q, k, v))[padding] == 0).all()

    def loss(f):
        return lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
    for got, want in zip(jax.jit(jax.grad(loss(run(max_len)), (0, 1, 2)))(q, k, v),
                         jax.jit(jax.grad(loss(run(0)), (0, 1, 2)))(q, k, v)):
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_a_batch_that_does_not_fit_falls_back_to_the_whole_row():
    seq_len = 96
    ids = _packed_ids([40, 30, 20], seq_len)    # clips longer than the bound of 12
    q, k, v = _qkv(seq_len, seed=1)
    got = attention.attention(q, k, v, ids, ids, local_max_len=12)
    np.testing.assert_allclose(got, attention.attention(q, k, v, ids, ids), atol=1e-6)
    # The local kernel alone would be wrong here: the fallback is what keeps the function exact.
    block, reach = local_attention.plan(seq_len, 12)
    wrong = local_attention.local_attention(q, k, v, ids, block=block, reach=reach)
    assert float(jnp.abs(wrong - got).max()) > 1e-2


def test_dit_with_clip_tokens_is_the_same_dit():
    import flax.linen as nn
    from soraax import dit
    from helpers import perturb
    seq_len, text_len = 48, 8
    ids = _packed_ids([6, 4, 6, 2, 5], seq_len, batch=2)
    rng = np.random.default_rng(0)
    row = dict(tokens_BxSxP=jnp.asarray(rng.normal(size=(2, seq_len, 4)), jnp.float32),
               coords_BxSx3=jnp.asarray(rng.integers(0, 3, (2, seq_len, 3)), jnp.int32),
               segment_ids_BxS=ids, t_BxS=jnp.where(ids > 0, 0.1 * ids, 0.0),
               text_BxLxT=jnp.asarray(rng.normal(size=(2, text_len, 6)), jnp.float32),
               text_segment_ids_BxL=jnp.asarray(np.repeat([[1, 2, 3, 4, 5, 0, 0, 0]], 2, 0), jnp.int32))
    base = dict(patch_dim=4, width=16, depth=2, heads=2, mlp_ratio=2.0)
    whole, local = dit.DiT(**base), dit.DiT(**base, clip_tokens=6)
    params = perturb(nn.meta.unbox(jax.jit(whole.init)(jax.random.PRNGKey(0), **row))["params"], jax.random.PRNGKey(1), 0.2)
    apply_local, apply_whole = jax.jit(local.apply), jax.jit(whole.apply)
    np.testing.assert_allclose(apply_local({"params": params}, **row), apply_whole({"params": params}, **row),
                               atol=1e-5)
    # Clips longer than clip_tokens: the DiT's one fits check sends every layer down the whole-row path.
    long_ids = _packed_ids([20, 10, 12], seq_len, batch=2)
    assert not bool(local_attention.fits(long_ids, 6))
    row.update(segment_ids_BxS=long_ids, t_BxS=jnp.where(long_ids > 0, 0.1 * long_ids, 0.0))
    np.testing.assert_allclose(apply_local({"params": params}, **row), apply_whole({"params": params}, **row),
                               atol=1e-5)
