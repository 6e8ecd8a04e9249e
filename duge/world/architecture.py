"""Configurations of the built-in model's parts, in the Stable Diffusion 1.x architecture.

The numbers follow ../shared/research/tiny-model-notes.md (a configuration measured to learn its
prompts on this CPU). Channel counts are multiples of 32 so that ComfyUI's own UNet and VAE
classes (GroupNorm with 32 groups) can hold the same weights.
"""

from __future__ import annotations

from .scenes import IMAGE_SIZE
from .tokenizer import MAX_LENGTH

LATENT_SIZE = IMAGE_SIZE // 2  # the VAE downsamples once: 32x32x3 -> 16x16x4
TEXT_WIDTH = 128
ATTENTION_HEADS = 4


def unet_config() -> dict:
    """`UNet2DConditionModel` keyword arguments."""
    return dict(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=ATTENTION_HEADS,  # diffusers' legacy name: the number of heads (as in SD 1.x)
        norm_num_groups=32,
        use_linear_projection=False,
    )


def text_encoder_config(vocab_size: int) -> dict:
    """`CLIPTextConfig` keyword arguments."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=ATTENTION_HEADS,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        projection_dim=TEXT_WIDTH,
    )


def vae_config() -> dict:
    """`AutoencoderKL` keyword arguments (one downsampling: 32x32 -> 16x16x4)."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=IMAGE_SIZE,
    )


def scheduler_config() -> dict:
    """SD 1.x's noise schedule (so ComfyUI's standard sampling matches) with DDIM as the default sampler."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
