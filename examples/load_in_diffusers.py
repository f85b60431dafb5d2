"""A made B4M adapter is an ordinary diffusers LoRA: load it with plain diffusers, no b4m needed.

    python examples/load_in_diffusers.py --lora runs/b4m/b4m \
        --model stabilityai/stable-diffusion-xl-base-1.0 \
        --prompt "a snq teddybear made from w@z paper cutout art style"

--model: the run's base model, a hub id or a save_pretrained folder (a run on a tiny test
pipeline, `python examples/tiny.py sd runs/tiny-sd`, passes that folder; its images are noise).
"""
import argparse

import torch
from diffusers import DiffusionPipeline

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--lora", required=True,
               help="a folder holding pytorch_lora_weights.safetensors, e.g. runs/b4m/b4m")
p.add_argument("--model", default="stabilityai/stable-diffusion-xl-base-1.0",
               help="the base model the run used")
p.add_argument("--prompt", default="a snq object in w@z style")
p.add_argument("--steps", type=int, default=25)
p.add_argument("--out", default="b4m.png")
args = p.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
# As b4m's --dtype auto: bf16 where the GPU has it (FLUX's and T5's activations overflow fp16).
dtype = torch.float32 if device == "cpu" else (
    torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
pipe = DiffusionPipeline.from_pretrained(args.model, dtype=dtype).to(device)
pipe.load_lora_weights(args.lora)  # lora_B = U = [A; B], lora_A = V = [C, D], scale 1
pipe.fuse_lora()  # W0 + U V folded into the weights: sampling costs what the base model costs
# No height or width: each pipeline samples at its model's own size.
image = pipe(args.prompt, num_inference_steps=args.steps,
             generator=torch.Generator(device).manual_seed(0)).images[0]
image.save(args.out)
print(f"wrote {args.out}")
