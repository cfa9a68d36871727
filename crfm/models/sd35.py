"""Stable Diffusion 3.5 medium's transformer config (its `transformer/config.json`), for sizing and real-size tests.

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
