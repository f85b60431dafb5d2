"""A made B4M adapter is an ordinary diffusers LoRA: load it with plain diffusers, no b4m needed.

    python examples/load_in_diffusers.py --lora runs/b4m/b4m --model stabilityai/stable-diffusion-xl-base-1.0 \
        --prompt "a snq teddybear made from w@z paper cutout art style"

`--model tiny` rebuilds b4m's offline random model (its images are noise): the one line that imports b4m.
"""
import argparse
import sys
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--lora", required=True, help="a folder holding pytorch_lora_weights.safetensors, e.g. runs/b4m/b4m")
p.add_argument("--model", default="stabilityai/stable-diffusion-xl-base-1.0", help="the base model the run used")
p.add_argument("--prompt", default="a snq object in w@z style")
p.add_argument("--steps", type=int, default=25)
p.add_argument("--out", default="b4m.png")
args = p.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
if args.model == "tiny":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from b4m import tiny_pipeline

    pipe = tiny_pipeline("sd")
else:
    pipe = DiffusionPipeline.from_pretrained(args.model, dtype=torch.float16 if device == "cuda" else torch.float32)
pipe.to(device)
pipe.load_lora_weights(args.lora)  # lora_B = U = [A; B], lora_A = V = [C, D], scale 1
pipe.fuse_lora()  # W0 + U V folded into the weights: sampling costs what the base model costs
size = pipe.unet.config.sample_size * pipe.vae_scale_factor
image = pipe(args.prompt, num_inference_steps=args.steps, height=size, width=size,
             generator=torch.Generator(device).manual_seed(0)).images[0]
image.save(args.out)
print(f"wrote {args.out}")
