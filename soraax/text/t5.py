"""T5 / mT5 / UMT5 encoders over packed captions, loaded from a user's local Hugging Face checkpoint.

One module covers the three families a video model is conditioned on:
  T5 v1.0 (t5-small ... t5-11b)       ReLU FFN (`wi`, `wo`); one relative-bias table, layer 0's, used by all
  T5 v1.1, mT5, Flan-T5               gated-GELU FFN (`wi_0`, `wi_1`, `wo`), GELU's tanh form (HF "gelu_new")
  UMT5 (umt5-xxl, as in Wan)          gated-GELU, and its own relative-bias table in every layer
What sets T5 apart from the usual transformer, each a way to get a port subtly wrong: RMS norm (no mean, no
bias), no biases in any Dense, no 1/sqrt(head_dim) on the logits (Mesh TensorFlow folded it into q's
initialisation), no position embeddings (a learned per-head bias of the bucketed relative position is added
to the logits instead), and d_model need not equal heads * d_kv.

Packed like every encoder here: buckets come from each token's position within its own caption and
attention is masked by segment, so each caption's states equal those HF's T5EncoderModel gives it alone.

Dimension key:
  B batch   L text length (a packed row)   D width (d_model)   H heads   K head dim (d_kv)   F mlp width (d_ff)
  HK heads * head dim (the width of q, k, v)   N relative position buckets
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from soraax import weights
from soraax.packing import positions_from_segment_ids
from soraax.text.pretrained import HFTokenizer, PretrainedText, abstract_params
from soraax.text.rows import check_rows

FFNS = ("relu", "gated-gelu")
# HF's default feed_forward_proj when config.json omits it: T5Config's is "relu", MT5's and UMT5's "gated-gelu".
MODEL_TYPES = {"t5": "relu", "mt5": "gated-gelu", "umt5": "gated-gelu"}
_ACTIVATION = ("batch", "text_length", "embed")


def _dense(features: int, kernel_axes: tuple[str, str], dtype, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=False, dtype=dtype, name=name,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), kernel_axes))


def _rms_norm(epsilon: float, dtype, name: str) -> nn.RMSNorm:
    # Flax's RMSNorm takes the mean square in float32 (at least) whatever the input dtype, as HF's T5LayerNorm.
    return nn.RMSNorm(epsilon=epsilon, dtype=dtype, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)))


def relative_position_buckets(relative_position, num_buckets: int, max_distance: int):
    """int32 bucket of each relative position (key position - query position), exactly HF's
    `T5Attention._relative_position_bucket(bidirectional=True)`.

    Half the buckets are for keys after the query. Within a half, distances below a quarter of the buckets
    each get their own bucket; longer ones share log-spaced bins, the last holding everything from
    `max_distance` on.
    """
    half = num_buckets // 2
    max_exact = half // 2
    distance = jnp.abs(relative_position).astype(jnp.int32)
    # The same float32 operations in the same order as HF, so a distance on a bin's edge lands in the same bin;
    # max(., 1) keeps log(0) out of the branch that short distances do not take.
    log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact) / math.log(max_distance / max_exact)
    far = jnp.minimum(max_exact + (log_ratio * (half - max_exact)).astype(jnp.int32), half - 1)
    return jnp.where(relative_position > 0, half, 0) + jnp.where(distance < max_exact, distance, far)


class T5Attention(nn.Module):
    """Segment-masked self-attention with an additive logit bias and no logit scaling.

    x [B, L, D], bias [B, H, L, L] float32, segment ids [B, L] -> [B, L, D]. Written out rather than through
    `soraax.attention`, whose backends all scale by 1/sqrt(K) and take no bias; text rows are short.
    """
    heads: int
    head_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD, bias_BxHxLxL, segment_ids_BxL):
        inner = self.heads * self.head_dim

        def project(name):
            y_BxLxHK = _dense(inner, ("embed", "heads"), self.dtype, name)(x_BxLxD)
            return y_BxLxHK.reshape(*y_BxLxHK.shape[:-1], self.heads, self.head_dim)

        q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = project("query"), project("key"), project("value")
        logits_BxHxLxL = jnp.einsum("bqhk,bshk->bhqs", q_BxLxHxK, k_BxLxHxK,
                                    preferred_element_type=jnp.float32) + bias_BxHxLxL
        # Padding (id 0) attends to padding, so every row keeps at least itself and the softmax stays finite;
        # the encoder zeroes padding's states at the end.
        same_Bx1xLxL = (segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :])[:, None]
        probs_BxHxLxL = jax.nn.softmax(jnp.where(same_Bx1xLxL, logits_BxHxLxL, -jnp.inf), axis=-1)
        out_BxLxHxK = jnp.einsum("bhqs,bshk->bqhk", probs_BxHxLxL.astype(self.dtype), v_BxLxHxK,
                                 preferred_element_type=jnp.float32).astype(self.dtype)
        return _dense(x_BxLxD.shape[-1], ("heads", "embed"), self.dtype, "out")(
            out_BxLxHxK.reshape(*out_BxLxHxK.shape[:-2], inner))


class T5Mlp(nn.Module):
    """ReLU(x wi) wo (T5 v1.0), or (GELU_tanh(x wi_0) * x wi_1) wo (gated-gelu: T5 v1.1, mT5, UMT5)."""
    hidden: int
    ffn: str = "gated-gelu"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD):
        def dense_in(name):
            return _dense(self.hidden, ("embed", "mlp"), self.dtype, name)(x_BxLxD)

        if self.ffn == "relu":
            h_BxLxF = nn.relu(dense_in("wi"))
        else:
            h_BxLxF = nn.gelu(dense_in("wi_0"), approximate=True) * dense_in("wi_1")
        h_BxLxF = nn.with_logical_constraint(h_BxLxF, ("batch", "text_length", "mlp"))
        return _dense(x_BxLxD.shape[-1], ("mlp", "embed"), self.dtype, "wo")(h_BxLxF)


class T5Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)); the relative bias comes from the encoder."""
    heads: int
    head_dim: int
    mlp: int
    ffn: str = "gated-gelu"
    epsilon: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD, bias_BxHxLxL, segment_ids_BxL):
        h_BxLxD = _rms_norm(self.epsilon, self.dtype, "attn_norm")(x_BxLxD)
        x_BxLxD = x_BxLxD + T5Attention(self.heads, self.head_dim, self.dtype, name="attn")(
            h_BxLxD, bias_BxHxLxL, segment_ids_BxL)
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, _ACTIVATION)
        h_BxLxD = _rms_norm(self.epsilon, self.dtype, "mlp_norm")(x_BxLxD)
        x_BxLxD = x_BxLxD + T5Mlp(self.mlp, self.ffn, self.dtype, name="mlp")(h_BxLxD)
        return nn.with_logical_constraint(x_BxLxD, _ACTIVATION)


class T5Encoder(nn.Module):
    """Packed captions -> T5's last hidden states [B, L, width] float32; padding rows are exactly 0.

    Defaults are google/t5-v1_1-small's. `per_layer_bias` is UMT5's: every layer learns its own bias table
    (`relative_bias_{i}`) where T5 shares layer 0's (`relative_bias`).
    """
    vocab_size: int = 32128
    width: int = 512
    depth: int = 8
    heads: int = 6
    head_dim: int = 64
    mlp: int = 1024
    ffn: str = "gated-gelu"
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    per_layer_bias: bool = False
    layer_norm_epsilon: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, text_tokens_BxL, text_segment_ids_BxL):
        check_rows(text_tokens_BxL, text_segment_ids_BxL)  # relative positions: any row length
        if self.ffn not in FFNS:
            raise ValueError(f"T5Encoder.ffn={self.ffn!r}; valid ones are {FFNS}")
        if jnp.dtype(self.dtype) == jnp.float16:
            # T5 v1.1's FFN activations exceed float16's range (HF clamps infs to limp along); bfloat16 is
            # what T5 was trained in.
            raise ValueError("T5Encoder does not run in float16 (its activations overflow); use bfloat16 or float32")

        x_BxLxD = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, name="token_embed",
                           embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                       ("vocab", "embed")))(text_tokens_BxL)
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, _ACTIVATION)
        positions_BxL = positions_from_segment_ids(text_segment_ids_BxL)
        # Pairs from different captions get a bucket too, but the segment mask drops them.
        buckets_BxLxL = relative_position_buckets(positions_BxL[:, None, :] - positions_BxL[:, :, None],
                                                  self.relative_attention_num_buckets,
                                                  self.relative_attention_max_distance)

        def relative_bias(name):
            # A [N, H] table is a few KB: replicated, whatever the heads count and the tensor axis.
            table = nn.Embed(self.relative_attention_num_buckets, self.heads, dtype=jnp.float32, name=name,
                             embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, None)))
            return table(buckets_BxLxL).transpose(0, 3, 1, 2)

        bias_BxHxLxL = None if self.per_layer_bias else relative_bias("relative_bias")
        for i in range(self.depth):
            if self.per_layer_bias:
                bias_BxHxLxL = relative_bias(f"relative_bias_{i}")
            x_BxLxD = T5Block(self.heads, self.head_dim, self.mlp, self.ffn, self.layer_norm_epsilon, self.dtype,
                              name=f"block_{i}")(x_BxLxD, bias_BxHxLxL, text_segment_ids_BxL)
        x_BxLxD = _rms_norm(self.layer_norm_epsilon, self.dtype, "final_norm")(x_BxLxD)
        x_BxLxD = jnp.where((text_segment_ids_BxL != 0)[:, :, None], x_BxLxD, 0).astype(jnp.float32)
        return nn.with_logical_constraint(x_BxLxD, _ACTIVATION)


# ------------------------------------------------------------------------------------------ loading


def t5_from_config(config: dict, *, dtype=jnp.float32, where: str = "config.json") -> T5Encoder:
    """The encoder a Hugging Face T5 / mT5 / UMT5 config.json describes."""
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{where}: model_type {model_type!r} is not one of {sorted(MODEL_TYPES)}")
    ffn = config.get("feed_forward_proj", MODEL_TYPES[model_type])
    if ffn not in FFNS:
        raise ValueError(f"{where}: feed_forward_proj {ffn!r} is not supported; T5 v1.0 uses 'relu', "
                         "T5 v1.1 / mT5 / UMT5 'gated-gelu'")
    missing = [k for k in ("vocab_size", "d_model", "num_layers", "num_heads", "d_kv", "d_ff") if k not in config]
    if missing:
        raise ValueError(f"{where}: missing {missing}, which a T5 config.json always has")
    return T5Encoder(vocab_size=config["vocab_size"], width=config["d_model"], depth=config["num_layers"],
                     heads=config["num_heads"], head_dim=config["d_kv"], mlp=config["d_ff"], ffn=ffn,
                     relative_attention_num_buckets=config.get("relative_attention_num_buckets", 32),
                     relative_attention_max_distance=config.get("relative_attention_max_distance", 128),
                     per_layer_bias=model_type == "umt5",
                     layer_norm_epsilon=config.get("layer_norm_epsilon", 1e-6), dtype=dtype)


# Published encoder shapes, for describing a run before its weights are downloaded (no tokenizer, no params).
SHAPES = {
    # google/umt5-xxl's encoder, Wan 2.1's text encoder (its text_encoder/config.json).
    "umt5-xxl": {"model_type": "umt5", "vocab_size": 256384, "d_model": 4096, "num_layers": 24, "num_heads": 64,
                 "d_kv": 64, "d_ff": 10240, "feed_forward_proj": "gated-gelu",
                 "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128},
}


def shape_only_t5(name: str, *, dtype=jnp.float32) -> PretrainedText:
    if name not in SHAPES:
        raise ValueError(f"text encoder shape {name!r} is not one of {sorted(SHAPES)}")
    module = t5_from_config(SHAPES[name], dtype=jnp.dtype(dtype), where=f"shape {name!r}")
    return PretrainedText(module=module, tokenizer=None, params=None, width=module.width, folder=f"<shape {name}>")


def _t5_params(taker: weights.Taker, module: T5Encoder, embed_name: str) -> dict:
    """HF T5EncoderModel tensor names -> this module's params (Linear weights [out, in] -> kernels [in, out])."""
    d, f, inner = module.width, module.mlp, module.heads * module.head_dim

    def dense(name, n_in, n_out):
        return {"kernel": taker.take(f"{name}.weight", (n_in, n_out), transform=lambda w: w.T,
                                     source_shape=(n_out, n_in))}

    def norm(name):
        return {"scale": taker.take(f"{name}.weight", (d,))}

    def bias_table(i):
        return {"embedding": taker.take(f"encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight",
                                        (module.relative_attention_num_buckets, module.heads))}

    params = {"token_embed": {"embedding": taker.take(embed_name, (module.vocab_size, d))},
              "final_norm": norm("encoder.final_layer_norm")}
    if module.per_layer_bias:
        params.update({f"relative_bias_{i}": bias_table(i) for i in range(module.depth)})
    else:
        params["relative_bias"] = bias_table(0)
    for i in range(module.depth):
        attn, ff = f"encoder.block.{i}.layer.0.", f"encoder.block.{i}.layer.1."
        sa, mlp = attn + "SelfAttention.", ff + "DenseReluDense."
        wi = ({"wi": dense(mlp + "wi", d, f)} if module.ffn == "relu" else
              {"wi_0": dense(mlp + "wi_0", d, f), "wi_1": dense(mlp + "wi_1", d, f)})
        params[f"block_{i}"] = {
            "attn_norm": norm(attn + "layer_norm"),
            "attn": {"query": dense(sa + "q", d, inner), "key": dense(sa + "k", d, inner),
                     "value": dense(sa + "v", d, inner), "out": dense(sa + "o", inner, d)},
            "mlp_norm": norm(ff + "layer_norm"),
            "mlp": {**wi, "wo": dense(mlp + "wo", f, d)},
        }
    return params


def find_tokenizer(folder: str) -> str:
    """`tokenizer.json` in the folder, or in a sibling `tokenizer/` (diffusers: text_encoder/ beside tokenizer/)."""
    sibling = os.path.join(os.path.dirname(os.path.abspath(folder)), "tokenizer")
    places = (folder, sibling)
    for place in places:
        if os.path.isfile(os.path.join(place, "tokenizer.json")):
            return os.path.join(place, "tokenizer.json")
    spiece = [os.path.join(p, "spiece.model") for p in places if os.path.isfile(os.path.join(p, "spiece.model"))]
    if spiece:
        raise FileNotFoundError(
            f"{spiece[0]} is a SentencePiece model; soraax reads the fast tokenizer's tokenizer.json instead. "
            f"Write it once with transformers: AutoTokenizer.from_pretrained(p).save_pretrained(p) "
            f"with p = {os.path.dirname(spiece[0])!r}")
    raise FileNotFoundError(f"no tokenizer.json in {folder} nor in {sibling}")


def load_t5_encoder(folder: str, *, dtype=jnp.float32) -> PretrainedText:
    """A Hugging Face T5 / mT5 / UMT5 folder (config.json, *.safetensors; tokenizer.json there or in
    ../tokenizer/). Params are lazy (read when placed)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"T5 folder {folder!r} does not exist")
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{folder} holds no config.json (a Hugging Face T5 folder has config.json and "
                                "model.safetensors, as save_pretrained writes them)")
    with open(config_path) as f:
        module = t5_from_config(json.load(f), dtype=dtype, where=config_path)
    taker = weights.Taker(folder)
    # The encoder's embedding is tied to `shared` (HF saves only the tie's source, `shared.weight`, but older
    # exports hold `encoder.embed_tokens.weight` too, or only it): take one and ignore the other copy.
    embed_names = ("shared.weight", "encoder.embed_tokens.weight")
    embed_name = next((n for n in embed_names if taker.has(n)), None)
    if embed_name is None:
        raise weights.WeightsError(f"{folder}: the token embedding is missing: neither of {list(embed_names)} "
                                   "is in its safetensors files")
    params = _t5_params(taker, module, embed_name)
    # A full T5ForConditionalGeneration / UMT5Model folder also holds the decoder and the LM head, which an
    # encoder has no use for.
    taker.check_all_used(ignore=lambda n: n in embed_names or n.startswith(("decoder.", "lm_head.")))
    weights.check_tree(params, abstract_params(module), folder)
    tokenizer = HFTokenizer(find_tokenizer(folder))
    if tokenizer.vocab_size > module.vocab_size:
        # An id past the table would be clamped by the gather, silently: refuse the pair instead.
        raise ValueError(f"{tokenizer.path} has {tokenizer.vocab_size} tokens, more than the model's vocab_size "
                         f"{module.vocab_size} in {config_path}: they are not from the same model")
    return PretrainedText(module=module, tokenizer=tokenizer, params=params, width=module.width, folder=folder)
