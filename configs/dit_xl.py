"""DiT-XL/2-sized video model (Peebles & Xie: 28 layers, 1152 wide, 16 heads; 1x2x2 patches) on the big
causal VAE (4x8x8 compression, 16 latent channels).

    python -m soraax.train --config configs/dit_xl.py --dry_run           # sizes and FLOPs, nothing allocated
    python -m soraax.train --config configs/dit_xl.py --workdir runs/xl --config.vae.checkpoint=runs/vae_big

On TPU set --config.model.attn_impl=splash; on NVIDIA GPUs cudnn.
"""
import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.task = "dit"
    c.seed = 0
    c.total_steps = 400_000
    c.batch_size = 256           # packed rows per global batch
    c.seq_len = 4096             # video tokens per packed row: e.g. three 17-frame 256x256 clips
    c.text_len = 2048            # caption bytes per packed row
    c.max_segments = 32
    c.learning_rate = 1e-4
    c.warmup_steps = 5_000
    c.weight_decay = 0.0
    c.grad_clip = 1.0
    c.ema_decay = 0.9999
    c.log_every = 100
    c.checkpoint_every = 2_000
    c.keep_checkpoints = 3
    c.max_nonfinite_steps = 20           # non-finite losses/gradients in a row (each skipped) before the run stops
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, context=1, tensor=1))
    # Multi-slice: slices each axis spans over the data-center network (the sizes above are per slice).
    c.mesh.dcn = ml_collections.ConfigDict(dict(data=1, fsdp=1, context=1, tensor=1))

    c.model = ml_collections.ConfigDict()
    c.model.width = 1152
    c.model.depth = 28
    c.model.heads = 16
    c.model.mlp_ratio = 4.0
    c.model.patch_size = (1, 2, 2)
    c.model.attn_impl = "chunked"        # memory-safe anywhere; splash on TPU, cudnn on GPU are faster
    c.model.remat_policy = "dots_no_batch"
    c.model.scan_layers = True
    c.model.dtype = "bfloat16"
    c.model.matmul_dtype = "bfloat16"    # the DiT's matmul operands, summed in float32 (soraax/matmul.py)
    c.model.text_width = 512             # byte-level encoder; a pretrained encoder replaces it at scale
    c.model.text_depth = 4
    c.model.text_heads = 8
    c.model.text_encoder = "bytes"      # bytes (trained) | bert | t5 (pretrained, frozen; soraax/text/encoders.py)
    c.model.text_encoder_path = ""       # a local Hugging Face folder; empty with bert: the bundled MiniLM
    c.model.text_cache = False           # frozen encoders: encode each caption once in the pipeline
    c.model.text_layers = (-1,)          # bert: hidden states fed to the DiT, concatenated (0: embeddings, -1: last)
    c.model.pooled_text = False          # True: the caption's mean embedding also joins adaLN (SD3)
    c.model.cross_attn = True            # False: pooled_text alone conditions (DiT's class embedding); needs it
    c.model.adaln_slots = True           # adaLN per (clip, t) of a row, not per token: same function, fewer FLOPs
    c.model.local_attention = True       # self-attention skips blocks no clip reaches (data.token_budget); exact

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.t_mean = 0.0
    c.diffusion.t_std = 1.0
    c.diffusion.base_tokens = 1024       # a 17-frame 256x256 clip's 1280 tokens get alpha ~1.1
    c.diffusion.text_dropout = 0.1
    c.diffusion.sample_steps = 50
    c.diffusion.guidance = 6.0

    c.vae = ml_collections.ConfigDict()
    c.vae.checkpoint = ""
    c.vae.widths = (128, 256, 512, 512)
    c.vae.num_res_blocks = 2
    c.vae.latent_channels = 16
    c.vae.spatial_factor = 8
    c.vae.temporal_factor = 4
    c.vae.norm_groups = 32
    c.vae.norm = "group"
    c.vae.patch_size = 1
    c.vae.shortcuts = False
    c.vae.train_steps = 200_000
    c.vae.learning_rate = 1e-4
    c.vae.batch_size = 32
    c.vae.crop = (17, 256, 256)
    c.vae.kl_weight = 1e-6

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"          # for real runs: folder (data.manifest) or tfds (data.tfds_dir/name)
    c.data.manifest = ""
    c.data.tfds_dir = ""
    c.data.tfds_name = ""
    c.data.num_examples = 1_000_000
    c.data.token_budget = 4096
    c.data.max_frames = 129
    c.data.detailed_caption_rate = 0.9
    # Clips trained with frames given clean (t = 0, no loss), so one model also does image->video,
    # extension both ways and connecting clips (soraax/data/conditioning.py); the rest is text->video.
    c.data.cond_first_frame_rate = 0.1
    c.data.cond_past_frames_rate = 0.1
    c.data.cond_future_frames_rate = 0.05
    c.data.cond_ends_rate = 0.05
    c.data.packing = "best_fit"
    c.data.packing_bins = 64
    c.data.workers = 16
    return c
