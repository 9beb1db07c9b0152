"""Does the DiT read each word of its caption? The loss gap when one attribute word is swapped.

Sampling and the analyser say whether prompts are followed; this says why not, and sooner: a held-out clip
is noised at a few fixed levels with fixed noise, and the DiT's velocity loss under its own caption is
compared with the loss under the same caption with one word changed (its colour, its shape, or its
direction for the opposite one: the left/right swap Sora is known for). A model that reads a word pays for
the wrong one; a model that ignores it scores both the same, and the gap is exactly 0. Same noise, same
clip, one word apart: the paired difference is far less noisy than sampled scores, so a few clips suffice.

Dimension key: N tokens of a clip, P patch dim, L caption tokens, T text width.
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from soraax import patches, sampling
from soraax.analyser import parse_caption
from soraax.data.synthetic import COLOURS, DIRECTIONS, SHAPES
from soraax.vae import encode_mean

ATTRIBUTES = ("colour", "shape", "direction")
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
NOISE_LEVELS = (0.9, 0.6, 0.3)


def _other(attribute: str, value: str) -> str:
    if attribute == "direction":
        return OPPOSITE[value]
    names = tuple(COLOURS) if attribute == "colour" else SHAPES
    return names[(names.index(value) + 1) % len(names)]


def swapped_captions(caption: str) -> dict[str, str]:
    """{attribute: the caption with that attribute's word replaced by another value}, for each attribute
    the caption names (an image's caption names no direction)."""
    read = parse_caption(caption)
    swapped = {}
    for attribute in ATTRIBUTES:
        value = read.get(attribute)
        if value:
            swapped[attribute] = re.sub(rf"\b{value}\b", _other(attribute, value), caption, count=1)
    return swapped


def _caption_inputs(run, caption: str):
    """(token ids, segment ids, attend ids), each [1, L], of one caption alone, as sampling lays it out."""
    ids = np.asarray(run.models.tokenizer.encode(caption, run.cfg.text_len), np.int32)
    pad = sampling.text_pad_len(run.cfg)
    tokens, segments, attend = (np.zeros((1, max(len(ids), pad)), np.int32) for _ in range(3))
    sampling.place_caption(ids, 1, 0, pad, tokens[0], segments[0], attend[0])
    return tokens, segments, attend


def _text_states_fn(run):
    text = run.models.text_encoder
    return jax.jit(lambda params, tokens, segments: text.apply({"params": params["text"]}, tokens, segments))


def _loss_fn(run):
    dit = run.models.dit

    @jax.jit
    def loss(params, x0_1xNxP, coords_1xNx3, noise_1xNxP, t, states_1xLxT, text_attend):
        n = x0_1xNxP.shape[1]
        x_t = (1.0 - t) * x0_1xNxP + t * noise_1xNxP
        v = dit.apply({"params": params["dit"]}, x_t, coords_1xNx3, jnp.ones((1, n), jnp.int32),
                      jnp.full((1, n), t), states_1xLxT, text_attend)
        return jnp.mean((v - (noise_1xNxP - x0_1xNxP)) ** 2)

    return loss


def caption_gaps(run, videos: Sequence[np.ndarray], captions: Sequence[str], *,
                 noise_levels: Sequence[float] = NOISE_LEVELS, seed: int = 0) -> dict:
    """Mean loss under each swapped caption minus the loss under the clip's own, per noise level.

    `videos` float32 [T, H, W, 3] in [-1, 1] at sizes the run samples; `captions` their short captions.
    Returns {"noise_levels", "loss" (own caption, per level), "colour"/"shape"/"direction": {"gap": per
    level, "stderr": per level, "num_clips"}}: a gap near 0 next to a clear colour gap says the model
    ignores that word.
    """
    if len(videos) != len(captions) or not videos:
        raise ValueError(f"caption_gaps needs as many captions as videos (>= 1); got {len(videos)} videos "
                         f"and {len(captions)} captions")
    encode_text, loss = _text_states_fn(run), _loss_fn(run)
    own = [[] for _ in noise_levels]
    gaps = {a: [[] for _ in noise_levels] for a in ATTRIBUTES}
    for i, (video, caption) in enumerate(zip(videos, captions)):
        latent = np.asarray(encode_mean(run.models.vae, run.vae_params, jnp.asarray(video, jnp.float32)[None]))[0]
        tokens_NxP, coords_Nx3 = patches.patchify(latent, run.models.patch_size)
        x0, coords = jnp.asarray(tokens_NxP)[None], jnp.asarray(coords_Nx3)[None]
        noise = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed), i), x0.shape, jnp.float32)
        variants = {"own": caption, **swapped_captions(caption)}
        inputs = {}
        for name, text in variants.items():  # each caption encoded once, for every noise level
            tokens, segments, attend = _caption_inputs(run, text)
            inputs[name] = (encode_text(run.params, tokens, segments), attend)
        for j, t in enumerate(noise_levels):
            losses = {name: float(loss(run.params, x0, coords, noise, jnp.float32(t), *inputs[name]))
                      for name in variants}
            own[j].append(losses["own"])
            for attribute in ATTRIBUTES:
                if attribute in losses:
                    gaps[attribute][j].append(losses[attribute] - losses["own"])
    result = {"noise_levels": [float(t) for t in noise_levels], "loss": [float(np.mean(x)) for x in own]}
    for attribute in ATTRIBUTES:
        per_level = gaps[attribute]
        result[attribute] = {
            "gap": [float(np.mean(x)) if x else None for x in per_level],
            "stderr": [float(np.std(x) / np.sqrt(len(x))) if len(x) > 1 else None for x in per_level],
            "num_clips": len(per_level[0])}
    return result
