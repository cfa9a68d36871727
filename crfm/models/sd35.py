"""Stable Diffusion 3.5 medium's configs (transformer, VAE, scheduler), for sizing, real-size tests and GPU checks.

No weights come with it: `SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER)` builds a randomly initialised model of
the real dimensions (2.24 B parameters; see docs/memory.md).
"""

SD35_MEDIUM_TRANSFORMER: dict = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),  # the first 13 blocks have the second (image-only) attention
    "qk_norm": "rms_norm",
}

# Stable Diffusion 3.5's VAE (its `vae/config.json`; SD3's, 8x down-sampling to 16 latent channels, 83.8 M
# parameters). `AutoencoderKL(**SD35_VAE)` builds it with random weights, e.g. to time encodes
# (bench/gpu_check.py).
SD35_VAE: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "force_upcast": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}

# SD3.5's scheduler (`scheduler/scheduler_config.json`): flow matching with a timestep shift of 3.
SD35_SCHEDULER: dict = {"num_train_timesteps": 1000, "shift": 3.0}
