"""Rounded matmuls (soraax/matmul.py): the exact function they claim, in the backward too; the DiT keeps its
params, its packing exactness and (at float32) its very program; every product of a bfloat16 step is one."""
import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from soraax import dit, matmul, patches

BF16 = jnp.bfloat16
DIMS = (((2,), (0,)), ((), ()))


def _round(a):
    return np.asarray(jnp.asarray(a).astype(BF16).astype(jnp.float32), np.float64)


@pytest.fixture(scope="module")
def operands():
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    return (jax.random.normal(kx, (2, 24, 40)), jax.random.normal(kw, (40, 16)) / 6,
            jax.random.normal(kg, (2, 24, 16)))


def test_forward_is_the_product_of_rounded_operands_summed_in_float32(operands):
    x, w, _ = operands
    got = np.asarray(matmul.dense_dot_general("bfloat16")(x, w, DIMS))
    assert got.dtype == np.float32
    want = np.einsum("bsk,kf->bsf", _round(x), _round(w))  # float64: only the rounding of operands differs
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # and the rounding is real: the float32 product is another number
    exact = np.einsum("bsk,kf->bsf", np.asarray(x, np.float64), np.asarray(w, np.float64))
    assert np.abs(got - exact).max() > 1e-3
    np.testing.assert_allclose(got, exact, rtol=0.05, atol=0.05)


def test_backward_rounds_the_cotangent_and_both_gradients_are_float32(operands):
    x, w, g = operands
    _, vjp = jax.vjp(lambda a, b: matmul.dense_dot_general("bfloat16")(a, b, DIMS), x, w)
    dx, dw = vjp(g)
    assert dx.dtype == dw.dtype == jnp.float32
    np.testing.assert_allclose(dx, np.einsum("bsf,kf->bsk", _round(g), _round(w)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, np.einsum("bsk,bsf->kf", _round(x), _round(g)), rtol=1e-5, atol=1e-5)


def test_bfloat16_layers_sum_in_float32_and_return_bfloat16(operands):
    x, w, g = operands
    xb, wb = x.astype(BF16), w.astype(BF16)
    layer = lambda a, b: matmul.dense_dot_general(None)(a, b, DIMS)
    # All three products ask for float32 sums of bfloat16 operands (Flax's default asks for bfloat16 ones).
    forward_and_back = jax.make_jaxpr(lambda a, b, c: jax.vjp(layer, a, b)[1](c))(xb, wb, g.astype(BF16))
    products = _dots(forward_and_back.jaxpr, [])
    assert [d[:3] for d in products] == [("bfloat16", "bfloat16", "float32")] * 3
    y, vjp = jax.vjp(layer, xb, wb)
    assert y.dtype == BF16
    # Summed in float32 and rounded once: as close to the float64 product of the same operands as bf16 holds.
    want = np.einsum("bsk,kf->bsf", _round(x), _round(w))
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=8e-3, atol=8e-3)
    dx, dw = vjp(g.astype(BF16))
    assert dx.dtype == dw.dtype == BF16
    np.testing.assert_allclose(np.asarray(dw, np.float64), np.einsum("bsk,bsf->kf", _round(x), _round(g)),
                               rtol=8e-3, atol=2e-2)


def test_float32_is_the_plain_dense_program(operands):
    x, w, _ = operands
    dot = matmul.dense_dot_general("float32")
    assert dot is matmul.dense_dot_general("float32")  # cached: one function a dtype
    plain = jax.make_jaxpr(lambda a, b: jax.lax.dot_general(a, b, DIMS))(x, w)
    ours = jax.make_jaxpr(lambda a, b: dot(a, b, DIMS))(x, w)
    assert str(ours) == str(plain)
    with jax.enable_x64(True):  # a float64 layer (the float64 reference tests) keeps float64 sums
        x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
        got = matmul.dense_dot_general(None)(jnp.asarray(x64), jnp.asarray(w64), DIMS)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, np.einsum("bsk,kf->bsf", x64, w64), rtol=1e-12)


def test_float32_dit_is_the_plain_dense_dit_program(monkeypatch):
    """At float32 the whole DiT, forward and backward, is the program it was before soraax/matmul.py."""
    packed, _ = _row(jax.random.PRNGKey(1), [(2, 3, 4), (1, 4, 2)], 32, 8)
    fields = dict(patch_dim=P, width=32, depth=2, heads=2, mlp_ratio=2.0, pooled_text=True, remat_policy="dots")

    def program():
        model = dit.DiT(**fields, matmul_dtype="float32")
        params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), **packed))
        return str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(model.apply(p, **packed) ** 2)))(params))
    ours = program()
    from soraax import layers
    for module in (dit, layers):  # Flax's own default: nn.Dense(dot_general=None) is lax.dot_general
        monkeypatch.setattr(module, "dense_dot_general", lambda matmul_dtype: None)
    assert ours == program()


def test_bad_uses_are_refused(operands):
    x, w, _ = operands
    with pytest.raises(ValueError, match="precision=.*rounds its operands to bfloat16"):
        matmul.dense_dot_general("bfloat16")(x, w, DIMS, precision=jax.lax.Precision.HIGHEST)
    with pytest.raises(ValueError, match="matmul_dtype 'float16'"):
        matmul.dense_dot_general("float16")
    with pytest.raises(ValueError, match="serves nn.Dense"):
        matmul.dense_dot_general("bfloat16")(x, w.T, (((2,), (1,)), ((), ())))
    with pytest.raises(ValueError, match="one dtype"):
        matmul.dense_dot_general("bfloat16")(x, w.astype(BF16), DIMS)


# ------------------------------------------------------------------------------------------ the DiT

P, TEXT_DIM = 8, 12


def _row(key, grids, seq_len, text_len):
    """Clips of `grids` packed into one row, then each clip's own row (tokens, coords, ids, t, text)."""
    rows, keys = [], jax.random.split(key, len(grids))
    parts = []
    for k, grid in zip(keys, grids):
        n = int(np.prod(grid))
        k1, k2 = jax.random.split(k)
        parts.append(dict(tokens=jax.random.normal(k1, (n, P)), coords=jnp.asarray(patches.grid_coords(grid)),
                          t=jnp.full((n,), 0.4), text=jax.random.normal(k2, (3, TEXT_DIM))))

    def pack(clips, seq, txt):
        n, l = sum(len(c["t"]) for c in clips), 3 * len(clips)
        seg = np.concatenate([np.full(len(c["t"]), i + 1) for i, c in enumerate(clips)] + [np.zeros(seq - n)])
        tseg = np.concatenate([np.full(3, i + 1) for i in range(len(clips))] + [np.zeros(txt - l)])
        cat = lambda key, pad: jnp.concatenate([c[key] for c in clips] + [jnp.zeros((pad, *clips[0][key].shape[1:]),
                                                                                     clips[0][key].dtype)])[None]
        return dict(tokens_BxSxP=cat("tokens", seq - n), coords_BxSx3=cat("coords", seq - n),
                    segment_ids_BxS=jnp.asarray(seg, jnp.int32)[None], t_BxS=cat("t", seq - n),
                    text_BxLxT=cat("text", txt - l), text_segment_ids_BxL=jnp.asarray(tseg, jnp.int32)[None])
    rows = [pack([c], len(c["t"]), 3) for c in parts]
    return pack(parts, seq_len, text_len), rows


@pytest.fixture(scope="module")
def dit_setup():
    packed, alone = _row(jax.random.PRNGKey(1), [(2, 3, 4), (1, 4, 2), (3, 2, 2)], 48, 12)
    fields = dict(patch_dim=P, width=32, depth=2, heads=2, mlp_ratio=2.0, pooled_text=True)
    f32 = dit.DiT(**fields, matmul_dtype="float32")
    params = nn.meta.unbox(jax.jit(f32.init)(jax.random.PRNGKey(2), **packed))
    # adaLN-Zero starts every block as the identity; perturb so the products all matter
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
    params = tree.unflatten([l + 0.2 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])
    return fields, f32, params, packed, alone


def test_bfloat16_matmuls_keep_the_params_and_approximate_the_float32_dit(dit_setup):
    fields, f32, params, packed, _ = dit_setup
    bf = dit.DiT(**fields, matmul_dtype="bfloat16")
    shapes = lambda t: jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), t)
    # the same checkpoint serves both: same names, shapes and (float32) dtypes
    assert shapes(nn.meta.unbox(jax.eval_shape(bf.init, jax.random.PRNGKey(2), **packed))) == shapes(params)
    want, got = jax.jit(f32.apply)(params, **packed), jax.jit(bf.apply)(params, **packed)
    assert got.dtype == jnp.float32
    error = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    assert 1e-4 < error < 3e-2  # rounded (not the float32 function), by about bf16's 8 bits


def test_packing_stays_exact_with_bfloat16_matmuls(dit_setup):
    fields, _, params, packed, alone = dit_setup
    bf = dit.DiT(**fields, matmul_dtype="bfloat16")
    out = jax.jit(bf.apply)(params, **packed)[0]
    start = 0
    for row in alone:
        n = row["t_BxS"].shape[1]
        # Rounding is per value, so a clip's numbers do not depend on its neighbours (sums' order aside).
        np.testing.assert_allclose(out[start:start + n], jax.jit(bf.apply)(params, **row)[0], rtol=1e-4, atol=1e-4)
        start += n
    np.testing.assert_array_equal(out[start:], 0.0)

    def first_clip_loss(tokens):
        return jnp.sum(bf.apply(params, **{**packed, "tokens_BxSxP": tokens})[0, :24] ** 2)
    grad = jax.jit(jax.grad(first_clip_loss))(packed["tokens_BxSxP"])
    assert float(jnp.abs(grad[0, :24]).max()) > 0
    np.testing.assert_array_equal(grad[0, 24:], 0.0)


def _dots(jaxpr, found):
    """Every dot_general in `jaxpr` and the jaxprs inside it (scan, jit, custom VJP rules, remat)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            lhs, rhs = (v.aval for v in eqn.invars)
            (contract, _), (batch, _) = eqn.params["dimension_numbers"]
            k = int(np.prod([lhs.shape[i] for i in contract]))
            flops = 2 * k * int(np.prod(lhs.shape)) // k * int(np.prod(rhs.shape)) // k
            flops //= int(np.prod([lhs.shape[i] for i in batch])) or 1
            found.append((lhs.dtype.name, rhs.dtype.name, eqn.outvars[0].aval.dtype.name, flops))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            _dots(sub, found)
    return found


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_product_of_the_dit_gradient_is_bf16_times_bf16_into_float32(dit_setup, dtype):
    """The DiT's forward and backward with bfloat16 matmuls, float32 or bfloat16 activations: no product
    falls back to float32 operands but the pooled caption's mean (an explicit float32 average, S x L x T)."""
    fields, _, params, packed, _ = dit_setup
    model = dit.DiT(**fields, dtype=jnp.dtype(dtype), matmul_dtype="bfloat16")
    grad = jax.grad(lambda p: jnp.sum(model.apply(p, **packed) ** 2))
    dots = _dots(jax.make_jaxpr(grad)(params).jaxpr, [])
    fast = sum(f for *kind, f in dots if tuple(kind) == ("bfloat16", "bfloat16", "float32"))
    slow = [d for d in dots if d[:3] != ("bfloat16", "bfloat16", "float32")]
    assert len(dots) > 20 and fast > 0
    assert sum(f for *_, f in slow) <= 0.02 * fast, slow
