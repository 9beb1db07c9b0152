"""The packed DiT: packing is exact, padding is inert, positions are relative, and the sizes are DiT's."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from soraax import dit, patches
from helpers import perturb

P = 8          # patch dim
TEXT_DIM = 12  # text state width


def _model(**kw):
    fields = dict(patch_dim=P, width=32, depth=2, heads=2, mlp_ratio=2.0)
    fields.update(kw)
    return dit.DiT(**fields)


def _clip(key, grid, text_len, t):
    k1, k2 = jax.random.split(key)
    tokens = jax.random.normal(k1, (int(np.prod(grid)), P))
    return {"tokens": tokens, "coords": jnp.asarray(patches.grid_coords(grid)),
            "t": jnp.full((tokens.shape[0],), t), "text": jax.random.normal(k2, (text_len, TEXT_DIM))}


def _row(clips, seq_len, text_len):
    """Packs clips into one padded row, as Grain's packer lays them out (batch axis of 1)."""
    def cat(key, n_pad, fill=0.0):
        parts = [c[key] for c in clips]
        pad_shape = (n_pad,) + parts[0].shape[1:]
        return jnp.concatenate(parts + [jnp.full(pad_shape, fill, parts[0].dtype)])[None]
    n = sum(c["tokens"].shape[0] for c in clips)
    l = sum(c["text"].shape[0] for c in clips)
    seg = np.zeros(seq_len, np.int32)
    tseg = np.zeros(text_len, np.int32)
    i = j = 0
    for k, c in enumerate(clips, start=1):
        seg[i:i + c["tokens"].shape[0]] = k
        tseg[j:j + c["text"].shape[0]] = k
        i += c["tokens"].shape[0]
        j += c["text"].shape[0]
    return dict(tokens_BxSxP=cat("tokens", seq_len - n, 7.0), coords_BxSx3=cat("coords", seq_len - n),
                segment_ids_BxS=jnp.asarray(seg)[None], t_BxS=cat("t", seq_len - n, 0.5),
                text_BxLxT=cat("text", text_len - l, 3.0), text_segment_ids_BxL=jnp.asarray(tseg)[None])


@pytest.fixture(scope="module")
def setup():
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    clips = [_clip(keys[0], (3, 2, 4), 5, 0.3),   # a video
             _clip(keys[1], (1, 3, 2), 3, 0.8),   # an image: one latent frame
             _clip(keys[2], (2, 4, 1), 7, 0.05)]  # a tall, thin clip
    model = _model(pooled_text=True)  # covers both text paths: cross-attention and pooled adaLN
    row = _row(clips, seq_len=48, text_len=20)
    params = perturb(nn.meta.unbox(jax.jit(model.init)(keys[3], **row)), keys[3], 0.2)
    return model, params, clips


def _alone(model, params, clip):
    n, l = clip["tokens"].shape[0], clip["text"].shape[0]
    return jax.jit(model.apply)(params, **_row([clip], n, l))[0]


def test_packing_is_exact(setup):
    model, params, clips = setup
    packed = jax.jit(model.apply)(params, **_row(clips, 48, 20))[0]
    start = 0
    for clip in clips:
        n = clip["tokens"].shape[0]
        np.testing.assert_allclose(packed[start:start + n], _alone(model, params, clip), atol=1e-5, rtol=1e-5)
        start += n
    np.testing.assert_array_equal(packed[start:], 0.0)  # padding outputs exactly zero


def test_padding_and_other_clips_change_nothing(setup):
    model, params, clips = setup
    row = _row(clips, 48, 20)

    def loss_of_first_clip(tokens):
        out = model.apply(params, **{**row, "tokens_BxSxP": tokens})
        return jnp.sum(out[0, :24] ** 2)

    grad = jax.jit(jax.grad(loss_of_first_clip))(row["tokens_BxSxP"])
    assert float(jnp.abs(grad[0, :24]).max()) > 0
    np.testing.assert_array_equal(grad[0, 24:], 0.0)  # other clips and padding get exactly no gradient


def test_segment_mean_pools_each_clips_own_caption_and_nothing_else():
    values = jnp.arange(12.0).reshape(1, 6, 2)
    value_segments = jnp.array([[1, 1, 2, 0, 3, 0]])  # caption of clip 1: rows 0-1, clip 2: row 2, padding
    query_segments = jnp.array([[2, 1, 0, 4, 1]])     # clip 4 has no caption; 0 is padding
    pooled = dit.segment_mean(values, value_segments, query_segments)[0]
    np.testing.assert_allclose(pooled, [[4.0, 5.0], [1.0, 2.0], [0.0, 0.0], [0.0, 0.0], [1.0, 2.0]])


def test_pooled_text_reaches_the_output(setup):
    model, params, clips = setup
    row = _row(clips[:1], 24, 5)
    # A caption whose tokens all move by the same vector changes its mean, hence the adaLN conditioning.
    shifted = {**row, "text_BxLxT": row["text_BxLxT"] + 1.0}
    apply = jax.jit(model.apply)
    assert not np.allclose(apply(params, **row), apply(params, **shifted), atol=1e-4)


def test_pooled_caption_alone_conditions_exactly_per_clip(setup):
    # cross_attn=False: the caption enters only through its mean in adaLN (DiT's class embedding): each
    # packed clip still gets its own caption's conditioning and nothing of its neighbours'.
    _, _, clips = setup
    model = _model(pooled_text=True, cross_attn=False)
    row = _row(clips, 48, 20)
    params = perturb(nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(7), **row)), jax.random.PRNGKey(8), 0.2)
    assert not any("cross_attn" in "/".join(map(str, path))
                   for path, _ in jax.tree_util.tree_leaves_with_path(params))
    packed, start = jax.jit(model.apply)(params, **row)[0], 0
    for clip in clips:
        n = clip["tokens"].shape[0]
        np.testing.assert_allclose(packed[start:start + n], _alone(model, params, clip), atol=1e-5, rtol=1e-5)
        start += n
    recaptioned = {**clips[0], "text": clips[0]["text"] + 1.0}
    assert not np.allclose(_alone(model, params, recaptioned), _alone(model, params, clips[0]), atol=1e-4)


def test_chunked_attention_matches_xla(setup):
    model, params, clips = setup
    row = _row(clips, 48, 20)
    chunked = model.clone(attn_impl="chunked")
    np.testing.assert_allclose(jax.jit(chunked.apply)(params, **row), jax.jit(model.apply)(params, **row), atol=1e-5)


def test_remat_and_unrolled_layers_give_the_same_function(setup):
    model, params, clips = setup
    row = _row(clips, 48, 20)
    want, want_grad = jax.jit(jax.value_and_grad(lambda p: jnp.sum(model.apply(p, **row) ** 2)))(params)
    remat = model.clone(remat_policy="full")
    got, got_grad = jax.jit(jax.value_and_grad(lambda p: jnp.sum(remat.apply(p, **row) ** 2)))(params)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Remat recomputes the forward in another order: equal up to float32 rounding at the gradient's scale
    # (some leaves, e.g. key biases, have a true gradient of 0 and hold only rounding noise).
    scale = max(float(np.abs(g).max()) for g in jax.tree_util.tree_leaves(want_grad))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * scale),
                           got_grad, want_grad)


def test_rope_makes_positions_relative(setup):
    # Only coordinate differences enter attention, so translating a clip in space-time changes nothing.
    model, params, clips = setup
    clip = clips[0]
    shifted = {**clip, "coords": clip["coords"] + jnp.array([4, 7, 2], jnp.int32)[None, :]}
    np.testing.assert_allclose(_alone(model, params, shifted), _alone(model, params, clip), atol=1e-4)
    # ... but the content of the coordinates matters: a transposed grid is a different clip.
    swapped = {**clip, "coords": clip["coords"][:, ::-1]}
    assert float(jnp.abs(_alone(model, params, swapped) - _alone(model, params, clip)).max()) > 1e-3


def test_rope_rotates_each_pair_by_its_angle():
    # The definition, pair by pair in float64: (x[2i], x[2i+1]) turned by angle i (Wan's interleaved pairs,
    # which its weights need); the fused table form must equal it.
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (2, 5, 3, 12)), np.float64)
    angles = np.asarray(jax.random.uniform(jax.random.PRNGKey(1), (2, 5, 6), maxval=7.0), np.float64)
    cos, sin = np.cos(angles)[:, :, None], np.sin(angles)[:, :, None]
    want = np.empty_like(x)
    want[..., 0::2] = x[..., 0::2] * cos - x[..., 1::2] * sin
    want[..., 1::2] = x[..., 0::2] * sin + x[..., 1::2] * cos
    got = dit.apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(angles, jnp.float32))
    np.testing.assert_allclose(got, want, atol=1e-5)
    # Rotations keep each pair's length.
    np.testing.assert_allclose(np.linalg.norm(np.asarray(got), axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_zero_init_outputs_zero_velocity():
    row = _row([_clip(jax.random.PRNGKey(1), (1, 2, 2), 2, 0.5)], 6, 3)
    model = _model()
    out = jax.jit(model.apply)(jax.jit(model.init)(jax.random.PRNGKey(0), **row), **row)
    np.testing.assert_array_equal(out, 0.0)


def test_bad_hyper_parameters_are_named():
    row = _row([_clip(jax.random.PRNGKey(1), (1, 2, 2), 2, 0.5)], 6, 3)
    with pytest.raises(ValueError, match="not divisible by heads"):
        _model(width=30, heads=4).init(jax.random.PRNGKey(0), **row)
    with pytest.raises(ValueError, match="remat_policy"):
        _model(remat_policy="sometimes").init(jax.random.PRNGKey(0), **row)


def _param_count(model, seq=8, text=4):
    row = dict(tokens_BxSxP=jax.ShapeDtypeStruct((1, seq, model.patch_dim), jnp.float32),
               coords_BxSx3=jax.ShapeDtypeStruct((1, seq, 3), jnp.int32),
               segment_ids_BxS=jax.ShapeDtypeStruct((1, seq), jnp.int32),
               t_BxS=jax.ShapeDtypeStruct((1, seq), jnp.float32),
               text_BxLxT=jax.ShapeDtypeStruct((1, text, 4096), jnp.float32),
               text_segment_ids_BxL=jax.ShapeDtypeStruct((1, text), jnp.int32))
    shapes = jax.eval_shape(lambda r: model.init(jax.random.PRNGKey(0), **r), row)
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nn.meta.unbox(shapes)))


def test_xl_has_the_dit_xl2_size_without_allocating():
    # DiT-XL/2 (Peebles & Xie) is 675M with 4 latent channels and a 1000-class label table; ours has
    # 16 latent channels in 1x2x2 patches (P = 64) and no label table, which moves it by about 1M.
    xl = dit.DiT(patch_dim=64, cross_attn=False, **dit.DIT_XL)
    assert 670e6 < _param_count(xl) < 680e6
    with_text = _param_count(dit.DiT(patch_dim=64, **dit.DIT_XL))
    assert with_text > _param_count(xl)  # cross-attention adds about 4*D^2 per block


def test_tiny_dit_overfits_one_packed_batch(setup):
    _, _, clips = setup
    model = _model(width=64, heads=4)
    row = _row(clips, 48, 20)
    target = jax.random.normal(jax.random.PRNGKey(5), row["tokens_BxSxP"].shape)
    real = (row["segment_ids_BxS"] > 0)[..., None]
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), **row))
    opt = optax.adam(3e-3)
    opt_state = opt.init(params)

    def loss_fn(p):
        return jnp.sum(jnp.where(real, (model.apply(p, **row) - target) ** 2, 0.0)) / jnp.sum(real) / P

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        updates, s = opt.update(g, s)
        return optax.apply_updates(p, updates), s, loss

    first = float(jax.jit(loss_fn)(params))
    for _ in range(300):
        params, opt_state, loss = step(params, opt_state)
    assert float(loss) < first / 10
