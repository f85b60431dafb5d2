"""What does B4M's partly learnable projection (PLP) cost? A report, not a test: it always exits 0.

    python examples/benchmark.py [--rank 16] [--repeats 15] [--threads N] [--model ID_OR_FOLDER]

One process, one randomly initialised mid-size UNet and one mid-size FLUX-shaped transformer. In
each comparison the variants run round-robin (A, B, C, A, B, C, ...), so slow drifts of the
machine hit all of them alike, and each number is a median after warm-up. The ratios are the
result; absolute times are only context.
"""
import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

# set before transformers loads: no torchvision notices
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tiny.py, toyworld.py, beside this file
import b4m  # noqa: E402

LATENT, CROSS_DIM, SAMPLE_STEPS = 32, 256, 8
SPREADS = []  # (max - min) / median of every variant timed: the noise level the ratios must beat


def mid_unet():
    """Shaped like SD's UNet but small: one forward+backward at batch 1 takes 0.15-0.25 s on 2
    cores."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=LATENT, block_out_channels=(64, 128, 256), layers_per_block=1,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_DIM).requires_grad_(False)


def mid_flux():
    """Shaped like FLUX.1's transformer but small: 2 joint and 4 single blocks, width 512."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=64,
        num_attention_heads=8, joint_attention_dim=256, pooled_projection_dim=128,
        guidance_embeds=True, axes_dims_rope=[16, 24, 24]).requires_grad_(False)


def flux_inputs(transformer, latent, text_tokens=64):
    """Packed latents (latent/2 x latent/2 tokens of 64 channels), text, ids, timestep, guidance."""
    cfg, g = transformer.config, torch.Generator().manual_seed(0)
    side = latent // 2
    x = torch.randn(1, side * side, cfg.in_channels, generator=g)
    kw = dict(encoder_hidden_states=torch.randn(1, text_tokens, cfg.joint_attention_dim,
                                                generator=g),
              pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
              timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
              txt_ids=torch.zeros(text_tokens, 3), img_ids=torch.zeros(side * side, 3))
    return x, kw


def interleaved(runs, repeats, warmup=2):
    """runs: {name: fn that does its own untimed setup and returns the seconds it timed}."""
    times = {name: [] for name in runs}
    for i in range(warmup + repeats):
        for name, run in runs.items():
            elapsed = run()
            if i >= warmup:
                times[name].append(elapsed)
    SPREADS.extend((max(t) - min(t)) / statistics.median(t) for t in times.values())
    return {name: statistics.median(t) for name, t in times.items()}


def row(label, seconds, ratio, unit="x{:.3f}"):
    print(f"  {label:50} {seconds * 1e3:9.1f} ms   {unit.format(ratio)}")


def unet_inputs(unet, latent):
    """Random latents, timestep and text conditioning of the right shapes (SDXL's extra inputs
    too)."""
    cfg, g = unet.config, torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.in_channels, latent, latent, generator=g)
    kw = dict(timestep=torch.tensor([500]),
              encoder_hidden_states=torch.randn(1, 77, cfg.cross_attention_dim, generator=g))
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        size = 8.0 * latent
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=g),
                                   "time_ids": torch.tensor([[size, size, 0.0, 0.0, size, size]])}
    return x, kw


def fwd_bwd(unet, x, kw, params):
    def run():
        for p in params:
            p.grad = None  # fresh gradients every time, as after zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        unet(x, **kw).sample.square().mean().backward(inputs=params)
        return time.perf_counter() - t0
    return run


def fwd_bwd_section(unet, rank, repeats, latent, title, inputs=unet_inputs):
    """Frozen (gradient w.r.t. the input only: every activation gradient, no weight gradient, the
    floor no adapter can beat) vs peft LoRA vs PLP, on copies holding the same frozen weights."""
    from peft import LoraConfig

    lora, plp = copy.deepcopy(unet), copy.deepcopy(unet)
    lora.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(b4m.TARGETS)))
    lora_params = [p for p in lora.parameters() if p.requires_grad]
    layers = b4m.add_plp(plp, rank, seed=0)
    plp_params = [p for layer in layers.values() for p in (layer.B, layer.D)]
    x, kw = inputs(unet, latent)
    x_in = x.clone().requires_grad_(True)
    t = interleaved({"frozen": fwd_bwd(unet, x_in, kw, [x_in]),
                     "lora": fwd_bwd(lora, x, kw, lora_params),
                     "plp": fwd_bwd(plp, x, kw, plp_params)}, repeats)
    size = sum(p.numel() for p in unet.parameters()) / 1e6
    print(f"forward+backward, {title} ({size:.1f}M params), batch 1, latent {latent}x{latent}, "
          f"{len(layers)} adapted layers; ratio to frozen")
    row("frozen, gradient w.r.t. the input only", t["frozen"], 1.0)
    row(f"peft LoRA r={rank}, gradient into lora_A, lora_B", t["lora"], t["lora"] / t["frozen"])
    row(f"b4m PLP r={rank}, gradient into B, D", t["plp"], t["plp"] / t["frozen"])
    print(f"  {'PLP / peft LoRA':50} {'':12}   x{t['plp'] / t['lora']:.3f}")
    return t, lora_params, layers, plp_params


def optimizer_section(layers, params, t_plp, repeats):
    """One RiemannianAdamW step vs one AdamW step, the same B and D, the same fake gradients."""
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=g) * 1e-3 for p in params]
    riem, adamw = b4m.RiemannianAdamW(layers.values()), torch.optim.AdamW(params)

    def step(opt):
        def run():
            for p, grad in zip(params, grads):
                # a copy: RiemannianAdamW overwrites p.grad with its preconditioned value
                p.grad = grad.clone()
            t0 = time.perf_counter()
            opt.step()
            return time.perf_counter() - t0
        return run

    o = interleaved({"adamw": step(adamw), "riem": step(riem)}, repeats)
    added, share = o["riem"] - o["adamw"], "{:6.2f} %"
    print(f"\noptimizer step over the {len(params)} B, D tensors; share of one PLP "
          f"forward+backward")
    row("torch.optim.AdamW", o["adamw"], 100 * o["adamw"] / t_plp, share)
    row("b4m.RiemannianAdamW (precondition + AdamW)", o["riem"], 100 * o["riem"] / t_plp, share)
    row("added by preconditioning", added, 100 * added / t_plp, share)
    return riem, added / t_plp


def memory_section(riem, plp_params, lora_params, rank):
    """Trainable parameters and AdamW state after one step (Adam allocates its state at the
    first)."""
    peft_opt = torch.optim.AdamW(lora_params)
    for p in lora_params:
        p.grad = torch.zeros_like(p)
    peft_opt.step()

    def state_bytes(opt, keys=("exp_avg", "exp_avg_sq", "step")):
        return sum(v.numel() * v.element_size() for s in opt.state.values()
                   for k, v in s.items() if k in keys)

    moments = ("exp_avg", "exp_avg_sq")
    print(f"\n{f'memory at rank {rank}':52} {'PLP':>11} {'peft LoRA':>11}   PLP / LoRA")
    for label, a, b in [
            ("trainable parameters", sum(p.numel() for p in plp_params),
             sum(p.numel() for p in lora_params)),
            ("AdamW moments (exp_avg, exp_avg_sq), bytes", state_bytes(riem, moments),
             state_bytes(peft_opt, moments)),
            ("all state (moments + a 4-byte step each), bytes", state_bytes(riem),
             state_bytes(peft_opt))]:
        print(f"  {label:50} {a:11,d} {b:11,d}   {a / b:.6f}")
    return state_bytes(riem, moments), state_bytes(peft_opt, moments)


def sampling_section(unet, rank, repeats):
    """The tiny SD pipeline's VAE, tokenizer and scheduler, a 256-wide text encoder (to match the
    UNet's cross-attention) and the mid-size UNet: plain, and with a random rank-r LoRA fused in."""
    from diffusers import StableDiffusionPipeline
    from tiny import tiny_pipeline
    from transformers import CLIPTextModel

    tiny = tiny_pipeline("sd")
    text = copy.deepcopy(tiny.text_encoder.config)
    text.hidden_size, text.intermediate_size = CROSS_DIM, 2 * CROSS_DIM
    text.projection_dim = CROSS_DIM
    parts = {**tiny.components, "text_encoder": CLIPTextModel(text).eval()}
    base, fused = (StableDiffusionPipeline(**{**parts, "unet": copy.deepcopy(unet)},
                                           requires_safety_checker=False) for _ in range(2))
    # A drawn PLP (B = 0, A C and A D not zero) in diffusers' LoRA key layout.
    plp = b4m.adapter_of(b4m.add_plp(copy.deepcopy(unet), rank, seed=1))
    fused.load_lora_weights(b4m.diffusers_keys(plp, "unet"))
    fused.fuse_lora()
    latents = {}

    def sample(name, pipe):
        # Prompt encoding + denoising loop (CFG: batch 2 per step). The VAE decode is left out: it
        # costs the same in both and would only dilute the ratio.
        def run():
            t0 = time.perf_counter()
            with torch.no_grad():
                latents[name] = pipe("a photo of a dog", num_inference_steps=SAMPLE_STEPS,
                                     height=8 * LATENT, width=8 * LATENT,
                                     generator=torch.Generator().manual_seed(0),
                                     output_type="latent").images
            return time.perf_counter() - t0
        pipe.set_progress_bar_config(disable=True)
        return run

    s = interleaved({"base": sample("base", base), "fused": sample("fused", fused)}, repeats)
    print(f"\nsampling, {SAMPLE_STEPS} steps, CFG, {8 * LATENT}x{8 * LATENT} px, to latents (no "
          f"VAE decode); ratio to base")
    row("base pipeline", s["base"], 1.0)
    row(f"load_lora_weights(r={rank}) + fuse_lora()", s["fused"], s["fused"] / s["base"])
    change = (latents["fused"] - latents["base"]).abs().max().item()
    print(f"  (the fused LoRA changes the latents by up to {change:.3g}: it is really applied)")
    return s["fused"] / s["base"]


def checkpoint_section(riem, params, t_plp, repeats):
    """One checkpoint as b4m writes it (trainable halves, AdamW state, generator, 100 logged steps;
    serialised, fsynced, renamed), against the stage time between two checkpoints at the default
    interval: --checkpoint-every optimizer steps of --grad-accum forward+backward passes at
    least."""
    import tempfile

    every, accum = b4m.DEFAULTS["checkpoint_every"], b4m.DEFAULTS["grad_accum"]
    with tempfile.TemporaryDirectory() as tmp:
        def save():
            t0 = time.perf_counter()
            state = {"step": every, "log": [[i, 0.1, 0.1] for i in range(every)],
                     "params": [p.detach().cpu().clone() for p in params],
                     "optimizer": riem.state_dict(), "scaler": {},
                     "generator": torch.Generator().get_state(), "settings": {}, "seconds": 0.0}
            # as b4m's run_stage writes one: serialised to bytes, then written all or nothing
            data = b4m.to_bytes(lambda f: torch.save(state, f))
            b4m.write_file(Path(tmp) / b4m.CHECKPOINT, data)
            return time.perf_counter() - t0
        c = interleaved({"save": save}, repeats)["save"]
        size = (Path(tmp) / b4m.CHECKPOINT).stat().st_size
    share = c / (every * accum * t_plp)
    print(f"\ncheckpoint ({size / 1e6:.2f} MB) every {every} steps of {accum} forward+backward "
          f"passes")
    row("writing one checkpoint", c, 100 * share, "{:6.3f} % of the stage time, at most")
    return share


def sdxl_sizes(rank=64):
    """Adapter and checkpoint bytes for SDXL at the official rank, from the layer shapes of a
    weightless ('meta') UNet built from SDXL base 1.0's published UNet config: nothing is
    downloaded."""
    from toyworld import sdxl_unet_on_meta  # the same shapes as the toy world's regime table

    unet = sdxl_unet_on_meta()
    shapes = [(m.out_features, m.in_features) for n, m in unet.named_modules()
              if b4m.is_target(n, m)]
    trainable = sum((m - m // 2) * rank + rank * (n - n // 2) for m, n in shapes)  # B and D
    adapter = sum((m + n) * rank for m, n in shapes) * 4  # U and V in fp32
    checkpoint = 3 * trainable * 4  # B, D and AdamW's two moments, fp32
    print(f"\nSDXL at rank {rank}: {len(shapes)} adapted projections, {trainable / 1e6:.1f}M "
          f"trainable; adapter file {adapter / 1e6:.0f} MB (fp32), checkpoint "
          f"{checkpoint / 1e6:.0f} MB + a few KB (generator, log)")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=15,
                   help="timed runs per variant, after 2 warm-up runs")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--model", help="also time this pipeline's UNet, forward+backward only "
                                   "(folder or hub id)")
    p.add_argument("--model-latent", type=int, default=32,
                   help="latent size for --model (default 32)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    started, r = time.perf_counter(), args.rank
    import diffusers
    import peft

    # "no LoRA keys for the text encoder": none are meant to be
    diffusers.utils.logging.set_verbosity_error()
    print("$ python " + " ".join(sys.argv))
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}, "
          f"b4m {b4m.__version__}; {args.threads} threads, rank {r}, median of {args.repeats} "
          f"after 2 warm-up")
    # A second busy process on these cores skews ratios by 10-30% and times by up to 30x: see the
    # spread at the end.
    print(f"1-minute load average before the start: {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores\n")

    unet = mid_unet()
    t, lora_params, layers, plp_params = fwd_bwd_section(unet, r, args.repeats, LATENT,
                                                         "mid-size UNet")
    riem, added = optimizer_section(layers, plp_params, t["plp"], args.repeats)
    m_plp, m_lora = memory_section(riem, plp_params, lora_params, r)
    fused = sampling_section(unet, r, args.repeats)
    checkpoint = checkpoint_section(riem, plp_params, t["plp"], args.repeats)
    print()
    flux = mid_flux()
    tf, _, flux_layers, flux_params = fwd_bwd_section(
        flux, r, args.repeats, LATENT, "mid-size FLUX-shaped transformer", inputs=flux_inputs)
    _, added_flux = optimizer_section(flux_layers, flux_params, tf["plp"], args.repeats)
    sdxl_sizes()
    if args.model:  # a real model's sampling would take minutes on a CPU: forward+backward only
        from diffusers import UNet2DConditionModel

        print()
        big = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet")
        fwd_bwd_section(big.requires_grad_(False), r, args.repeats, args.model_latent,
                        f"{args.model} UNet")

    print("\ntargets")
    for ok, label, value in [
            (t["plp"] <= 1.05 * t["lora"], "PLP fwd+bwd <= 1.05 x peft LoRA, same rank",
             f"x{t['plp'] / t['lora']:.3f}"),
            (t["plp"] <= 1.10 * t["frozen"],
             f"PLP fwd+bwd <= 1.10 x frozen floor (r={r}; target is at r=16)",
             f"x{t['plp'] / t['frozen']:.3f}"),
            (added <= 0.02, "preconditioning adds <= 2% of a fwd+bwd over AdamW",
             f"{100 * added:.2f} %"),
            (tf["plp"] <= 1.05 * tf["lora"], "transformer: PLP fwd+bwd <= 1.05 x peft LoRA",
             f"x{tf['plp'] / tf['lora']:.3f}"),
            (tf["plp"] <= 1.10 * tf["frozen"], "transformer: PLP fwd+bwd <= 1.10 x frozen floor",
             f"x{tf['plp'] / tf['frozen']:.3f}"),
            (added_flux <= 0.02, "transformer: preconditioning adds <= 2% of a fwd+bwd",
             f"{100 * added_flux:.2f} %"),
            (2 * m_plp == m_lora, "AdamW moments exactly 1/2 of peft LoRA's",
             f"{m_plp / m_lora:.6f}"),
            (fused <= 1.02, "fused sampling <= 1.02 x base", f"x{fused:.3f}"),
            (checkpoint <= 0.01, "checkpoints at the default interval <= 1% of stage time",
             f"{100 * checkpoint:.3f} %")]:
        print(f"  {'PASS' if ok else 'MISS'}  {label:60} {value}")
    noise = max(SPREADS)
    print(f"\nworst run-to-run spread (max - min) / median: {100 * noise:.0f} %"
          + ("  WARNING: a noisy machine, ratios this close to a target are unreliable"
             if noise > 0.2 else ""))
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
