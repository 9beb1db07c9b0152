"""Regenerates tests/data/wan (all but vae/): a tiny random Wan 2.1 text-to-video model in diffusers' layout,
and diffusers' outputs for fixed inputs.

Run with a Python that has torch, diffusers and transformers (never the project's venv; soraax imports no torch):

    /work/refenv/bin/python tests/data/wan/make_wan_reference.py [--soraax_python .venv/bin/python]

Writes:
    transformer/      WanTransformer3DModel.save_pretrained (config.json, diffusion_pytorch_model.safetensors)
    text_encoder/     UMT5EncoderModel.save_pretrained
    tokenizer/        a word-level tokenizer.json with T5's framing (tests/data/make_t5_reference.py's)
    reference.npz     per clip k: latent_k [C, F, H, W], timestep_k [F' * H' * W'] (per token, Wan's 0..1000
                      scale), velocity_k [C, F, H, W]; the caption's input_ids, umt5 states [L, text_dim];
                      velocity_0_padded: clip 0 with the states zero-padded to TEXT_PAD_LEN, as Wan's pipeline
    versions.json     library versions, seeds, the tiny configs, and the param count of the real 1.3B / 14B
                      configs (diffusers' own count, to hold soraax's --dry_run to)
With --soraax_python, it also has soraax export the tiny model back to a diffusers folder, loads that with
diffusers, and records in versions.json whether diffusers' output on it equals the reference (export_check).

Every weight is re-drawn after diffusers' initialisation: its norms start at 1 and its biases at 0, which would
not test that they load, and its zero-initialised nothing would hide a swapped shift and scale.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile

import diffusers
import numpy as np
import safetensors
import torch
import transformers
from diffusers import WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from make_t5_reference import VOCAB_SIZE, tiny_tokenizer  # noqa: E402 - the tokenizer the T5 tests use

SEED = 0
# head dim 12: RoPE gives t, h and w 4 dims each; ffn 40 is no multiple of the width (as the 1.3B's 8960).
TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                   out_channels=16, text_dim=32, freq_dim=16, ffn_dim=40, num_layers=2, cross_attn_norm=True,
                   qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
                   rope_max_seq_len=64)
TEXT_ENCODER = dict(vocab_size=VOCAB_SIZE, d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8,
                    feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                    relative_attention_max_distance=16, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                    decoder_start_token_id=0)
# Latent shapes [C, F, H, W] of the two clips: different in every axis, so a packed row holds two grids;
# 16 channels, as Wan and the tiny VAE of tests/data/wan/vae, so the folder is a whole (tiny) Wan model.
CLIPS = ((16, 3, 4, 6), (16, 2, 6, 4))
PROMPT = "a red cat runs under the blue sky"
TEXT_PAD_LEN = 16
# The published configs (diffusers' Wan-AI/Wan2.1-T2V-*-Diffusers transformer/config.json).
REAL = {"1.3b": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
        "14b": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40)}


def redraw(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("scale_shift_table"):
                param.copy_(0.5 * noise)
            elif param.ndim == 1 and ("norm" in name or "layer_norm" in name) and name.endswith("weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif param.ndim == 1:  # biases
                param.copy_(0.1 * noise)
            elif name.endswith(("shared.weight", "relative_attention_bias.weight")):
                param.copy_(noise)
            else:  # Linear [out, in] or Conv3d [out, in, kt, kh, kw]: unit-variance outputs
                param.copy_(noise / np.prod(param.shape[1:]) ** 0.5)


def real_param_count(sizes: dict) -> int:
    config = dict(TRANSFORMER, **sizes, in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
                  rope_max_seq_len=1024)
    with torch.device("meta"):
        model = WanTransformer3DModel(**config)
    return sum(p.numel() for p in model.parameters())


def run_transformer(model, latent, timestep, states):
    with torch.no_grad():
        out = model(hidden_states=torch.from_numpy(latent)[None], timestep=torch.from_numpy(timestep)[None],
                    encoder_hidden_states=torch.from_numpy(states)[None], return_dict=False)[0]
    return out[0].numpy()


def export_check(soraax_python: str, reference: dict) -> dict:
    """soraax loads transformer/, exports it again; diffusers must load the export and give the same output."""
    out = tempfile.mkdtemp()
    code = ("import sys; from soraax.wan import dit_weights as w; "
            "w.save_wan_transformer(sys.argv[2], w.load_wan_transformer(sys.argv[1]))")
    root = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    subprocess.run([soraax_python, "-c", code, os.path.join(HERE, "transformer"), out], check=True, cwd=root, env=env)
    try:
        model, how = WanTransformer3DModel.from_pretrained(out).eval(), "from_pretrained"
    except ValueError:
        # Without `accelerate` diffusers refuses from_pretrained for a model with fp32-kept modules; its config
        # loader and a strict state-dict load check the same thing: every name and shape, nothing left over.
        from safetensors.torch import load_file
        model = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(out)).eval()
        model.load_state_dict(load_file(os.path.join(out, "diffusion_pytorch_model.safetensors")), strict=True)
        how = "from_config + load_state_dict(strict=True) (from_pretrained needs accelerate, not installed)"
    errors = [float(np.abs(run_transformer(model, reference[f"latent_{k}"], reference[f"timestep_{k}"],
                                           reference["umt5_states"]) - reference[f"velocity_{k}"]).max())
              for k in range(len(CLIPS))]
    shutil.rmtree(out)
    return {"diffusers_loads_soraax_export": True, "loaded_with": how, "max_abs_error": max(errors)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--soraax_python", default="", help="a Python with soraax installed, for export_check")
    args = parser.parse_args()
    for sub in ("transformer", "text_encoder", "tokenizer"):
        shutil.rmtree(os.path.join(HERE, sub), ignore_errors=True)
    torch.manual_seed(SEED)

    transformer = WanTransformer3DModel(**TRANSFORMER).eval()
    redraw(transformer, SEED)
    transformer.save_pretrained(os.path.join(HERE, "transformer"), safe_serialization=True)
    text_encoder = UMT5EncoderModel(UMT5Config(**TEXT_ENCODER)).eval()
    redraw(text_encoder, SEED + 1)
    text_encoder.save_pretrained(os.path.join(HERE, "text_encoder"), safe_serialization=True)
    os.makedirs(os.path.join(HERE, "tokenizer"))
    tokenizer = tiny_tokenizer()
    tokenizer.save(os.path.join(HERE, "tokenizer", "tokenizer.json"))

    input_ids = np.asarray(tokenizer.encode(PROMPT).ids, np.int64)
    with torch.no_grad():
        states = text_encoder(input_ids=torch.from_numpy(input_ids)[None],
                              attention_mask=torch.ones(1, len(input_ids), dtype=torch.int64)).last_hidden_state[0]
    reference = {"input_ids": input_ids.astype(np.int32), "umt5_states": states.numpy()}
    rng = np.random.default_rng(SEED + 2)
    pt, ph, pw = TRANSFORMER["patch_size"]
    for k, shape in enumerate(CLIPS):
        _, f, h, w = shape
        latent = rng.standard_normal(shape).astype(np.float32)
        # Per-token timesteps on Wan's 0..1000 scale, multiples of 1000/16 so that soraax's t = timestep/1000
        # times 1000 gives back exactly these numbers; one frame held at 0 as an image->video condition would be.
        timestep = (rng.integers(1, 16, (f // pt, h // ph, w // pw)) * 62.5).astype(np.float32)
        timestep[0] = 0.0
        reference[f"latent_{k}"] = latent
        reference[f"timestep_{k}"] = timestep.reshape(-1)
        reference[f"velocity_{k}"] = run_transformer(transformer, latent, timestep.reshape(-1), states.numpy())
    # As Wan's pipeline conditions: the caption's states zero-padded (to 512 there, TEXT_PAD_LEN here), unmasked.
    padded = np.zeros((TEXT_PAD_LEN, states.shape[1]), np.float32)
    padded[:len(input_ids)] = states.numpy()
    reference["velocity_0_padded"] = run_transformer(transformer, reference["latent_0"], reference["timestep_0"],
                                                     padded)
    np.savez(os.path.join(HERE, "reference.npz"), **reference)

    record = {"torch": torch.__version__, "diffusers": diffusers.__version__,
              "transformers": transformers.__version__, "safetensors": safetensors.__version__,
              "numpy": np.__version__, "python": platform.python_version(), "date": datetime.date.today().isoformat(),
              "command": "python tests/data/wan/make_wan_reference.py --soraax_python .venv/bin/python",
              "seed": SEED, "transformer": TRANSFORMER, "text_encoder": TEXT_ENCODER, "clips": CLIPS,
              "prompt": PROMPT, "text_pad_len": TEXT_PAD_LEN,
              "param_count": {name: real_param_count(sizes) for name, sizes in REAL.items()}}
    if args.soraax_python:
        record["export_check"] = export_check(args.soraax_python, reference)
    with open(os.path.join(HERE, "versions.json"), "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
