"""Text for conditioning: a byte-level tokenizer and a small transformer encoder over packed captions.

Both run without downloads, which is what tests, the tiny config and offline machines need. Captions are
PACKED like the video: several share one row of `text_tokens`, told apart by `text_segment_ids` (0 =
padding), exactly as Grain's packer emits them; segment k of the text belongs to segment k of the video.
The encoder is exact under packing: each caption's states are those it would get alone in a row.

Dimension key:
  B batch   L text length (a packed row)   D width   H heads   K head dim (D / H)   F mlp width
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from soraax.attention import IMPLS
from soraax.layers import Mlp, MultiHeadAttention
from soraax.packing import positions_from_segment_ids
from soraax.text.rows import check_rows


class ByteTokenizer:
    """UTF-8 bytes as tokens: id 0 pads, then BOS and EOS, then the 256 byte values.

    A caption encodes to `[BOS, bytes..., EOS]`; the empty caption to `[BOS, EOS]`, so every clip has at
    least one text token and the unconditional text of classifier-free guidance is simply `encode("")`.
    """

    pad_id = 0
    bos_id = 1
    eos_id = 2
    num_special = 3
    empty_ids = (bos_id, eos_id)
    vocab_size = num_special + 256

    def encode(self, text: str, max_len: int) -> np.ndarray:
        """int32 [n], n <= max_len, unpadded; a long caption is cut (at a character boundary) before EOS."""
        if not isinstance(text, str):
            raise TypeError(f"ByteTokenizer.encode wants a str caption; got {type(text).__name__}: {text!r}")
        if max_len < 2:
            raise ValueError(f"max_len must hold at least BOS and EOS (>= 2); got {max_len}")
        data = text.encode("utf-8")
        cut = min(len(data), max_len - 2)
        # Never end inside a multi-byte character: a continuation byte (0b10xxxxxx) at the cut means the
        # character before it is incomplete.
        while 0 < cut < len(data) and data[cut] & 0xC0 == 0x80:
            cut -= 1
        body = np.frombuffer(data[:cut], dtype=np.uint8).astype(np.int32) + self.num_special
        return np.concatenate([[self.bos_id], body, [self.eos_id]]).astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The caption of one id sequence; padding and BOS are skipped, EOS ends it."""
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}); "
                             f"got min {ids.min()}, max {ids.max()}")
        data = bytearray()
        for token in ids.tolist():
            if token == self.eos_id:
                break
            if token >= self.num_special:
                data.append(token - self.num_special)
        return data.decode("utf-8", errors="replace")

    def pad_batch(self, sequences: Sequence[np.ndarray], length: int) -> np.ndarray:
        """int32 [n, length]: each sequence followed by padding (id 0)."""
        batch = np.full((len(sequences), length), self.pad_id, np.int32)
        for i, ids in enumerate(sequences):
            if len(ids) > length:
                raise ValueError(f"sequence {i} has {len(ids)} tokens; more than the padded length {length}")
            batch[i, :len(ids)] = ids
        return batch


_ACTIVATION = ("batch", "text_length", "embed")


def _layer_norm(dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(dtype=dtype, name=name,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))


class TextBlock(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    heads: int
    mlp_ratio: float
    attn_impl: str = "xla"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD, segment_ids_BxL):
        h_BxLxD = _layer_norm(self.dtype, "attn_norm")(x_BxLxD)
        x_BxLxD = x_BxLxD + MultiHeadAttention(self.heads, self.attn_impl, self.dtype, _ACTIVATION, name="attn")(
            h_BxLxD, h_BxLxD, segment_ids_BxL, segment_ids_BxL)
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, _ACTIVATION)
        x_BxLxD = x_BxLxD + Mlp(int(x_BxLxD.shape[-1] * self.mlp_ratio), self.dtype, _ACTIVATION, name="mlp")(
            _layer_norm(self.dtype, "mlp_norm")(x_BxLxD))
        return nn.with_logical_constraint(x_BxLxD, _ACTIVATION)


class TextEncoder(nn.Module):
    """Packed captions -> per-token states for the DiT's cross-attention.

    text_tokens [B, L] int32, text_segment_ids [B, L] int32 -> text_states [B, L, width]; padding rows are 0.

    Positions are learned embeddings indexed by each token's place within its own caption
    (`positions_from_segment_ids`), so a caption reads the same wherever the packer put it. Learned rather
    than RoPE: captions are short and bounded by `max_len`, so nothing needs to extrapolate, and attention
    stays the plain segment-masked function shared with the DiT.
    """

    vocab_size: int = ByteTokenizer.vocab_size
    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    max_len: int = 128
    attn_impl: str = "xla"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, text_tokens, text_segment_ids):
        check_rows(text_tokens, text_segment_ids, self.max_len, "the byte encoder")
        if self.attn_impl not in IMPLS:
            raise ValueError(f"TextEncoder.attn_impl={self.attn_impl!r}; valid ones are {IMPLS}")

        def embed_init(axes):
            return nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), axes)

        token_BxLxD = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, name="token_embed",
                               embedding_init=embed_init(("vocab", "embed")))(text_tokens)
        position_BxLxD = nn.Embed(self.max_len, self.width, dtype=self.dtype, name="position_embed",
                                  embedding_init=embed_init(("text_length", "embed")))(
                                      positions_from_segment_ids(text_segment_ids))
        x_BxLxD = nn.with_logical_constraint(token_BxLxD + position_BxLxD, _ACTIVATION)
        for i in range(self.depth):
            x_BxLxD = TextBlock(self.heads, self.mlp_ratio, self.attn_impl, self.dtype, name=f"block_{i}")(
                x_BxLxD, text_segment_ids)
        x_BxLxD = _layer_norm(self.dtype, "final_norm")(x_BxLxD)
        x_BxLxD = jnp.where((text_segment_ids != 0)[:, :, None], x_BxLxD, 0).astype(self.dtype)
        return nn.with_logical_constraint(x_BxLxD, _ACTIVATION)
