"""Regenerates tests/data/wan/vae/ and vae_reference.npz: a tiny random Wan 2.1 VAE (diffusers'
AutoencoderKLWan) in diffusers' layout, with diffusers' outputs for fixed inputs.

Run with a Python that has torch and diffusers (never the project's venv; soraax imports no torch):

    /work/refenv/bin/python tests/data/wan/make_wan_vae_reference.py

Writes:
    vae/config.json, vae/diffusion_pytorch_model.safetensors   AutoencoderKLWan.save_pretrained, float32
    vae_reference.npz   every array in soraax's layout [B, T, H, W, C]:
        video [1, 9, 16, 24, 3], its posterior `mean` and clamped `logvar` [1, 3, 2, 3, 16];
        image [1, 1, 16, 24, 3] and `image_mean` [1, 1, 2, 3, 16];
        latent [1, 3, 2, 3, 16] (raw, before any latents_mean/std), `decoded_raw` (diffusers' decoder loop
        without the final clamp) and `decoded` (AutoencoderKLWan.decode, clamped to [-1, 1]) [1, 9, 16, 24, 3];
        `image_decoded_raw` [1, 1, 16, 24, 3] of latent frame 0 alone
    vae_shapes_wan21.json   name -> shape of every tensor of the real Wan 2.1 VAE (diffusers' default config,
                            Wan-AI/Wan2.1-T2V-*-Diffusers vae/), built on the meta device, and that config
    vae_versions.json   library versions, seed, the tiny config

Diffusers encodes frame 0 alone and then 4 frames at a time, and decodes one latent frame at a time, each conv
carrying a cache: the reference is that chunked computation, which soraax does over the whole clip. 9 frames
make one first chunk and two more; 16 x 24 keeps height and width apart.

The RMS norms' gammas start at 1 in diffusers, which would not test that they load: they are re-drawn.
"""

from __future__ import annotations

import datetime
import json
import os
import platform

import diffusers
import numpy as np
import safetensors
import torch
from diffusers import AutoencoderKLWan

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 0
# The real layout (dim_mult, time compressed at the last two stages, 16 latent channels and
# Wan 2.1's latent statistics, 4x8x8) at base_dim 4 instead of 96 and 1 res block instead of 2 (the
# names of the real one are checked against vae_shapes_wan21.json): 0.18M params, 0.72 MB.
TINY = dict(base_dim=4, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
            temperal_downsample=[False, True, True], dropout=0.0)


def to_soraax(x: torch.Tensor) -> np.ndarray:
    """[B, C, T, H, W] -> [B, T, H, W, C], float32."""
    return x.detach().permute(0, 2, 3, 4, 1).contiguous().numpy().astype(np.float32)


def decode_unclamped(vae: AutoencoderKLWan, z: torch.Tensor) -> torch.Tensor:
    """AutoencoderKLWan._decode's frame-by-frame loop without its final clamp, so that values outside
    [-1, 1] are compared too."""
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    outs = []
    for i in range(z.shape[2]):
        vae._conv_idx = [0]
        outs.append(vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                first_chunk=i == 0))
    vae.clear_cache()
    return torch.cat(outs, dim=2)


def main() -> None:
    torch.manual_seed(SEED)
    vae = AutoencoderKLWan(**TINY).eval()
    generator = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, param in vae.named_parameters():
            if name.endswith("gamma"):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
    folder = os.path.join(HERE, "vae")
    vae.save_pretrained(folder, safe_serialization=True)

    generator = torch.Generator().manual_seed(SEED + 2)
    video = torch.rand((1, 3, 9, 16, 24), generator=generator) * 2 - 1
    latent = torch.randn((1, 16, 3, 2, 3), generator=generator)
    with torch.no_grad():
        posterior = vae.encode(video).latent_dist
        image_posterior = vae.encode(video[:, :, :1]).latent_dist
        decoded = vae.decode(latent).sample
        decoded_raw = decode_unclamped(vae, latent)
        image_decoded_raw = decode_unclamped(vae, latent[:, :, :1])
    arrays = dict(video=video, mean=posterior.mean, logvar=posterior.logvar, image=video[:, :, :1],
                  image_mean=image_posterior.mean, latent=latent, decoded=decoded, decoded_raw=decoded_raw,
                  image_decoded_raw=image_decoded_raw)
    np.savez_compressed(os.path.join(HERE, "vae_reference.npz"), **{k: to_soraax(v) for k, v in arrays.items()})

    with torch.device("meta"):
        real = AutoencoderKLWan()
    with open(os.path.join(HERE, "vae_shapes_wan21.json"), "w") as f:
        json.dump({"config": {k: v for k, v in real.config.items() if not k.startswith("_")},
                   "shapes": {k: list(v.shape) for k, v in real.state_dict().items()}}, f, indent=1)
    with open(os.path.join(HERE, "vae_versions.json"), "w") as f:
        json.dump({"torch": torch.__version__, "diffusers": diffusers.__version__,
                   "safetensors": safetensors.__version__, "numpy": np.__version__,
                   "python": platform.python_version(), "date": datetime.date.today().isoformat(),
                   "command": "python tests/data/wan/make_wan_vae_reference.py", "seed": SEED, "vae": TINY,
                   "param_count": sum(p.numel() for p in vae.parameters()),
                   "real_param_count": sum(p.numel() for p in real.parameters())}, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
