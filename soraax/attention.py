"""Segment-masked attention: one function, several backends that give the same numbers.

A query attends to exactly the keys that carry its own nonzero segment id. With the same ids on both sides
this is packed self-attention (NaViT's Patch n' Pack); with video ids for the queries and the packed text's
ids for the keys it is cross-attention from each clip to its own caption. Id 0 is padding: a padding query,
and a query whose segment has no key at all, outputs exactly zero, and its gradients are finite (zero).

Backends (`impl`):
  xla      the [B, H, Sq, Skv] logits and mask, materialised, with a closed-form backward; the
           reference, and fastest for short rows.
  chunked  FlashAttention-2 in plain JAX: query blocks x key blocks with an online softmax and a custom VJP
           that recomputes the blocks, so neither pass holds more than [B, H, block_q, block_kv] logits.
           For long rows on CPU/GPU.
  splash   TPU Pallas splash attention with `SegmentIds` (no mask is materialised).
  cudnn    `jax.nn.dot_product_attention(implementation="cudnn")` with the segment mask, on NVIDIA GPUs.
The last two refuse to run on another backend rather than fall back to a different path silently.

Logits and softmax are float32 whatever the input dtype; the output has the dtype of `q`.

Dimension key:
  B batch   Q query length   K key/value length   H heads   D head dim
  Nq, Nk    number of query / key blocks   Bq, Bk  block lengths (chunked, splash)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from soraax import local_attention
from soraax.masked_softmax import masked_probs, pad_length, safe_max, segment_mask

IMPLS = ("xla", "chunked", "splash", "cudnn")

# The splash kernel tiles sequences in multiples of the TPU's 128 lanes.
_SPLASH_LANES = 128


def attention(q, k, v, q_segment_ids, kv_segment_ids, *, impl: str = "xla", block_q: int = 512,
              block_kv: int = 512, local_max_len: int = 0, local_fits=None):
    """q [B, Q, H, D], k/v [B, K, H, D], segment ids int [B, Q] / [B, K] (0 = padding) -> [B, Q, H, D].

    `block_q` / `block_kv` tile the `chunked` and `splash` backends (clamped to the sequence lengths, which
    need not be multiples of them); `xla` and `cudnn` ignore them. `local_max_len` > 0 (self-attention over
    packed rows of clips of at most that many tokens) lets `xla` and `chunked` compute only the key blocks
    within a clip's reach (soraax/local_attention.py), falling back to the whole row (chunked) for a batch
    whose clips are longer or not contiguous: the same function either way. `local_fits`, when given, is
    that check done once by the caller for every layer (`local_attention.fits(ids, local_max_len)` with
    q_segment_ids == kv_segment_ids); by default each call makes it.
    """
    _check_inputs(q, k, v, q_segment_ids, kv_segment_ids)
    blocking = local_attention.applies(impl, q.shape[1], k.shape[1], local_max_len)
    if blocking is not None:
        def whole_row(q, k, v, q_ids, kv_ids):
            # chunked whatever `impl`: under grad, lax.cond saves the residuals of BOTH branches (zeros for
            # the one not taken), and xla's are the [B, H, S, S] probabilities, which cost more to fill
            # than the local window saves (measured: step 0.53 s with the xla fallback, 0.40 s with this).
            return attention(q, k, v, q_ids, kv_ids, impl="chunked", block_q=block_q, block_kv=block_kv)

        def local(q, k, v, q_ids, kv_ids):
            del kv_ids  # equal to q_ids on this branch
            return local_attention.local_attention(q, k, v, q_ids, block=blocking[0], reach=blocking[1])

        usable = local_fits
        if usable is None:
            usable = (local_attention.fits(q_segment_ids, local_max_len)
                      & jnp.all(q_segment_ids == kv_segment_ids))
        return lax.cond(usable, local, whole_row, q, k, v, q_segment_ids, kv_segment_ids)
    if impl == "xla":
        return _xla_attention(q, k, v, q_segment_ids, kv_segment_ids)
    if impl == "chunked":
        return _chunked_attention(q, k, v, q_segment_ids, kv_segment_ids, block_q, block_kv)
    if impl == "splash":
        _require_backend("splash", ("tpu",), "a TPU backend")
        return _splash_attention(q, k, v, q_segment_ids, kv_segment_ids, block_q, block_kv)
    if impl == "cudnn":
        _require_backend("cudnn", ("gpu", "cuda"), "an NVIDIA GPU backend with cuDNN")
        return _cudnn_attention(q, k, v, q_segment_ids, kv_segment_ids)
    raise ValueError(f"unknown attention impl {impl!r}; valid ones are {IMPLS}")


def _check_inputs(q, k, v, q_segment_ids, kv_segment_ids) -> None:
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"attention wants q [B, Q, H, D] and k/v [B, K, H, D]; got q {q.shape}, k {k.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, K, H, D]; got k {k.shape}, v {v.shape}")
    b, _, h, d = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (b, h, d):
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch, heads or head dim")
    for name, ids, x in (("q_segment_ids", q_segment_ids, q), ("kv_segment_ids", kv_segment_ids, k)):
        if ids.shape != x.shape[:2]:
            raise ValueError(f"{name} must be [B, length] = {x.shape[:2]}; got {ids.shape}")
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"{name} must be integer (0 = padding); got {ids.dtype}")


def _require_backend(impl: str, platforms: tuple[str, ...], what: str) -> None:
    backend = jax.default_backend()
    if backend not in platforms:
        raise RuntimeError(f"attention impl={impl!r} needs {what}; running on {backend}. "
                           "Use impl='xla' (short rows) or impl='chunked' (long rows) on this platform.")


def _logits(q_BxHxQxD, k_BxHxKxD):
    """float32 [B, H, Q, K] scaled logits."""
    scale = 1.0 / math.sqrt(q_BxHxQxD.shape[-1])
    return jnp.einsum("bhqd,bhkd->bhqk", q_BxHxQxD, k_BxHxKxD, preferred_element_type=jnp.float32) * scale


def _masked_logits(q_BxHxQxD, k_BxHxKxD, mask_BxQxK):
    """float32 [B, H, Q, K] scaled logits, -inf where the mask forbids (the flash blocks' online softmax)."""
    return jnp.where(mask_BxQxK[:, None], _logits(q_BxHxQxD, k_BxHxKxD), -jnp.inf)


# ---------------------------------------------------------------------------------------------- xla


def _xla_attention(q_BxQxHxD, k_BxKxHxD, v_BxKxHxD, q_segment_ids_BxQ, kv_segment_ids_BxK):
    q_BxHxQxD, k_BxHxKxD, v_BxHxKxD = (x.transpose(0, 2, 1, 3) for x in (q_BxQxHxD, k_BxKxHxD, v_BxKxHxD))
    mask_BxQxK = segment_mask(q_segment_ids_BxQ, kv_segment_ids_BxK)
    out_BxHxQxD = _dense_attention(q_BxHxQxD, k_BxHxKxD, v_BxHxKxD, mask_BxQxK)
    return out_BxHxQxD.transpose(0, 2, 1, 3).astype(q_BxQxHxD.dtype)


def _dense_forward(q_BxHxQxD, k_BxHxKxD, v_BxHxKxD, mask_BxQxK):
    """-> (out float32 [B, H, Q, D], probabilities float32 [B, H, Q, K])."""
    probs_BxHxQxK = masked_probs(_logits(q_BxHxQxD, k_BxHxKxD), mask_BxQxK[:, None])
    out_BxHxQxD = jnp.einsum("bhqk,bhkd->bhqd", probs_BxHxQxK.astype(v_BxHxKxD.dtype), v_BxHxKxD,
                             preferred_element_type=jnp.float32)
    return out_BxHxQxD, probs_BxHxQxK


@jax.custom_vjp
def _dense_attention(q_BxHxQxD, k_BxHxKxD, v_BxHxKxD, mask_BxQxK):
    """Materialised masked attention, float32 out, with a hand-written backward.

    Autodiff of the softmax keeps and revisits the where, max, exp, sum and divide of every [Q, K] logit;
    the closed form below reads the saved probabilities once for dV and once for dS = P * (dP - dO . O),
    the same gradient. Measured on 2 CPU cores: attention alone (8 rows x 6 heads x 256^2, forward +
    backward) 61 -> 41-49 ms; the whole DiT-S/2 train step 1.12-1.14x and the tiny one 1.09x faster
    (benchmarks/README.md). Masked and padding entries have P = 0, so their dS is exactly 0: no NaN.
    """
    return _dense_forward(q_BxHxQxD, k_BxHxKxD, v_BxHxKxD, mask_BxQxK)[0]


def _dense_fwd(q_BxHxQxD, k_BxHxKxD, v_BxHxKxD, mask_BxQxK):
    out_BxHxQxD, probs_BxHxQxK = _dense_forward(q_BxHxQxD, k_BxHxKxD, v_BxHxKxD, mask_BxQxK)
    return out_BxHxQxD, (q_BxHxQxD, k_BxHxKxD, v_BxHxKxD, probs_BxHxQxK, out_BxHxQxD)


def _dense_bwd(residuals, dout_BxHxQxD):
    q_BxHxQxD, k_BxHxKxD, v_BxHxKxD, probs_BxHxQxK, out_BxHxQxD = residuals
    f32 = jnp.float32
    scale = 1.0 / math.sqrt(q_BxHxQxD.shape[-1])
    dout_in_v_BxHxQxD = dout_BxHxQxD.astype(v_BxHxKxD.dtype)
    dv_BxHxKxD = jnp.einsum("bhqk,bhqd->bhkd", probs_BxHxQxK.astype(v_BxHxKxD.dtype), dout_in_v_BxHxQxD,
                            preferred_element_type=f32)
    dp_BxHxQxK = jnp.einsum("bhqd,bhkd->bhqk", dout_in_v_BxHxQxD, v_BxHxKxD, preferred_element_type=f32)
    # delta_q = sum_k P_qk dP_qk = dO_q . O_q: the softmax Jacobian's diagonal correction.
    delta_BxHxQx1 = (dout_BxHxQxD * out_BxHxQxD).sum(axis=-1, keepdims=True)
    dlogits_BxHxQxK = probs_BxHxQxK * (dp_BxHxQxK - delta_BxHxQx1) * scale
    dq_BxHxQxD = jnp.einsum("bhqk,bhkd->bhqd", dlogits_BxHxQxK.astype(k_BxHxKxD.dtype), k_BxHxKxD,
                            preferred_element_type=f32)
    dk_BxHxKxD = jnp.einsum("bhqk,bhqd->bhkd", dlogits_BxHxQxK.astype(q_BxHxQxD.dtype), q_BxHxQxD,
                            preferred_element_type=f32)
    return (dq_BxHxQxD.astype(q_BxHxQxD.dtype), dk_BxHxKxD.astype(k_BxHxKxD.dtype),
            dv_BxHxKxD.astype(v_BxHxKxD.dtype), None)


_dense_attention.defvjp(_dense_fwd, _dense_bwd)


# ------------------------------------------------------------------------------------------ chunked


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _to_blocks(x_BxSxHxD, block: int):
    """[B, S, H, D] -> [N, B, H, block, D] (S a multiple of block)."""
    b, s, h, d = x_BxSxHxD.shape
    return x_BxSxHxD.reshape(b, s // block, block, h, d).transpose(1, 0, 3, 2, 4)


def _from_blocks(x_NxBxHxBlockxD):
    n, b, h, block, d = x_NxBxHxBlockxD.shape
    return x_NxBxHxBlockxD.transpose(1, 0, 3, 2, 4).reshape(b, n * block, h, d)


def _ids_to_blocks(ids_BxS, block: int):
    """[B, S] -> [N, B, block]."""
    b, s = ids_BxS.shape
    return ids_BxS.reshape(b, s // block, block).transpose(1, 0, 2)


def _chunked_attention(q_BxQxHxD, k_BxKxHxD, v_BxKxHxD, q_segment_ids_BxQ, kv_segment_ids_BxK,
                       block_q: int, block_kv: int):
    if block_q < 1 or block_kv < 1:
        raise ValueError(f"chunked attention blocks must be >= 1; got block_q={block_q}, block_kv={block_kv}")
    q_len, kv_len = q_BxQxHxD.shape[1], k_BxKxHxD.shape[1]
    bq, bk = min(block_q, q_len), min(block_kv, kv_len)
    q_pad, kv_pad = _round_up(q_len, bq), _round_up(kv_len, bk)
    out_NqxBxHxBqxD = _flash(
        _to_blocks(pad_length(q_BxQxHxD, q_pad), bq),
        _to_blocks(pad_length(k_BxKxHxD, kv_pad), bk),
        _to_blocks(pad_length(v_BxKxHxD, kv_pad), bk),
        _ids_to_blocks(pad_length(q_segment_ids_BxQ, q_pad), bq),
        _ids_to_blocks(pad_length(kv_segment_ids_BxK, kv_pad), bk))
    return _from_blocks(out_NqxBxHxBqxD)[:, :q_len]


def _flash_forward(q_blocks, k_blocks, v_blocks, q_id_blocks, kv_id_blocks):
    """-> (out [Nq, B, H, Bq, D] in q's dtype, logsumexp float32 [Nq, B, H, Bq]; 0 for rows with no key)."""

    def one_query_block(args):
        q_BxHxBqxD, q_ids_BxBq = args

        def absorb_key_block(carry, kv_block):
            max_BxHxBq, denom_BxHxBq, acc_BxHxBqxD = carry
            k_BxHxBkxD, v_BxHxBkxD, kv_ids_BxBk = kv_block
            logits_BxHxBqxBk = _masked_logits(q_BxHxBqxD, k_BxHxBkxD, segment_mask(q_ids_BxBq, kv_ids_BxBk))
            new_max_BxHxBq = jnp.maximum(max_BxHxBq, logits_BxHxBqxBk.max(axis=-1))
            safe_max_BxHxBq = safe_max(new_max_BxHxBq)
            p_BxHxBqxBk = jnp.exp(logits_BxHxBqxBk - safe_max_BxHxBq[..., None])
            rescale_BxHxBq = jnp.exp(max_BxHxBq - safe_max_BxHxBq)
            denom_BxHxBq = denom_BxHxBq * rescale_BxHxBq + p_BxHxBqxBk.sum(axis=-1)
            acc_BxHxBqxD = acc_BxHxBqxD * rescale_BxHxBq[..., None] + jnp.einsum(
                "bhqk,bhkd->bhqd", p_BxHxBqxBk.astype(v_BxHxBkxD.dtype), v_BxHxBkxD,
                preferred_element_type=jnp.float32)
            return (new_max_BxHxBq, denom_BxHxBq, acc_BxHxBqxD), None

        b, h, bq, d = q_BxHxBqxD.shape
        init = (jnp.full((b, h, bq), -jnp.inf, jnp.float32), jnp.zeros((b, h, bq), jnp.float32),
                jnp.zeros((b, h, bq, d), jnp.float32))
        (max_BxHxBq, denom_BxHxBq, acc_BxHxBqxD), _ = lax.scan(
            absorb_key_block, init, (k_blocks, v_blocks, kv_id_blocks))
        has_key_BxHxBq = denom_BxHxBq > 0
        safe_denom_BxHxBq = jnp.where(has_key_BxHxBq, denom_BxHxBq, 1.0)
        out_BxHxBqxD = (acc_BxHxBqxD / safe_denom_BxHxBq[..., None]).astype(q_BxHxBqxD.dtype)
        logsumexp_BxHxBq = jnp.where(has_key_BxHxBq, safe_max(max_BxHxBq) + jnp.log(safe_denom_BxHxBq), 0.0)
        return out_BxHxBqxD, logsumexp_BxHxBq

    # Query blocks run one after another (lax.map), so live memory is one block pair, not Q x Bk.
    return lax.map(one_query_block, (q_blocks, q_id_blocks))


@jax.custom_vjp
def _flash(q_blocks, k_blocks, v_blocks, q_id_blocks, kv_id_blocks):
    """Blocked attention: q [Nq, B, H, Bq, D], k/v [Nk, B, H, Bk, D], ids [Nq, B, Bq] / [Nk, B, Bk]."""
    return _flash_forward(q_blocks, k_blocks, v_blocks, q_id_blocks, kv_id_blocks)[0]


def _flash_fwd(q_blocks, k_blocks, v_blocks, q_id_blocks, kv_id_blocks):
    out_blocks, logsumexp_blocks = _flash_forward(q_blocks, k_blocks, v_blocks, q_id_blocks, kv_id_blocks)
    return out_blocks, (q_blocks, k_blocks, v_blocks, q_id_blocks, kv_id_blocks, out_blocks, logsumexp_blocks)


def _flash_bwd(residuals, dout_blocks):
    """FlashAttention-2's backward (Dao 2023, Alg. 2): recompute each block's probabilities from the saved
    logsumexp. Computed in float32: this is the accuracy path; TPU/GPU speed comes from splash/cudnn."""
    q_blocks, k_blocks, v_blocks, q_id_blocks, kv_id_blocks, out_blocks, logsumexp_blocks = residuals
    f32 = lambda x: x.astype(jnp.float32)
    q32_blocks, k32_blocks, v32_blocks, dout32_blocks = map(f32, (q_blocks, k_blocks, v_blocks, dout_blocks))
    scale = 1.0 / math.sqrt(q_blocks.shape[-1])
    # delta_i = sum_j P_ij dP_ij = dO_i . O_i: the softmax Jacobian's diagonal correction.
    delta_blocks = (dout32_blocks * f32(out_blocks)).sum(axis=-1)

    def one_key_block(dq_blocks, kv_block):
        k_BxHxBkxD, v_BxHxBkxD, kv_ids_BxBk = kv_block

        def visit_query_block(carry, q_block):
            dk_BxHxBkxD, dv_BxHxBkxD = carry
            q_BxHxBqxD, q_ids_BxBq, dout_BxHxBqxD, logsumexp_BxHxBq, delta_BxHxBq = q_block
            logits_BxHxBqxBk = _masked_logits(q_BxHxBqxD, k_BxHxBkxD, segment_mask(q_ids_BxBq, kv_ids_BxBk))
            p_BxHxBqxBk = jnp.exp(logits_BxHxBqxBk - logsumexp_BxHxBq[..., None])
            dv_BxHxBkxD = dv_BxHxBkxD + jnp.einsum("bhqk,bhqd->bhkd", p_BxHxBqxBk, dout_BxHxBqxD)
            dp_BxHxBqxBk = jnp.einsum("bhqd,bhkd->bhqk", dout_BxHxBqxD, v_BxHxBkxD)
            dlogits_BxHxBqxBk = p_BxHxBqxBk * (dp_BxHxBqxBk - delta_BxHxBq[..., None]) * scale
            dk_BxHxBkxD = dk_BxHxBkxD + jnp.einsum("bhqk,bhqd->bhkd", dlogits_BxHxBqxBk, q_BxHxBqxD)
            dq_BxHxBqxD = jnp.einsum("bhqk,bhkd->bhqd", dlogits_BxHxBqxBk, k_BxHxBkxD)
            return (dk_BxHxBkxD, dv_BxHxBkxD), dq_BxHxBqxD

        zeros = jnp.zeros_like(k_BxHxBkxD)
        (dk_BxHxBkxD, dv_BxHxBkxD), dq_from_this_block = lax.scan(
            visit_query_block, (zeros, zeros),
            (q32_blocks, q_id_blocks, dout32_blocks, logsumexp_blocks, delta_blocks))
        return dq_blocks + dq_from_this_block, (dk_BxHxBkxD, dv_BxHxBkxD)

    dq_blocks, (dk_blocks, dv_blocks) = lax.scan(
        one_key_block, jnp.zeros_like(q32_blocks), (k32_blocks, v32_blocks, kv_id_blocks))
    return (dq_blocks.astype(q_blocks.dtype), dk_blocks.astype(k_blocks.dtype),
            dv_blocks.astype(v_blocks.dtype), None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ------------------------------------------------------------------------------------------- splash


def _has_key(q_segment_ids_BxQ, kv_segment_ids_BxK):
    """bool [B, Q]: the query is real and some key shares its segment, in O(S log S) (no [Q, K] mask)."""
    sorted_kv_ids_BxK = jnp.sort(kv_segment_ids_BxK, axis=-1)
    index_BxQ = jax.vmap(jnp.searchsorted)(sorted_kv_ids_BxK, q_segment_ids_BxQ)
    index_BxQ = jnp.minimum(index_BxQ, kv_segment_ids_BxK.shape[1] - 1)
    found_BxQ = jnp.take_along_axis(sorted_kv_ids_BxK, index_BxQ, axis=-1) == q_segment_ids_BxQ
    return found_BxQ & (q_segment_ids_BxQ != 0)


def _splash_kernel(heads: int, q_len: int, kv_len: int, block_q: int, block_kv: int, interpret: bool):
    # Built per trace, not cached: its mask-info arrays become constants of the trace that made them.
    mask = splash.MultiHeadMask([splash.FullMask((q_len, kv_len))] * heads)
    blocks = splash.BlockSizes(
        block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
        block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
        block_q_dq=block_q, block_kv_dq=block_kv)
    return splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=blocks,
                                  interpret=interpret)


def _splash_attention(q_BxQxHxD, k_BxKxHxD, v_BxKxHxD, q_segment_ids_BxQ, kv_segment_ids_BxK,
                      block_q: int, block_kv: int, *, interpret: bool = False):
    """`interpret=True` runs the Pallas kernel through its interpreter, which is how it is tested on CPU."""
    for name, block in (("block_q", block_q), ("block_kv", block_kv)):
        if block < _SPLASH_LANES or block % _SPLASH_LANES:
            raise ValueError(f"splash attention tiles in multiples of {_SPLASH_LANES}; got {name}={block}")
    q_len, kv_len = q_BxQxHxD.shape[1], k_BxKxHxD.shape[1]
    bq = min(block_q, _round_up(q_len, _SPLASH_LANES))
    bk = min(block_kv, _round_up(kv_len, _SPLASH_LANES))
    q_pad, kv_pad = _round_up(q_len, bq), _round_up(kv_len, bk)
    kernel = _splash_kernel(q_BxQxHxD.shape[2], q_pad, kv_pad, bq, bk, interpret)

    # Splash applies no scale of its own.
    scale = 1.0 / math.sqrt(q_BxQxHxD.shape[-1])
    q_BxHxQxD = pad_length(q_BxQxHxD * jnp.asarray(scale, q_BxQxHxD.dtype), q_pad).transpose(0, 2, 1, 3)
    k_BxHxKxD = pad_length(k_BxKxHxD, kv_pad).transpose(0, 2, 1, 3)
    v_BxHxKxD = pad_length(v_BxKxHxD, kv_pad).transpose(0, 2, 1, 3)
    q_ids_BxQ = pad_length(q_segment_ids_BxQ.astype(jnp.int32), q_pad)
    kv_ids_BxK = pad_length(kv_segment_ids_BxK.astype(jnp.int32), kv_pad)

    def one_row(q_HxQxD, k_HxKxD, v_HxKxD, q_ids_Q, kv_ids_K):
        return kernel(q_HxQxD, k_HxKxD, v_HxKxD, segment_ids=splash.SegmentIds(q=q_ids_Q, kv=kv_ids_K))

    out_BxHxQxD = jax.vmap(one_row)(q_BxHxQxD, k_BxHxKxD, v_BxHxKxD, q_ids_BxQ, kv_ids_BxK)
    out_BxQxHxD = out_BxHxQxD.transpose(0, 2, 1, 3)[:, :q_len]
    # Splash masks with a large finite negative, so a query with no key (and padding, which matches the
    # zero-id padding keys) comes out as an average of values: finite, but it must read as zero.
    has_key_BxQ = _has_key(q_segment_ids_BxQ, kv_segment_ids_BxK)
    return jnp.where(has_key_BxQ[:, :, None, None], out_BxQxHxD, 0).astype(q_BxQxHxD.dtype)


# -------------------------------------------------------------------------------------------- cudnn


def _cudnn_attention(q_BxQxHxD, k_BxKxHxD, v_BxKxHxD, q_segment_ids_BxQ, kv_segment_ids_BxK):
    mask_BxQxK = segment_mask(q_segment_ids_BxQ, kv_segment_ids_BxK)
    has_key_BxQ = mask_BxQxK.any(axis=-1)
    # What cuDNN returns for a row with no allowed key is not specified (NaN would poison the backward
    # through dO.O); such rows attend everywhere instead and are zeroed below.
    kernel_mask_BxQxK = mask_BxQxK | ~has_key_BxQ[:, :, None]
    out_BxQxHxD = jax.nn.dot_product_attention(
        q_BxQxHxD, k_BxKxHxD, v_BxKxHxD, mask=kernel_mask_BxQxK[:, None], implementation="cudnn")
    return jnp.where(has_key_BxQ[:, :, None, None], out_BxQxHxD, 0).astype(q_BxQxHxD.dtype)
