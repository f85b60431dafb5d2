"""
B4M, "Break-for-Make", in one file: content-style customization of a text-to-image diffusion
model with partly learnable LoRA projections (PLP).

    Yu Xu, Fan Tang, Juan Cao, Yuxin Zhang, Oliver Deussen, Weiming Dong, Jintao Li, Tong-Yee Lee.
    "B4M: Breaking Low-Rank Adapter for Making Content-Style Customization", ACM TOG 2025
    (arXiv 2403.19456, "Break-for-Make"). Preconditioner: Zhang & Pilanci, "Riemannian
    Preconditioned LoRA for Fine-Tuning Foundation Models", ICML 2024 (arXiv 2402.02347).

Sections, in the method's order: 1. a LoRA `dW = U V` split into frozen and trainable halves (PLP);
2. the frozen halves cut from one orthonormal basis; 3. the Riemannian-preconditioned AdamW;
4. break: one PLP learns the content in the down projection, another the style in the up
projection; 5. make: the two reassembled into one LoRA and fine-tuned briefly with 3.; 6. sample:
the result is an ordinary diffusers LoRA; 7. the command line.

    python b4m.py --content DIR --style DIR [--model ID_OR_FOLDER] [--out runs/b4m]
    python b4m.py sample --run runs/b4m [--prompt "a snq object in w@z style"]
"""
import argparse
import contextlib
import csv
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm import tqdm

__version__ = "0.1.0"
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # every attention projection of the UNet


class UsageError(Exception):
    """Bad input or a run that cannot go on: main() prints it as one line and exits with code 2."""

# ---------------------------------------------------------------------------------------------
# 1. Partly learnable projection (PLP)
#       U = [A; B]  (m x r),  V = [C, D]  (r x n),  dW = U V = [[A C, A D], [B C, B D]]
#       A: first m//2 rows of U, C: first n//2 columns of V, both frozen; B and D are learned.
# ---------------------------------------------------------------------------------------------


class PLPLinear(nn.Module):
    """y = W0 x + U (V x), with A and C frozen by construction (buffers, not parameters)."""

    def __init__(self, base: nn.Linear, rank: int, generator=None, prior=None):
        super().__init__()
        self.base = base.requires_grad_(False)
        m, n = base.out_features, base.in_features
        # At least fp32: Adam's small updates to B and D would round away in fp16/bf16 weights.
        dtype = torch.promote_types(base.weight.dtype, torch.float32)
        A, C = (prior or orthogonal_prior)(m, n, rank, generator)  # section 2 below
        D = torch.randn(rank, n - n // 2, generator=generator, dtype=torch.float64) / rank
        kw = dict(dtype=dtype, device=base.weight.device)
        self.register_buffer("A", A.to(**kw))
        self.register_buffer("C", C.to(**kw))
        self.B = nn.Parameter(torch.zeros(m - m // 2, rank, **kw))
        # Official init: B = 0, D ~ N(0, 1/r^2). dW = [[A C, A D], [0, 0]] is NOT zero at step 0:
        # unlike a plain LoRA, a fresh PLP already perturbs the model through its frozen rows A.
        self.D = nn.Parameter(D.to(**kw))

    @property
    def up(self):  # U, m x r
        return torch.cat([self.A, self.B], 0)

    @property
    def down(self):  # V, r x n
        return torch.cat([self.C, self.D], 1)

    def delta_weight(self):
        return self.up @ self.down

    def forward(self, x):
        h = F.linear(F.linear(x.to(self.B.dtype), self.down), self.up)  # U (V x): rank-r path
        return self.base(x) + h.to(x.dtype)


def is_target(name, module):
    return name.endswith(tuple("." + t for t in TARGETS)) and isinstance(module, nn.Linear)


def add_plp(denoiser, rank, seed, prior=None):
    """Wrap every to_q, to_k, to_v, to_out.0 of the denoiser in a PLPLinear, A and C drawn from
    (seed, module name) so that separate runs share them bit for bit. {module name: PLPLinear}."""
    layers = {}
    for name, module in list(denoiser.named_modules()):
        if is_target(name, module):
            layers[name] = PLPLinear(module, rank, seeded(seed, name), prior)
            denoiser.set_submodule(name, layers[name])
    return layers


def remove_plp(denoiser):
    for name, module in list(denoiser.named_modules()):
        if isinstance(module, PLPLinear):
            denoiser.set_submodule(name, module.base)


def lora_state_dict(layers):
    """The PLP layers as a standard diffusers LoRA: lora_B = U (m x r), lora_A = V (r x n), scale 1."""
    sd = {}
    for name, layer in layers.items():
        sd[f"unet.{name}.lora_A.weight"] = layer.down.detach().float().cpu().contiguous()
        sd[f"unet.{name}.lora_B.weight"] = layer.up.detach().float().cpu().contiguous()
    return sd


def load_plp_state(layers, sd):
    with torch.no_grad():
        for name, layer in layers.items():
            U, V = sd[f"unet.{name}.lora_B.weight"], sd[f"unet.{name}.lora_A.weight"]
            m_f, n_f = layer.A.shape[0], layer.C.shape[1]
            for t, value in ((layer.A, U[:m_f]), (layer.B, U[m_f:]), (layer.C, V[:, :n_f]), (layer.D, V[:, n_f:])):
                t.copy_(value)



# ---------------------------------------------------------------------------------------------
# 2. Orthogonal prior
#       Q = qr(N(0, 1)^{(m//2 + n//2) x r}),  A = Q[:m//2],  C = Q[m//2:]^T   =>   A^T A + C C^T = I_r
# ---------------------------------------------------------------------------------------------


def check_layer_rank(out_features, in_features, rank):
    if rank < 1 or out_features // 2 + in_features // 2 < rank:
        raise ValueError(f"rank must be between 1 and out_features//2 + in_features//2 = "
                         f"{out_features // 2 + in_features // 2} for a {out_features}x{in_features} layer, got {rank}")


def orthogonal_prior(out_features, in_features, rank, generator=None):
    """Frozen scaffold (A, C) cut from one orthonormal basis, so the two span well-separated
    directions and keep U^T U and V V^T well conditioned for the preconditioner (section 3).
    float64, drawn on the CPU: the same (seed, layer) gives bit-identical A, C on any device."""
    check_layer_rank(out_features, in_features, rank)
    m_f = out_features // 2
    Q, R = torch.linalg.qr(torch.randn(m_f + in_features // 2, rank, generator=generator, dtype=torch.float64))
    Q = Q * torch.sign(torch.diagonal(R))  # unique QR: Q depends on the draw alone, not on LAPACK
    return Q[:m_f], Q[m_f:].T.contiguous()


def random_prior(out_features, in_features, rank, generator=None):
    """Ablation (--no-orth-prior): A and C drawn independently, at the orthonormal draw's scale."""
    check_layer_rank(out_features, in_features, rank)
    m_f, n_f = out_features // 2, in_features // 2
    std = (m_f + n_f) ** -0.5  # an entry of a unit column of length m_f + n_f
    A = torch.randn(m_f, rank, generator=generator, dtype=torch.float64) * std
    return A, torch.randn(rank, n_f, generator=generator, dtype=torch.float64) * std


def seeded(seed, name):
    """A CPU generator seeded by (seed, name): Python's hash() is salted per process, sha256 is not."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


# ---------------------------------------------------------------------------------------------
# 3. Riemannian preconditioned step (Zhang & Pilanci 2024; used by make, section 5)
#       G_B <- G_B (V V^T + delta I)^-1,      G_D <- (U^T U + delta I)^-1 G_D,      then AdamW
# ---------------------------------------------------------------------------------------------


def riemannian_precondition(up, down, grad_B, grad_D, delta=1e-6):
    """Precondition any block of rows of dL/dU (grad_B) and any block of columns of dL/dV (grad_D).
    The r x r factors act on the rank side, so slicing before or after preconditioning is the same;
    with the full gradients this is plain Riemannian LoRA. Works batched over a leading dim.
    delta is absolute: under the orthogonal prior U^T U and V V^T are O(1) (A^T A + C C^T = I), so
    1e-6 is already small against them; it only guards ranks above m//2 or n//2, where A or C alone
    cannot fill r dimensions."""
    eye = delta * torch.eye(up.shape[-1], dtype=up.dtype, device=up.device)
    grad_B = torch.linalg.solve(down @ down.mT + eye, grad_B, left=False)
    grad_D = torch.linalg.solve(up.mT @ up + eye, grad_D)
    return grad_B, grad_D


class RiemannianAdamW(torch.optim.AdamW):
    """AdamW on the B and D of PLP layers, fed preconditioned gradients (scaled AdamW).

    Why: the first-order change of dW under a preconditioned step depends only on the column space
    of U and the row space of V, so it is the same for every factorisation (U M, M^-1 V) of dW.
    Plain gradients are not: they favour whichever factor happens to be larger. The preconditioners
    use the full U and V (frozen A and C included). The official script gave its optimizer only the
    last attention layer's pair; here every layer is. p.grad is replaced by its preconditioned value,
    as gradient clipping does. Same math as riemannian_precondition, organised for speed (1.5% of a
    forward+backward over plain AdamW in examples/benchmark.py): layers of one shape are solved in one batched
    call, and since A and C never change, U^T U = A^T A + B^T B and V V^T = C C^T + D D^T reuse the
    frozen Gram matrices computed here once.
    """

    def __init__(self, layers, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, delta=1e-6):
        self.layers, self.delta, self.groups = list(layers), delta, {}
        for layer in self.layers:
            self.groups.setdefault((layer.A.shape, layer.C.shape, layer.B.dtype, layer.B.device), []).append(layer)
        self.frozen = {key: (torch.stack([layer.A.mT @ layer.A for layer in group]),
                             torch.stack([layer.C @ layer.C.mT for layer in group]))
                       for key, group in self.groups.items()}
        params = [p for layer in self.layers for p in (layer.B, layer.D)]
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    @torch.no_grad()
    def precondition(self):
        for key, group in self.groups.items():
            if any(layer.B.grad is None or layer.D.grad is None for layer in group):
                raise ValueError("RiemannianAdamW: every layer needs gradients for both B and D")
            AtA, CCt = self.frozen[key]
            B, D = torch.stack([layer.B for layer in group]), torch.stack([layer.D for layer in group])
            eye = self.delta * torch.eye(B.shape[-1], dtype=B.dtype, device=B.device)
            gB = torch.linalg.solve(CCt + D @ D.mT + eye, torch.stack([layer.B.grad for layer in group]), left=False)
            gD = torch.linalg.solve(AtA + B.mT @ B + eye, torch.stack([layer.D.grad for layer in group]))
            torch._foreach_copy_([layer.B.grad for layer in group], list(gB))
            torch._foreach_copy_([layer.D.grad for layer in group], list(gD))

    def step(self, closure=None):
        if closure is not None:
            raise ValueError("RiemannianAdamW needs the gradients before the step: call backward(), then step()")
        self.precondition()
        return super().step()


# ---------------------------------------------------------------------------------------------
# 4. Break: two PLPs trained apart, with multi-correspondence projection learning (MCP)
#       content stage:  D <- grad_D L_content,   B <- grad_B mean_k L_aux_style_k
#       style stage:    B <- grad_B L_style,     D <- grad_D mean_k L_aux_content_k
#       L = || eps_theta(z_t, t, c) - target ||^2,  target = eps or v (scheduler.get_velocity)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_prompts(pipe, prompts, resolution):
    """Denoiser conditioning for a list of prompts, batched: {'encoder_hidden_states': ..., and for
    SDXL the pooled 'text_embeds' and the 'time_ids' (size, crop (0, 0), target size)}."""
    dev = pipe.unet.device
    if getattr(pipe, "text_encoder_2", None) is None:  # SD 1.x/2.x: one text encoder
        return {"encoder_hidden_states": pipe.encode_prompt(prompts, dev, 1, False)[0]}
    emb, _, pooled, _ = pipe.encode_prompt(prompts, device=dev, num_images_per_prompt=1,
                                           do_classifier_free_guidance=False)
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * len(prompts))
    return {"encoder_hidden_states": emb, "text_embeds": pooled, "time_ids": time_ids.to(dev, emb.dtype)}


@torch.no_grad()
def encode_set(pipe, pixels, prompt, resolution):
    """Everything the loop needs from the VAE and the text encoders, computed once: the latent
    posterior (mean, std) of every image and the prompt's conditioning."""
    vae, dtype = pipe.vae, pipe.vae.dtype
    if dtype != torch.float32:
        vae.to(torch.float32)  # encode in fp32: SD/SDXL VAEs overflow in fp16
    mean, std = [], []
    for x in pixels.split(4):
        dist = vae.encode(x.to(vae.device)).latent_dist
        mean.append(dist.mean)
        std.append(dist.std)
    if dtype != torch.float32:
        vae.to(dtype=dtype)
    sf = vae.config.scaling_factor  # (mean + std eps) sf = mean sf + (std sf) eps
    return {"mean": torch.cat(mean) * sf, "std": torch.cat(std) * sf, "cond": encode_prompts(pipe, [prompt], resolution)}


def denoise(unet, z_t, t, cond):
    cond = dict(cond)
    hidden = cond.pop("encoder_hidden_states")
    return unet(z_t, t, encoder_hidden_states=hidden, added_cond_kwargs=cond or None).sample


def set_losses(unet, noise_scheduler, sets, batch_size, generator):
    """Denoising loss of each set, in one forward over the concatenated batches of all sets (they
    all train the same half, so this is exact). Every call draws fresh noise and timesteps: the
    official scripts reused the main batch's for the auxiliary one, a coupling the paper does not ask for."""
    dev = unet.device
    z0, cond = [], {}
    for s in sets:
        i = torch.randint(len(s["mean"]), (batch_size,), generator=generator)
        eps = torch.randn(s["mean"][i].shape, generator=generator).to(dev)
        z0.append(s["mean"][i] + s["std"][i] * eps)
        for k, v in s["cond"].items():
            cond.setdefault(k, []).append(v.expand(batch_size, *v.shape[1:]))
    z0 = torch.cat(z0)
    noise = torch.randn(z0.shape, generator=generator).to(dev)
    t = torch.randint(noise_scheduler.config.num_train_timesteps, (len(z0),), generator=generator).to(dev)
    z_t = noise_scheduler.add_noise(z0, noise, t)
    target = noise if noise_scheduler.config.prediction_type == "epsilon" else noise_scheduler.get_velocity(z0, noise, t)
    pred = denoise(unet, z_t.to(unet.dtype), t, {k: torch.cat(v) for k, v in cond.items()})
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean((1, 2, 3)).view(len(sets), -1).mean(1)


def train(stage, steps, unet, noise_scheduler, objectives, optimizer, args, log, snapshot):
    """The one training loop of every stage. objectives: [(sets, params, reduce), ...]; each
    objective's loss is backpropagated into its own params only (Tensor.backward(inputs=...)),
    which is the exact gradient routing of section 4. snapshot() returns the current adapter,
    saved as a partial checkpoint on Ctrl-C."""
    generator = seeded(args.seed, stage)
    # fp16 models: backward through fp16 activations underflows without loss scaling (as in diffusers'
    # scripts). A no-op otherwise. RiemannianAdamW preconditions inside step(), after the unscale.
    scaler = torch.amp.GradScaler(unet.device.type, enabled=unet.dtype == torch.float16)
    bar = tqdm(range(1, steps + 1), desc=stage, dynamic_ncols=True)
    step = 0
    try:
        for step in bar:
            totals = [0.0] * len(objectives)
            for _ in range(args.grad_accum):
                for j, (sets, params, reduce) in enumerate(objectives):
                    loss = reduce(set_losses(unet, noise_scheduler, sets, args.batch_size, generator))
                    scaler.scale(loss / args.grad_accum).backward(inputs=params)
                    totals[j] += loss.item() / args.grad_accum
            if not all(math.isfinite(v) for v in totals):
                raise UsageError(f"{stage} stage, step {step}: the loss is not finite "
                                 f"({', '.join(f'{v:.4g}' for v in totals)}); "
                                 f"lower --lr/--aux-lr/--make-lr (adapters already saved are kept)")
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            log.append([stage, step] + [f"{v:.6g}" for v in totals] + [""] * (2 - len(totals)))
            bar.set_postfix(loss=f"{totals[0]:.4f}")
    except KeyboardInterrupt:
        path = Path(args.out) / stage / "partial.safetensors"
        save_lora(path, snapshot(), adapter_metadata(args, stage, partial_step=step - 1))
        print(f"\ninterrupted in the {stage} stage after {step - 1} steps; partial adapter saved to {path}.\n"
              f"Run the same command with --resume to continue: finished stages are kept and the "
              f"{stage} stage starts again.", file=sys.stderr)
        raise SystemExit(130)
    finally:
        bar.close()


def break_stage(stage, pipe, noise_scheduler, target, aux, args, log):
    """Content stage: D learns the content set (lr), B the auxiliary style sets (aux lr).
    Style stage: the mirror image. Returns the stage's adapter as a diffusers LoRA state dict."""
    layers = add_plp(pipe.unet, args.rank, args.seed, random_prior if args.no_orth_prior else None)
    B = [layer.B for layer in layers.values()]
    D = [layer.D for layer in layers.values()]
    own, other = (D, B) if stage == "content" else (B, D)
    optimizer = torch.optim.AdamW([{"params": own, "lr": args.lr}, {"params": other, "lr": args.aux_lr}])
    objectives = [([target], own, torch.mean)]
    if not args.no_mcp:  # MCP: the other half learns to work with several partners
        objectives.append((aux, other, torch.mean))
    train(stage, args.steps, pipe.unet, noise_scheduler, objectives, optimizer, args, log,
          lambda: lora_state_dict(layers))
    remove_plp(pipe.unet)
    return lora_state_dict(layers)


# ---------------------------------------------------------------------------------------------
# 5. Make: reassemble and fine-tune briefly
#       U = [A; B_style],  V = [C, D_content],  then B, D <- RiemannianAdamW on L_style + L_content
# ---------------------------------------------------------------------------------------------


def reassemble(content, style, content_scale=1.0, style_scale=1.0):
    """The made adapter: U = [A; s_s B_style], V = [C, s_c D_content]. A and C of the two break
    stages must be bit-identical, else the two halves were learned against different scaffolds."""
    made = {}
    for key in content:
        if not key.endswith("lora_B.weight"):
            continue
        down = key.replace("lora_B", "lora_A")
        U, V = style[key], content[down]
        m_f, n_f = U.shape[0] // 2, V.shape[1] // 2
        if not (torch.equal(U[:m_f], content[key][:m_f]) and torch.equal(V[:, :n_f], style[down][:, :n_f])):
            raise UsageError(f"make: the frozen A/C of {key.removesuffix('.lora_B.weight')} differ between the "
                             f"content and the style "
                             f"adapter; both must come from the same --seed, --rank and prior")
        made[key] = torch.cat([U[:m_f], style_scale * U[m_f:]])
        made[down] = torch.cat([V[:, :n_f], content_scale * V[:, n_f:]], 1)
    return made


def scale_made(sd, content_scale, style_scale):
    """U = [A; s_s B], V = [C, s_c D] on any PLP adapter: strengths at sampling time, no retraining."""
    return reassemble(sd, sd, content_scale, style_scale)


def make_stage(pipe, noise_scheduler, content, style, content_sd, style_sd, args, log):
    """The made adapter, saved as stage "b4m": reassembled, then B and D fine-tuned together."""
    layers = add_plp(pipe.unet, args.rank, args.seed)
    load_plp_state(layers, reassemble(content_sd, style_sd))  # all four blocks: the draw is replaced
    params = [p for layer in layers.values() for p in (layer.B, layer.D)]
    optimizer = (torch.optim.AdamW(params, lr=args.make_lr) if args.no_precondition else
                 RiemannianAdamW(layers.values(), lr=args.make_lr))
    objectives = [([content, style], params, torch.sum)]  # L_content + L_style, one forward
    train("b4m", args.make_steps, pipe.unet, noise_scheduler, objectives, optimizer, args, log,
          lambda: lora_state_dict(layers))
    remove_plp(pipe.unet)
    return lora_state_dict(layers)


def lora_merge_stage(stage, pipe, noise_scheduler, data, args, log):
    """Baseline (--baseline lora-merge): an ordinary peft LoRA, as the diffusers scripts train one."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = pipe.unet
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                target_modules=list(TARGETS)), adapter_name=stage)
    params = [p for n, p in unet.named_parameters() if f".{stage}." in n]
    for p in params:
        p.data = p.data.float()  # adapters train in fp32 whatever the model's dtype
    optimizer = torch.optim.AdamW(params, lr=args.lr)

    def snapshot():
        return {f"unet.{k}": v.detach().float().cpu().contiguous()
                for k, v in get_peft_model_state_dict(unet, adapter_name=stage).items()}

    train(stage, args.steps, unet, noise_scheduler, [([data], params, torch.mean)], optimizer, args, log, snapshot)
    sd = snapshot()
    unet.unload_lora()
    return sd


def merge_loras(content, style):
    """Sum of two rank-r LoRAs = one rank-2r LoRA: U = [U_c, U_s], V = [V_c; V_s]."""
    return {k: torch.cat([content[k], style[k]], 1 if "lora_B" in k else 0) for k in content}


# ---------------------------------------------------------------------------------------------
# 6. Sample: the made adapter is an ordinary diffusers LoRA
#       W = W0 + U V in every adapted projection; generate with the combined prompt
# ---------------------------------------------------------------------------------------------

DRIFT_PROMPTS = ["a photo of a dog", "a city street at night", "a bowl of fruit on a table", "a portrait of an old man"]


@contextlib.contextmanager
def lora_loaded(pipe, sd):
    """Load a LoRA state dict with diffusers' own loader, unfused: unfusing subtracts U V again,
    which is not exact in floating point, and later samples must see the untouched base weights."""
    pipe.unet.load_lora_adapter(dict(sd), prefix="unet", adapter_name="b4m")  # a copy: the loader pops keys
    try:
        yield
    finally:
        pipe.unet.unload_lora()


def generate(pipe, sd, prompt, args):
    with lora_loaded(pipe, sd):
        generator = torch.Generator(pipe.unet.device).manual_seed(args.seed)
        return pipe(prompt, num_images_per_prompt=args.num_samples, num_inference_steps=args.sample_steps,
                    height=args.resolution, width=args.resolution, generator=generator).images


def image_grid(rows):
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            grid.paste(im, (j * w, i * h))
    return grid


def own_prompts(args):
    return {"content": args.content_prompt, "style": args.style_prompt, "b4m": args.prompt}


def sample_run(pipe, adapters, args):
    """samples/{content,style,b4m}_{i}.png and grid.png: one row each for content, style, b4m."""
    out = Path(args.out) / "samples"
    rows = []
    for stage, sd in adapters.items():
        images = generate(pipe, sd, own_prompts(args)[stage], args)
        for i, im in enumerate(images):
            save_image(out / f"{stage}_{i}.png", im)
        rows.append(images)
    save_image(out / "grid.png", image_grid(rows))


SCALES = (0.0, 0.5, 1.0, 1.5)


def scale_grid(pipe, made, args):
    """The made adapter at every pair of strengths. Rows: s_s; columns: s_c; one image each, same seed."""
    one = argparse.Namespace(**{**vars(args), "num_samples": 1})
    rows = [[generate(pipe, scale_made(made, s_c, s_s), args.prompt, one)[0] for s_c in SCALES] for s_s in SCALES]
    return image_grid(rows)


@torch.no_grad()
def drift_report(pipe, adapters, own_prompts, resolution, seed):
    """drift: mean squared change of the noise prediction on unrelated prompts (how much the
    adapter disturbs the base model); effect: the same on the adapter's own prompt. Same latents,
    noise and timesteps for the adapted and the base model."""
    unet, k = pipe.unet, len(DRIFT_PROMPTS)
    g = torch.Generator().manual_seed(seed)
    size = resolution // pipe.vae_scale_factor
    z = torch.randn(k, unet.config.in_channels, size, size, generator=g).to(unet.device, unet.dtype)
    # Mid-range timesteps: near t = 0 or T the prediction hardly depends on the prompt at all.
    t = torch.randint(100, 900, (k,), generator=g).to(unet.device)

    def eps(prompts):
        return denoise(unet, z, t, encode_prompts(pipe, prompts, resolution)).float()

    base = eps(DRIFT_PROMPTS)
    report = {"drift": {}, "effect": {}}
    for stage, sd in adapters.items():
        base_own = eps([own_prompts[stage]] * k)
        with lora_loaded(pipe, sd):
            report["drift"][stage] = F.mse_loss(eps(DRIFT_PROMPTS), base).item()
            report["effect"][stage] = F.mse_loss(eps([own_prompts[stage]] * k), base_own).item()
    return report


# ---------------------------------------------------------------------------------------------
# Files: image folders in; every write atomic (temporary file in the same folder, then os.replace);
# adapters in safetensors only (no pickle), in the key layout diffusers' load_lora_weights reads.
# ---------------------------------------------------------------------------------------------

WEIGHTS = "pytorch_lora_weights.safetensors"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}


def open_image(path, resolution):
    """RGB, EXIF-upright, centre-cropped to resolution x resolution. Raises on unreadable files."""
    with Image.open(path) as img:
        img.draft("RGB", (resolution, resolution))  # JPEG: decode at reduced size, cheap for huge photos
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grayscale: keep the top 8 bits
            img = img.point(lambda v: v / 256).convert("L")
        if "A" in img.getbands() or "transparency" in img.info:  # transparent pixels become white
            img = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img)
        return ImageOps.fit(img.convert("RGB"), (resolution, resolution), Image.Resampling.BICUBIC)


def image_files(folder):
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def read_images(paths, resolution):
    """The readable ones, each unreadable file named in a warning and skipped."""
    images = []
    for path in paths:
        try:
            images.append(open_image(path, resolution))
        except Exception as e:  # PIL raises many kinds (OSError, SyntaxError, ValueError, ...)
            print(f"warning: skipping {path}: not a readable image ({type(e).__name__})", file=sys.stderr)
    return images


def load_image_set(folder, flag, resolution, prompt=None, default_prompt=None):
    """(pixels in [-1, 1] of shape N x 3 x H x W, prompt). Unreadable images are skipped with a
    warning naming each; a folder with none left, or with no prompt, is a UsageError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{flag} {folder}: {'not a folder' if folder.exists() else 'no such folder'}; "
                         f"pass a folder of images")
    if prompt is None and (folder / "prompt.txt").is_file():
        prompt = (folder / "prompt.txt").read_text(encoding="utf-8").strip()
        if not prompt:
            raise UsageError(f"{flag} {folder}: prompt.txt is empty; write the set's prompt in it")
    elif prompt is not None and not prompt.strip():
        raise UsageError(f"{flag}-prompt: the prompt is empty; give a non-empty prompt")
    prompt = default_prompt if prompt is None else prompt.strip()
    if prompt is None:
        raise UsageError(f"{flag} {folder}: no prompt.txt; an auxiliary set needs one holding its prompt")
    images = read_images(image_files(folder), resolution)
    if not images:
        raise UsageError(f"{flag} {folder}: no readable image (looked for {', '.join(sorted(IMAGE_SUFFIXES))}); "
                         f"add at least one image")
    pixels = torch.stack([torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8) for im in images])
    pixels = pixels.view(len(images), resolution, resolution, 3).permute(0, 3, 1, 2)
    return pixels.float() / 127.5 - 1, prompt


@contextlib.contextmanager
def atomic(path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_lora(path, sd, metadata):
    from safetensors.torch import save_file

    # One metadata key: safetensors writes several keys in a random order, and the same run must
    # give byte-identical files.
    with atomic(path) as tmp:
        save_file(sd, tmp, metadata={"b4m": json.dumps(metadata, sort_keys=True)})


def load_lora(path, unet, expect):
    """Read an adapter and check it against the model and the run: keys, shapes, metadata."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta, sd = json.loads((f.metadata() or {}).get("b4m", "{}")), {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise UsageError(f"{path}: not a readable b4m adapter ({type(e).__name__}); re-run with --overwrite")
    for key, value in expect.items():
        if key != "version" and meta.get(key) != value:
            raise UsageError(f"{path}: made with {key}={meta.get(key)}, this run has {key}={value}; "
                             f"use the matching model/settings or another --out")
    layers = {n: m for n, m in unet.named_modules() if is_target(n, m)}
    keys = {f"unet.{n}.lora_{x}.weight" for n in layers for x in "AB"}
    for key in sorted(keys ^ set(sd)):
        raise UsageError(f"{path}: {'has no' if key in keys else 'has an unknown'} key {key}; "
                         f"the adapter was made for another model")
    for name, layer in layers.items():
        V, U = sd[f"unet.{name}.lora_A.weight"], sd[f"unet.{name}.lora_B.weight"]
        if V.ndim != 2 or U.ndim != 2 or V.shape[1] != layer.in_features or U.shape != (layer.out_features, V.shape[0]):
            raise UsageError(f"{path}: {name} has U {tuple(U.shape)}, V {tuple(V.shape)}, this model's layer is "
                             f"{layer.out_features}x{layer.in_features}; the adapter was made for another model")
    return sd, meta


def save_image(path, image):
    with atomic(path) as tmp:
        image.save(tmp, format="PNG")


def save_json(path, obj):
    with atomic(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def save_csv(path, rows):
    with atomic(path) as tmp, open(tmp, "w", newline="") as f:
        csv.writer(f).writerows([["stage", "step", "loss", "aux_loss"]] + rows)


def adapter_metadata(args, stage, partial_step=None):
    meta = {"stage": stage, "method": args.baseline, "rank": args.rank, "seed": args.seed,
            "prior": "random" if args.no_orth_prior else "orthogonal", "base_model": args.model,
            "version": __version__}
    if partial_step is not None:
        meta["partial_step"] = partial_step
    return meta


# ---------------------------------------------------------------------------------------------
# Models: any diffusers SD 1.x/2.x/SDXL pipeline, or a tiny random one built here (offline demo)
# ---------------------------------------------------------------------------------------------

PRESETS = {"tiny": "sd", "tiny-sdxl": "sdxl"}
OFFICIAL = dict(rank=64, resolution=512, steps=1000, make_steps=1000, sample_steps=25, num_samples=4)
TINY = dict(rank=4, resolution=64, steps=20, make_steps=10, sample_steps=4, num_samples=2)


def tiny_pipeline(kind):
    """A small random SD or SDXL pipeline with a byte-level CLIP tokenizer: its images are noise,
    it exists so the whole method runs offline in seconds."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)  # the same random model in every process: adapters saved from it load back
    chars = sorted(ByteLevel.alphabet())  # every byte is a token: no merges, no vocab file needed
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    text = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                          vocab_size=len(vocab), projection_dim=32, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    sdxl = kind == "sdxl"
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64 if sdxl else 32,
        **(dict(addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
                use_linear_projection=True) if sdxl else {}))
    vae = AutoencoderKL(block_out_channels=(16, 16, 16, 16), norm_num_groups=8, latent_channels=4, sample_size=64,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    parts = dict(vae=vae, unet=unet, scheduler=scheduler, text_encoder=CLIPTextModel(text), tokenizer=tokenizer)
    if sdxl:
        return StableDiffusionXLPipeline(**parts, text_encoder_2=CLIPTextModelWithProjection(text), tokenizer_2=tokenizer)
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def check_model(model, rank):
    """Fail fast, before any weights load: a preset, a local pipeline folder, or a cached/fetchable
    hub id, whose attention layers allow the rank (checked on a weightless 'meta' copy of the UNet)."""
    if model in PRESETS:
        return  # the tiny model loads in a second; its rank is checked right after
    path = Path(model)
    if path.exists() and not (path / "model_index.json").is_file():
        raise UsageError(f"--model {model}: this folder holds no diffusers pipeline (no model_index.json); "
                         f"pass a folder written by save_pretrained, a hub id, or tiny / tiny-sdxl")
    if not path.exists():
        check_hub_id(model)
    from diffusers import UNet2DConditionModel

    try:
        config = UNet2DConditionModel.load_config(model, subfolder="unet")
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
    except Exception as e:
        where = "in unet/" if path.exists() else "from the hub (check the id and the network)"
        raise UsageError(f"--model {model}: could not read a UNet2DConditionModel config {where} "
                         f"({type(e).__name__}); b4m needs an SD 1.x/2.x or SDXL pipeline")
    check_rank(rank, unet)


def check_rank(rank, unet):
    limit = min(m.out_features // 2 + m.in_features // 2 for n, m in unet.named_modules() if is_target(n, m))
    if rank > limit:  # m//2 + n//2 >= r for every adapted layer (section 2)
        raise UsageError(f"--rank {rank}: this model's smallest attention projection allows at most {limit}")


def check_hub_id(model):
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(model)
    except Exception:
        raise UsageError(f"--model {model}: no such folder and not a hub id (owner/name); "
                         f"pass a pipeline folder, a hub id, or tiny / tiny-sdxl")
    from huggingface_hub.constants import HF_HUB_OFFLINE

    if not isinstance(try_to_load_from_cache(model, "model_index.json"), str) and HF_HUB_OFFLINE:
        raise UsageError(f"--model {model}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                         f"run `huggingface-cli download {model}` with network access, or pass a local folder")


def load_pipeline(model, device, dtype):
    if model in PRESETS:
        pipe = tiny_pipeline(PRESETS[model])
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
    else:
        from diffusers import DiffusionPipeline

        try:
            pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype)
        except Exception as e:
            raise UsageError(f"--model {model}: could not load a diffusers pipeline ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); check the id/folder and network access")
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):  # not img2img, inpaint, ...
            raise UsageError(f"--model {model}: a {type(pipe).__name__}; b4m needs an SD 1.x/2.x or SDXL "
                             f"text-to-image pipeline")
    if pipe.scheduler.config.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction"):
        raise UsageError(f"--model {model}: prediction_type {pipe.scheduler.config.prediction_type}; "
                         f"b4m trains epsilon and v-prediction models")
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for part in pipe.components.values():
        if isinstance(part, nn.Module):
            part.requires_grad_(False)
    return pipe


# ---------------------------------------------------------------------------------------------
# 7. CLI
# ---------------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Settings that change what a stage learns; --resume refuses a run whose stored values differ.
TRAINED_BY = ["model", "baseline", "rank", "resolution", "seed", "batch_size", "grad_accum", "content", "style",
              "content_prompt", "style_prompt", "aux_style", "aux_content", "no_orth_prior", "no_mcp", "dtype"]
STAGE_KEYS = {"content": ["steps", "lr", "aux_lr"], "style": ["steps", "lr", "aux_lr"],
              "b4m": ["steps", "lr", "aux_lr", "make_steps", "make_lr", "no_precondition"]}


def number(kind, ok, rule):
    """An argparse type: kind(text), refused unless ok(value)."""
    def parse(text):
        value = kind(text)
        if not ok(value):  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    return parse


POSITIVE_INT, POSITIVE = number(int, lambda v: v > 0, "> 0"), number(float, lambda v: v > 0, "> 0")
STEPS = number(int, lambda v: v >= 0, ">= 0")
RESOLUTION = number(int, lambda v: v > 0 and v % 8 == 0, "a positive multiple of 8")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the whole usage block first)
        raise UsageError(message)


def common_flags(p):
    p.add_argument("--prompt", help="combined prompt for the made adapter (default: 'a snq object in w@z style')")
    p.add_argument("--num-samples", type=POSITIVE_INT, help="images per prompt (default 4; tiny: 2)")
    p.add_argument("--sample-steps", type=POSITIVE_INT, help="sampling steps (default 25; tiny: 4)")
    p.add_argument("--content-scale", type=float, default=1.0, help="s_c: V = [C, s_c D] at sampling")
    p.add_argument("--style-scale", type=float, default=1.0, help="s_s: U = [A; s_s B] at sampling")
    p.add_argument("--scale-grid", action="store_true", help=f"also render samples/scale_grid.png over {SCALES}")
    p.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="frozen model precision (auto: fp16 on cuda, else fp32); adapters stay fp32")


def parse_args(argv):
    if argv[:1] == ["sample"]:
        p = Parser(prog="b4m.py sample", description="Sample again from a finished run, without training.")
        p.add_argument("--run", required=True, help="a finished run's --out folder")
        p.add_argument("--seed", type=int)
        p.add_argument("--export", help="also write the (scaled) made adapter to DIR/" + WEIGHTS)
        p.add_argument("--report", action="store_true", help="recompute report.json (drift and effect)")
        common_flags(p)
        args = p.parse_args(argv[1:])
        args.command = "sample"
        return args
    p = Parser(prog="b4m.py", description="Train B4M: content stage, style stage, make; then sample.",
               epilog="Images: png, jpg/jpeg, webp, bmp, gif, any case. Unreadable images are skipped with a warning "
                      "naming each; a folder with no readable image is refused. `python b4m.py sample -h`: sampling.")
    p.add_argument("--content", required=True, help="folder of content images (prompt.txt optional)")
    p.add_argument("--style", required=True, help="folder of style images (prompt.txt optional)")
    p.add_argument("--content-prompt", help="default: the folder's prompt.txt, else 'a photo of snq object'")
    p.add_argument("--style-prompt", help="default: the folder's prompt.txt, else 'an image in w@z style'")
    p.add_argument("--aux-style", nargs="+", default=[], metavar="DIR", help="auxiliary style sets (MCP), each with prompt.txt")
    p.add_argument("--aux-content", nargs="+", default=[], metavar="DIR", help="auxiliary content sets, each with prompt.txt")
    p.add_argument("--model", default="stabilityai/stable-diffusion-xl-base-1.0",
                   help="hub id or local folder of an SD 1.x/2.x/SDXL pipeline, or tiny / tiny-sdxl (offline, random)")
    p.add_argument("--out", default="runs/b4m")
    p.add_argument("--rank", type=POSITIVE_INT, help="LoRA rank r (default 64; tiny: 4)")
    p.add_argument("--resolution", type=RESOLUTION, help="training/sampling size (default 512; tiny: 64)")
    p.add_argument("--steps", type=STEPS, help="optimizer steps per break stage (default 1000; tiny: 20)")
    p.add_argument("--make-steps", type=STEPS, help="make fine-tuning steps; 0 = exact reassembly (default 1000; tiny: 10)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=1)
    p.add_argument("--grad-accum", type=POSITIVE_INT, default=4)
    p.add_argument("--lr", type=POSITIVE, default=1e-4, help="the stage's own half")
    p.add_argument("--aux-lr", type=POSITIVE, default=1e-5, help="the other half, on the auxiliary sets")
    p.add_argument("--make-lr", type=POSITIVE, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory (SDXL on small GPUs)")
    p.add_argument("--resume", action="store_true", help="continue a run in --out: finished stages with matching settings are kept")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--no-orth-prior", action="store_true", help="ablation: A, C drawn independently")
    p.add_argument("--no-mcp", action="store_true", help="ablation: no auxiliary loss in the break stages")
    p.add_argument("--no-precondition", action="store_true", help="ablation: plain AdamW in make")
    p.add_argument("--baseline", choices=["b4m", "lora-merge"], default="b4m",
                   help="lora-merge: two ordinary LoRAs trained apart on the target sets and summed "
                        "(the paper's naive baseline; takes none of the B4M-only flags)")
    common_flags(p)
    args = p.parse_args(argv)
    args.command = "train"
    for key, value in (TINY if args.model in PRESETS else OFFICIAL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.prompt = args.prompt or "a snq object in w@z style"
    return args


def pick_device(args):
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available() or device == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: not available on this machine; use --device cpu or auto")
    dtype = args.dtype if args.dtype != "auto" else "fp16" if device == "cuda" else "fp32"
    if dtype == "fp16" and device == "cpu":
        raise UsageError("--dtype fp16: not supported on the CPU; use fp32 or bf16")
    return device, dtype


def check_baseline(args):
    """The lora-merge baseline has no PLP halves: the flags that act on them would do nothing."""
    if args.baseline == "b4m":
        return
    b4m_only = {"--content-scale": args.content_scale != 1, "--style-scale": args.style_scale != 1,
                "--scale-grid": args.scale_grid, "--aux-style": getattr(args, "aux_style", []),
                "--aux-content": getattr(args, "aux_content", []), "--no-orth-prior": getattr(args, "no_orth_prior", 0),
                "--no-mcp": getattr(args, "no_mcp", 0), "--no-precondition": getattr(args, "no_precondition", 0)}
    for flag, given in b4m_only.items():
        if given:
            raise UsageError(f"{flag}: only for B4M runs, not --baseline {args.baseline}")


def versions():
    import diffusers
    import transformers

    return {"b4m": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


def prepare_out(args):
    """Refuse to touch an existing run unless --resume or --overwrite; with --resume, the stored
    settings must match. Returns the stages already finished (to skip)."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is a file; pass a folder path")
    config = out / "config.json"
    has_run = config.exists() or any((out / s / WEIGHTS).exists() for s in STAGE_KEYS)
    if not has_run or args.overwrite:
        return set()
    if not args.resume:
        raise UsageError(f"--out {out}: already holds a run; pass --resume to continue it, --overwrite to "
                         f"replace it, or another --out")
    try:
        old = json.loads(config.read_text())["settings"]
    except Exception:
        raise UsageError(f"--resume: {config} is missing or unreadable; use --overwrite or another --out")
    now = vars(args)
    differ = [k for k in TRAINED_BY if old.get(k) != now.get(k)]
    if differ:
        raise UsageError(f"--resume: settings differ from the run in {out}: "
                         + ", ".join(f"{k} (was {old.get(k)!r}, now {now.get(k)!r})" for k in differ))
    done = set()
    for stage, keys in STAGE_KEYS.items():
        if (out / stage / WEIGHTS).exists() and all(old.get(k) == now.get(k) for k in keys):
            done.add(stage)
        else:
            break  # a later stage depends on every earlier one
    return done


def train_main(args):
    # Everything that can be checked without the model's weights is, so a typo costs seconds.
    device, args.dtype = pick_device(args)  # stored resolved: --resume must not mix fp16 and fp32 stages
    check_model(args.model, args.rank)
    check_baseline(args)
    content_px, args.content_prompt = load_image_set(args.content, "--content", args.resolution,
                                                     args.content_prompt, "a photo of snq object")
    style_px, args.style_prompt = load_image_set(args.style, "--style", args.resolution,
                                                 args.style_prompt, "an image in w@z style")
    aux_style_px = [load_image_set(folder, "--aux-style", args.resolution) for folder in args.aux_style]
    aux_content_px = [load_image_set(folder, "--aux-content", args.resolution) for folder in args.aux_content]
    # Absolute paths in config.json: `sample`, `--resume` and evaluate.py work from any folder.
    args.content, args.style = str(Path(args.content).resolve()), str(Path(args.style).resolve())
    args.aux_style, args.aux_content = ([str(Path(d).resolve()) for d in ds] for ds in (args.aux_style, args.aux_content))
    if Path(args.model).exists():
        args.model = str(Path(args.model).resolve())
    done = prepare_out(args)

    pipe = load_pipeline(args.model, device, DTYPES[args.dtype])
    check_rank(args.rank, pipe.unet)
    if args.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the training-time forward process
    content = encode_set(pipe, content_px, args.content_prompt, args.resolution)
    style = encode_set(pipe, style_px, args.style_prompt, args.resolution)
    aux_style = [encode_set(pipe, px, prompt, args.resolution) for px, prompt in aux_style_px] or [style]
    aux_content = [encode_set(pipe, px, prompt, args.resolution) for px, prompt in aux_content_px] or [content]
    # (with no auxiliary sets, each stage pairs with the other target set: the official single-set mode)

    out = Path(args.out)
    settings = {k: v for k, v in vars(args).items() if k not in ("resume", "overwrite")}
    save_json(out / "config.json", {"settings": settings, "versions": versions()})
    log, adapters = [], {}
    if done:
        with open(out / "losses.csv", newline="") as f:
            log = [row for row in list(csv.reader(f))[1:] if row[0] in done]
    for stage in STAGE_KEYS:
        path = out / stage / WEIGHTS
        if stage in done:
            adapters[stage] = load_lora(path, pipe.unet, adapter_metadata(args, stage))[0]
            print(f"{stage}: kept {path} (--resume)", file=sys.stderr)
            continue
        t0 = time.time()
        if args.baseline == "lora-merge":
            adapters[stage] = (merge_loras(adapters["content"], adapters["style"]) if stage == "b4m" else
                               lora_merge_stage(stage, pipe, noise_scheduler, content if stage == "content" else style,
                                                args, log))
        elif stage == "content":
            adapters[stage] = break_stage("content", pipe, noise_scheduler, content, aux_style, args, log)
        elif stage == "style":
            adapters[stage] = break_stage("style", pipe, noise_scheduler, style, aux_content, args, log)
        else:
            adapters[stage] = make_stage(pipe, noise_scheduler, content, style, adapters["content"],
                                         adapters["style"], args, log)
        save_lora(path, adapters[stage], adapter_metadata(args, stage))
        (out / stage / "partial.safetensors").unlink(missing_ok=True)
        save_csv(out / "losses.csv", log)
        report = read_report(out) if done else {}  # a new or overwritten run starts a new report
        done.add(stage)
        save_json(out / "report.json", {"seconds": {**report.get("seconds", {}), stage: round(time.time() - t0, 3)}})
    finish(pipe, adapters, args)
    print(f"wrote {out}: content/, style/, b4m/ (each {WEIGHTS}), config.json, losses.csv, report.json",
          file=sys.stderr)


def read_report(out):
    return json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else {}


def finish(pipe, adapters, args, report=True):
    """Samples and report.json, shared by training and `sample`."""
    out = Path(args.out)
    for old in (out / "samples").glob("*.png"):  # samples/ holds the latest sampling only: evaluate.py reads it all
        old.unlink()
    if args.scale_grid:
        save_image(out / "samples" / "scale_grid.png", scale_grid(pipe, adapters["b4m"], args))
    if (args.content_scale, args.style_scale) != (1, 1):
        adapters = {**adapters, "b4m": scale_made(adapters["b4m"], args.content_scale, args.style_scale)}
    sample_run(pipe, adapters, args)
    print(f"wrote {out / 'samples'}", file=sys.stderr)
    if not report:
        return
    result = drift_report(pipe, adapters, own_prompts(args), args.resolution, args.seed)
    result["seconds"] = read_report(out).get("seconds", {})  # written stage by stage, kept by --resume
    save_json(out / "report.json", result)
    print(f"{'adapter':8} {'drift':>12} {'effect':>12}", file=sys.stderr)
    for stage in adapters:
        print(f"{stage:8} {result['drift'][stage]:12.4g} {result['effect'][stage]:12.4g}", file=sys.stderr)


def sample_main(args):
    run = Path(args.run)
    try:
        config = json.loads((run / "config.json").read_text())["settings"]
    except Exception:
        raise UsageError(f"--run {run}: no readable config.json; pass the --out folder of a finished b4m run")
    for k, v in config.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.out = str(run)
    check_baseline(args)
    device, dtype = pick_device(args)
    missing = [s for s in STAGE_KEYS if not (run / s / WEIGHTS).is_file()]
    if missing:
        raise UsageError(f"--run {run}: no {missing[0]}/{WEIGHTS}; finish the run first (--resume)")
    check_model(args.model, args.rank)
    pipe = load_pipeline(args.model, device, DTYPES[dtype])
    adapters = {s: load_lora(run / s / WEIGHTS, pipe.unet, adapter_metadata(argparse.Namespace(**config), s))[0]
                for s in STAGE_KEYS}
    if args.export:
        made = scale_made(adapters["b4m"], args.content_scale, args.style_scale) if args.baseline == "b4m" else adapters["b4m"]
        meta = {**adapter_metadata(args, "b4m"), "content_scale": args.content_scale, "style_scale": args.style_scale}
        save_lora(Path(args.export) / WEIGHTS, made, meta)
    finish(pipe, adapters, args, report=args.report)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
        (sample_main if args.command == "sample" else train_main)(args)
    except UsageError as e:
        print(f"b4m: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
