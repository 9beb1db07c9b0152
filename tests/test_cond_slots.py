"""adaLN per (clip, t) slot is the per-token DiT: same velocities and gradients, NaN (never wrong) on overflow."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soraax import cond_slots, dit
from helpers import perturb

P, TEXT_DIM, S, L, MAX_SEGMENTS = 8, 12, 40, 16, 4


def _rows(key, batch=3):
    """Packed rows of up to 4 clips, each at its own t with some held tokens (t = 0), padding at random t."""
    rng = np.random.default_rng(0)
    seg = np.zeros((batch, S), np.int32)
    t = rng.uniform(0, 1, (batch, S)).astype(np.float32)   # padding's t is arbitrary: it must not matter
    tseg = np.zeros((batch, L), np.int32)
    for b in range(batch):
        i = j = 0
        for k in range(1, 1 + rng.integers(1, MAX_SEGMENTS + 1)):
            n, m = int(rng.integers(3, 10)), int(rng.integers(1, 4))
            seg[b, i:i + n], tseg[b, j:j + m] = k, k
            t[b, i:i + n] = rng.uniform(0.05, 1.0)
            t[b, i:i + int(rng.integers(0, 3))] = 0.0       # held frames come first in a clip
            i, j = i + n, j + m
    k1, k2, k3 = jax.random.split(key, 3)
    coords = jnp.asarray(rng.integers(0, 4, (batch, S, 3)), jnp.int32)
    return dict(tokens_BxSxP=jax.random.normal(k1, (batch, S, P)), coords_BxSx3=coords,
                segment_ids_BxS=jnp.asarray(seg), t_BxS=jnp.asarray(t),
                text_BxLxT=jax.random.normal(k2, (batch, L, TEXT_DIM)), text_segment_ids_BxL=jnp.asarray(tseg))


def test_slots_group_tokens_by_segment_and_t_exactly():
    row = _rows(jax.random.PRNGKey(0), batch=4)
    seg, t = np.asarray(row["segment_ids_BxS"]), np.asarray(row["t_BxS"])
    slot, first, fits = map(np.asarray, cond_slots.conditioning_slots(row["segment_ids_BxS"], row["t_BxS"],
                                                                      cond_slots.slots_for(MAX_SEGMENTS)))
    assert fits.all()
    for b in range(seg.shape[0]):
        key = [(s, t[b, i] if s else 0.0) for i, s in enumerate(seg[b])]
        for i in range(S):
            for j in range(S):
                assert (slot[b, i] == slot[b, j]) == (key[i] == key[j])
            assert key[first[b, slot[b, i]]] == key[i]   # each slot's representative carries its key


def _pair(**kw):
    fields = dict(patch_dim=P, width=32, depth=2, heads=2, mlp_ratio=2.0, pooled_text=True, **kw)
    return dit.DiT(**fields), dit.DiT(**fields, cond_slots=cond_slots.slots_for(MAX_SEGMENTS))


def _f64(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float64) if x.dtype == jnp.float32 else x, tree)


@pytest.mark.parametrize("kw", [dict(), dict(modulation="shared", qk_norm=True), dict(lowres_dim=4)],
                         ids=["per_block", "shared", "super_resolution"])
def test_slot_dit_equals_per_token_dit_with_its_gradients(kw):
    row = _rows(jax.random.PRNGKey(1))
    if kw.get("lowres_dim"):
        seg = row["segment_ids_BxS"]
        row = dict(row, lowres_BxSxQ=jax.random.normal(jax.random.PRNGKey(2), (*seg.shape, 4)),
                   aug_BxS=jnp.where(seg > 0, 0.1 * seg, 0.7))   # per clip, arbitrary on padding
    per_token, slotted = _pair(**kw)
    params = perturb(nn.meta.unbox(jax.jit(per_token.init)(jax.random.PRNGKey(3), **row))["params"],
                     jax.random.PRNGKey(4), 0.2)
    assert jax.tree.structure(params) == jax.tree.structure(
        nn.meta.unbox(jax.eval_shape(slotted.init, jax.random.PRNGKey(3), **row))["params"])
    out = jax.jit(per_token.apply)({"params": params}, **row)
    scale = float(jnp.abs(out).max())
    np.testing.assert_allclose(jax.jit(slotted.apply)({"params": params}, **row), out,
                               rtol=1e-5, atol=1e-5 * scale)
    assert float(jnp.abs(out).mean()) > 1e-2   # the comparison saw a live model

    # In float64 the two are the same function to rounding: per slot is a regrouping of the same sums
    # (in float32 the gradients differ by ~1e-5 of their scale from the summation order alone).
    with jax.enable_x64(True):
        per_token, slotted = _pair(**kw, dtype=jnp.float64)
        row64, params64 = _f64(row), _f64(params)

        def value_and_grad(model):
            # One compile for the output and its gradient (eager, the op-by-op compiles cost far more).
            def f(p):
                out = model.apply({"params": p}, **row64)
                return jnp.sum(jnp.sin(out)), out
            return jax.jit(jax.value_and_grad(f, has_aux=True))(params64)
        (_, got_out), got_grad = value_and_grad(slotted)
        (_, want_out), want_grad = value_and_grad(per_token)
        np.testing.assert_allclose(got_out, want_out, rtol=1e-10, atol=1e-10)
        for got, want in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_a_row_with_more_keys_than_slots_is_nan_and_the_others_are_not():
    per_token, _ = _pair()
    few = dit.DiT(patch_dim=P, width=32, depth=2, heads=2, mlp_ratio=2.0, pooled_text=True, cond_slots=3)
    row = _rows(jax.random.PRNGKey(5), batch=2)
    seg = np.zeros((2, S), np.int32)
    seg[0, :10] = 1                       # row 0: one clip at one t + padding = 2 keys: fits 3 slots
    seg[1, :20] = np.repeat([1, 2, 3, 4], 5)  # row 1: four clips + padding = 5 keys: does not
    t = np.where(seg > 0, 0.1 * seg + 0.05, 0.3).astype(np.float32)
    row = dict(row, segment_ids_BxS=jnp.asarray(seg), t_BxS=jnp.asarray(t))
    params = perturb(nn.meta.unbox(jax.jit(per_token.init)(jax.random.PRNGKey(6), **row))["params"], jax.random.PRNGKey(7), 0.2)
    out = np.asarray(jax.jit(few.apply)({"params": params}, **row))
    np.testing.assert_allclose(out[0], np.asarray(jax.jit(per_token.apply)({"params": params}, **row))[0],
                               atol=1e-5)
    assert np.isnan(out[1, :20]).all() and (out[1, 20:] == 0).all()


def test_bad_slot_count_is_named():
    with pytest.raises(ValueError, match="cond_slots"):
        dit.DiT(patch_dim=P, width=32, depth=1, heads=2, cond_slots=-1).init(
            jax.random.PRNGKey(0), **_rows(jax.random.PRNGKey(0), batch=1))
