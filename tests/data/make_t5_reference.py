"""Regenerates tests/data/t5: tiny random T5 / UMT5 encoders saved by Hugging Face, and their outputs.

Run with a Python that has torch and transformers (never the project's venv; nothing in soraax imports torch):

    python3 -m venv /work/refenv
    /work/refenv/bin/pip install "torch==2.13.0+cpu" transformers safetensors sentencepiece numpy
    /work/refenv/bin/python tests/data/make_t5_reference.py

Writes, for each model NAME in MODELS:
    t5/NAME/            what `save_pretrained(safe_serialization=True)` writes, plus a tiny `tokenizer.json`
    t5/NAME.npz         input_ids, attention_mask [B, L] and HF's last_hidden_state [B, L, D] (float32)
and t5/buckets.npz (HF's `_relative_position_bucket(bidirectional=True)` over relative positions -300..300 for
each bucket setting used) and t5/versions.json (library versions, date, command).

The weights are re-drawn after HF's initialisation: HF starts every norm scale at 1 (which would not test that
the scales load) and its tiny relative-bias table makes attention nearly uniform (which would barely test it).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import sys

import numpy as np
import safetensors
import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel
from transformers.models.t5.modeling_t5 import T5Attention

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "t5")
VOCAB_SIZE = 64
SPECIAL = ["<pad>", "</s>", "<unk>"]  # T5's ids: pad 0, eos 1, unk 2
WORDS = ("a the of in on with and under over near red blue green yellow white black small large tall "
         "square circle triangle cat dog bird car tree house river sky city night day rain snow sun moon "
         "runs jumps flies walks spins falls slowly quickly camera pans left right up down zooms video "
         "clip scene shot bright dark old new far").split()
LENGTH = 40  # > 8 exact buckets either side at the defaults, so the log-spaced buckets are exercised

# name -> (config class, model class, config kwargs, seed). d_kv * heads != d_model in t5_v1_0 on purpose.
MODELS = {
    "t5_v1_1": (T5Config, T5EncoderModel, dict(feed_forward_proj="gated-gelu", d_kv=8, num_heads=4,
                                               relative_attention_num_buckets=32,
                                               relative_attention_max_distance=128), 0),
    "t5_v1_0": (T5Config, T5EncoderModel, dict(feed_forward_proj="relu", d_kv=6, num_heads=4,
                                               relative_attention_num_buckets=16,
                                               relative_attention_max_distance=24), 1),
    "umt5": (UMT5Config, UMT5EncoderModel, dict(feed_forward_proj="gated-gelu", d_kv=8, num_heads=4,
                                                relative_attention_num_buckets=8,
                                                relative_attention_max_distance=16), 2),
}
BUCKET_SETTINGS = ((32, 128), (16, 24), (8, 16))


def tiny_tokenizer() -> Tokenizer:
    """Whitespace words -> ids, `</s>` appended: the framing of T5's SentencePiece tokenizer, in a few KB."""
    words = SPECIAL + WORDS
    assert len(words) == VOCAB_SIZE, f"{len(words)} tokens; the models have {VOCAB_SIZE}"
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", 1)])
    return tokenizer


def redraw(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "layer_norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith(("shared.weight", "relative_attention_bias.weight")):
                param.copy_(noise)
            elif name.endswith("SelfAttention.q.weight"):
                # T5's unscaled logits: q carries the 1/sqrt(d_kv), as Mesh TensorFlow's initialisation does, so
                # logits are O(1) and float32's rounding is not amplified by a needlessly sharp softmax.
                param.copy_(noise / (param.shape[1] * model.config.d_kv) ** 0.5)
            else:  # a Linear weight [out, in]: unit-variance outputs
                param.copy_(noise / param.shape[1] ** 0.5)


def inputs(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A full row and two shorter, right-padded ones, each ending in </s>, as a T5 tokenizer frames them."""
    rng = np.random.default_rng(seed)
    lengths = (LENGTH, 17, 5)
    input_ids = np.zeros((len(lengths), LENGTH), np.int64)
    attention_mask = np.zeros((len(lengths), LENGTH), np.int64)
    for row, n in enumerate(lengths):
        input_ids[row, :n - 1] = rng.integers(len(SPECIAL), VOCAB_SIZE, n - 1)
        input_ids[row, n - 1] = 1
        attention_mask[row, :n] = 1
    return input_ids, attention_mask


def main() -> None:
    shutil.rmtree(HERE, ignore_errors=True)
    os.makedirs(HERE)
    tokenizer = tiny_tokenizer()
    for name, (config_class, model_class, kwargs, seed) in MODELS.items():
        config = config_class(vocab_size=VOCAB_SIZE, d_model=32, d_ff=64, num_layers=2, dropout_rate=0.0,
                              pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **kwargs)
        model = model_class(config).eval()
        redraw(model, seed)
        folder = os.path.join(HERE, name)
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save(os.path.join(folder, "tokenizer.json"))
        input_ids, attention_mask = inputs(seed + 100)
        with torch.no_grad():
            states = model(input_ids=torch.from_numpy(input_ids),
                           attention_mask=torch.from_numpy(attention_mask)).last_hidden_state
        np.savez(os.path.join(HERE, f"{name}.npz"), input_ids=input_ids.astype(np.int32),
                 attention_mask=attention_mask.astype(np.int32), last_hidden_state=states.numpy())

    relative = torch.arange(-300, 301)
    buckets = {}
    for num_buckets, max_distance in BUCKET_SETTINGS:
        buckets[f"buckets_{num_buckets}_{max_distance}"] = T5Attention._relative_position_bucket(
            relative, bidirectional=True, num_buckets=num_buckets, max_distance=max_distance).numpy()
    np.savez(os.path.join(HERE, "buckets.npz"), relative_position=relative.numpy(), **buckets)

    with open(os.path.join(HERE, "versions.json"), "w") as f:
        json.dump({"torch": torch.__version__, "transformers": transformers.__version__,
                   "tokenizers": tokenizers.__version__, "safetensors": safetensors.__version__,
                   "numpy": np.__version__, "python": platform.python_version(),
                   "date": datetime.date.today().isoformat(),
                   "install": 'pip install "torch==2.13.0+cpu" transformers safetensors sentencepiece numpy',
                   "command": f"{os.path.basename(sys.executable)} tests/data/make_t5_reference.py",
                   "seeds": {name: spec[3] for name, spec in MODELS.items()}}, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
