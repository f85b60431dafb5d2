"""
Tiny random pipelines: SD, SDXL, SD3 and FLUX with the real diffusers classes and a few thousand
weights each. Their images are noise; they exist so the whole method runs offline in seconds, for
the tests and for trying flags. Saved with save_pretrained, they load through the same
`from_pretrained` path as a hub model.

    python examples/tiny.py sd runs/tiny-sd       # or sdxl, sd3, flux
A saved FLUX pipeline forgets its sample size: give the tiny FLUX --sample-resolution 64, or it
samples at FLUX.1's 1024 px.
    python b4m.py --model runs/tiny-sd --content examples/content --style examples/style \
        --rank 4 --resolution 64 --steps 20 --make-steps 10 --sample-steps 4 --out runs/try
"""
import sys

import torch

KINDS = ("sd", "sdxl", "sd3", "flux")


def tiny_pipeline(kind):
    """A small random pipeline of `kind`, the same in every process (seed 0), in eval mode (no
    dropout: one prompt always encodes the same), with a byte-level CLIP tokenizer in every
    tokenizer slot (T5's too): every byte is a token, so no vocabulary file is needed."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTextConfig, CLIPTokenizer

    torch.manual_seed(0)
    chars = sorted(ByteLevel.alphabet())
    words = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(words)}, merges=[],
                              model_max_length=77)
    text = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                          num_hidden_layers=2, vocab_size=len(words), projection_dim=32,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    pipe = (flow_pipeline if kind in ("sd3", "flux") else unet_pipeline)(kind, tokenizer, text)
    for part in pipe.components.values():
        if isinstance(part, torch.nn.Module):
            part.eval()
    return pipe


def unet_pipeline(kind, tokenizer, text):
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    sdxl = kind == "sdxl"
    xl = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
              projection_class_embeddings_input_dim=80, use_linear_projection=True)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64 if sdxl else 32, **(xl if sdxl else {}))
    vae = AutoencoderKL(block_out_channels=(16, 16, 16, 16), norm_num_groups=8, latent_channels=4,
                        sample_size=64, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", steps_offset=1,
                                       timestep_spacing="leading")
    parts = dict(vae=vae, unet=unet, scheduler=scheduler, text_encoder=CLIPTextModel(text),
                 tokenizer=tokenizer)
    if sdxl:
        return StableDiffusionXLPipeline(**parts, text_encoder_2=CLIPTextModelWithProjection(text),
                                         tokenizer_2=tokenizer)
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def flow_pipeline(kind, tokenizer, text):
    """SD3: two joint blocks, the last context_pre_only as in SD3. FLUX: one joint and one single
    block, guidance-distilled like FLUX.1 dev. 64 px: 8 x 8 latents from a VAE of scale 8."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                           FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    # shift and scale: those of diffusers' own tests (any nonzero values do)
    vae = AutoencoderKL(block_out_channels=(16, 16, 16, 16), norm_num_groups=8, latent_channels=4,
                        sample_size=64, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=64, d_kv=8,
                                 num_layers=2, num_heads=4))
    if kind == "flux":
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
            guidance_embeds=True, axes_dims_rope=[4, 4, 8])
        scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, shift=3.0)
        pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=CLIPTextModel(text),
                            tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer,
                            transformer=transformer)
        pipe.default_sample_size = 8  # 8 latents x 8 = 64 px (FLUX.1's own: 128 x 8 = 1024)
        return pipe
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
        pooled_projection_dim=64, out_channels=4)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=CLIPTextModelWithProjection(text), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(text), tokenizer_2=tokenizer,
        text_encoder_3=t5, tokenizer_3=tokenizer)


def main(argv):
    if len(argv) != 2 or argv[0] not in KINDS:
        print(f"usage: python examples/tiny.py {{{','.join(KINDS)}}} OUT_FOLDER", file=sys.stderr)
        return 2
    tiny_pipeline(argv[0]).save_pretrained(argv[1])
    print(f"wrote {argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
