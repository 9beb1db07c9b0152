"""Wan 2.1 text-to-video 1.3B (Wan team 2025) as a soraax run: the DiT shaped to load its open weights, UMT5-XXL
as the frozen text encoder, Wan's 4x8x8 VAE with 16 latent channels, 1x2x2 patches.

    python -m soraax.train --config configs/wan21_t2v_1_3b.py --dry_run       # 1,418,996,800 DiT params
    python -m soraax.train --config configs/wan21_t2v_1_3b.py --workdir runs/wan13 \\
        --config.init_from=/data/Wan2.1-T2V-1.3B-Diffusers                   # fine-tune from the open weights

`init_from` is a diffusers-format folder (transformer/, text_encoder/, tokenizer/, vae/) the user downloaded;
its transformer is checked tensor by tensor against model.* (soraax/wan/). Sampling follows Wan's settings
for 480p: 50 steps, guidance 5.0, flow shift 3.0 (diffusion.base_tokens makes an 81-frame 832x480 clip's
resolution shift exactly 3.0; Wan's own solver is UniPC, soraax's Euler).
"""
import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.task = "dit"
    c.seed = 0
    c.init_from = ""                     # a diffusers Wan 2.1 folder: the DiT (and text encoder) start from it
    c.total_steps = 20_000
    c.batch_size = 8                     # packed rows per global batch
    c.seq_len = 32_760                   # an 81-frame 832x480 clip: 21 x 30 x 52 patches
    c.text_len = 1024                    # caption tokens per packed row (Wan cuts a caption at 512)
    c.max_segments = 8                   # shorter clips and images pack into a row
    c.learning_rate = 1e-5               # fine-tuning a trained model
    c.warmup_steps = 500
    c.weight_decay = 0.0
    c.grad_clip = 1.0
    c.ema_decay = 0.999
    c.log_every = 50
    c.checkpoint_every = 1_000
    c.keep_checkpoints = 3
    c.max_nonfinite_steps = 20
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, context=1, tensor=1))
    c.mesh.dcn = ml_collections.ConfigDict(dict(data=1, fsdp=1, context=1, tensor=1))

    c.model = ml_collections.ConfigDict()
    # Wan's transformer/config.json: 12 heads of 128, 30 layers, FFN 8960, 256 timestep frequencies.
    c.model.width = 1536
    c.model.depth = 30
    c.model.heads = 12
    c.model.mlp_ratio = 4.0              # unused: mlp_dim is set
    c.model.mlp_dim = 8960
    c.model.freq_dim = 256
    c.model.patch_size = (1, 2, 2)
    c.model.modulation = "shared"        # Wan: one time projection for all blocks + a table per block
    c.model.qk_norm = True               # RMS norm of q and k across heads
    c.model.text_mlp = True              # caption projection 4096 -> 1536 -> 1536 (GELU-tanh between)
    c.model.pooled_text = False
    c.model.adaln_slots = True           # adaLN per (clip, t) of a row, not per token: same function, fewer FLOPs
    c.model.local_attention = True       # self-attention skips blocks no clip reaches (data.token_budget); exact
    c.model.attn_impl = "chunked"        # splash on TPU, cudnn on NVIDIA GPUs are faster
    c.model.remat_policy = "dots_no_batch"
    c.model.scan_layers = True
    c.model.dtype = "bfloat16"
    c.model.matmul_dtype = "bfloat16"    # the DiT's matmul operands, summed in float32 (soraax/matmul.py)
    c.model.text_width = 512             # text_encoder "bytes" only
    c.model.text_depth = 4
    c.model.text_heads = 8
    c.model.text_encoder = "t5"          # UMT5-XXL, frozen: init_from/text_encoder unless text_encoder_path
    c.model.text_encoder_path = ""
    c.model.text_encoder_shape = "umt5-xxl"  # with no folder yet: its shape, enough for --dry_run
    c.model.text_cache = True            # a 5.7B encoder: encode each caption once in the pipeline
    c.model.text_pad_len = 512           # sampling: captions' states zero-padded to 512 and attended, as Wan's
                                         # pipeline does (its weights expect it); 0 masks the padding

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.t_mean = 0.0
    c.diffusion.t_std = 1.0
    c.diffusion.base_tokens = 3_640      # 32760 tokens -> shift sqrt(32760 / 3640) = 3.0, Wan's 480p flow shift
    c.diffusion.text_dropout = 0.1
    c.diffusion.sample_steps = 50
    c.diffusion.guidance = 5.0

    c.vae = ml_collections.ConfigDict()
    c.vae.checkpoint = ""                # Wan's VAE: init_from/vae (soraax/wan/vae_weights.py)
    # Wan 2.1's VAE layout (soraax.vae.VAE_WAN21; load_wan_vae builds the same module from vae/config.json),
    # so what is built from this config alone is the real VAE; with init_from, config.validate checks each
    # key against the folder's vae/config.json.
    c.vae.widths = (96, 192, 384, 384)   # Wan's base 96 x (1, 2, 4, 4)
    c.vae.num_res_blocks = 2             # encoder; the decoder has one more a level (decoder_res_blocks)
    c.vae.decoder_res_blocks = 3
    c.vae.latent_channels = 16
    c.vae.spatial_factor = 8
    c.vae.temporal_factor = 4
    c.vae.temporal_stages = (False, True, True)  # time halves at the two lowest-resolution down stages
    c.vae.norm_groups = 1
    c.vae.norm = "rms"
    c.vae.norm_eps = 0.0                 # Wan's RMS norm is F.normalize: no epsilon
    c.vae.time_padding = "zeros"         # causal convs pad the past with zeros, not the first frame
    c.vae.resample = "separable"         # per-frame 2D resampling plus a separate temporal conv
    c.vae.mid_attention = True
    c.vae.quant_convs = True
    c.vae.patch_size = 1
    c.vae.shortcuts = False
    c.vae.train_steps = 1
    c.vae.learning_rate = 1e-4
    c.vae.batch_size = 1
    c.vae.crop = (17, 256, 256)
    c.vae.kl_weight = 1e-6

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"          # for real runs: folder (data.manifest) or tfds (data.tfds_dir/name)
    c.data.manifest = ""
    c.data.tfds_dir = ""
    c.data.tfds_name = ""
    c.data.num_examples = 1_000_000
    c.data.token_budget = 32_760
    c.data.max_frames = 81
    c.data.detailed_caption_rate = 0.9   # Wan was trained on long, dense captions
    c.data.cond_first_frame_rate = 0.0   # Wan 2.1 T2V is text-to-video only
    c.data.cond_past_frames_rate = 0.0
    c.data.cond_future_frames_rate = 0.0
    c.data.cond_ends_rate = 0.0
    c.data.packing = "best_fit"
    c.data.packing_bins = 64
    c.data.workers = 16
    return c
