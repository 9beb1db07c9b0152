"""What every pretrained text encoder shares: a Hugging Face tokenizer and a frozen, lazily read param tree.

A pretrained encoder is frozen: its params come from the checkpoint folder (never from a training run's
checkpoints, never updated by the optimizer), so a run records only where they came from.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class HFTokenizer:
    """A `tokenizer.json` through the `tokenizers` library, with the model's own special tokens.

    `encode(text, max_len)` gives `[prefix..., body..., suffix...]` exactly as the model's post-processor
    frames a caption ([CLS] ... [SEP] for BERT, ... </s> for T5), cutting the body, never the special tokens,
    when the caption is too long. The empty caption (classifier-free guidance's unconditional text) is
    `prefix + suffix`, which `empty_ids` holds. Padding slots hold `pad_id` = 0 and are masked by segment ids,
    so the padding token's own id never matters.
    """

    pad_id = 0

    def __init__(self, path: str):
        from tokenizers import Tokenizer  # a Rust wheel; imported here so the byte-level default needs none
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file {path!r} does not exist")
        try:
            self._tokenizer = Tokenizer.from_file(path)
        except Exception as error:  # noqa: BLE001 - tokenizers raises plain Exception on a bad file
            raise ValueError(f"cannot read tokenizer {path}: {error}") from error
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.path = path
        self.vocab_size = self._tokenizer.get_vocab_size()
        framed = self._tokenizer.encode("a").ids
        body = self._tokenizer.encode("a", add_special_tokens=False).ids
        start = next(i for i in range(len(framed) - len(body) + 1) if framed[i:i + len(body)] == body)
        self.prefix = tuple(framed[:start])
        self.suffix = tuple(framed[start + len(body):])
        self.empty_ids = self.prefix + self.suffix

    def encode(self, text: str, max_len: int) -> np.ndarray:
        """int32 [n], n <= max_len, unpadded."""
        if not isinstance(text, str):
            raise TypeError(f"tokenizer.encode wants a str caption; got {type(text).__name__}: {text!r}")
        room = max_len - len(self.empty_ids)
        if room < 0:
            raise ValueError(f"max_len must hold the special tokens {self.empty_ids} (>= {len(self.empty_ids)}); "
                             f"got {max_len}")
        body = self._tokenizer.encode(text, add_special_tokens=False).ids[:room]
        return np.asarray([*self.prefix, *body, *self.suffix], np.int32)

    def decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1) if i != self.pad_id])


def abstract_params(module: nn.Module, length: int = 8):
    """A text encoder's params as ShapeDtypeStructs, boxes removed, nothing allocated: what a loader's
    tree must match exactly (`soraax.weights.check_tree`)."""
    tokens = jnp.zeros((1, length), jnp.int32)
    return nn.meta.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), tokens, tokens + 1)["params"])


@dataclasses.dataclass(frozen=True)
class PretrainedText:
    """A pretrained text encoder ready to use: module, tokenizer, and its params as a tree of
    `soraax.weights.LazyTensor` (read when placed, so each host reads only its shards)."""
    module: nn.Module        # (text_tokens [B, L], text_segment_ids [B, L]) -> states [B, L, width]
    tokenizer: HFTokenizer
    params: Any
    width: int
    folder: str
