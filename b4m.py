"""
B4M, "Break-for-Make", in one file: content-style customization of a text-to-image diffusion
model with partly learnable LoRA projections (PLP).

    Yu Xu, Fan Tang, Juan Cao, Yuxin Zhang, Oliver Deussen, Weiming Dong, Jintao Li, Tong-Yee Lee.
    "B4M: Breaking Low-Rank Adapter for Making Content-Style Customization", ACM TOG 2025
    (arXiv 2403.19456, "Break-for-Make"). Preconditioner: Zhang & Pilanci, "Riemannian
    Preconditioned LoRA for Fine-Tuning Foundation Models", ICML 2024 (arXiv 2402.02347).

Sections, in the method's order: 1. a LoRA `dW = U V` split into frozen and trainable halves (PLP);
2. the frozen halves cut from one orthonormal basis; 3. the Riemannian-preconditioned AdamW; 4. break:
one PLP learns the content in the down projection, another the style in the up projection; 5. make: the
two reassembled into one LoRA, fine-tuned briefly with 3.; 6. sample: an ordinary diffusers LoRA.
Sections 1-6 take plain values and touch no files; 7. files, 8. models and 9. the command line wrap them.

    python b4m.py --content DIR --style DIR [--model ID_OR_FOLDER] [--out runs/b4m]
    python b4m.py sample --run runs/b4m [--prompt "a snq object in w@z style"]
"""
import argparse
import contextlib
import csv
import hashlib
import io
import itertools
import json
import math
import os
import signal
import sys
import time
from importlib.metadata import version as package_version
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from tqdm import tqdm

__version__ = "0.2.0"
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # every attention projection of the UNet

# ---------------------------------------------------------------------------------------------
# 1. Partly learnable projection (PLP)
#       U = [A; B]  (m x r),  V = [C, D]  (r x n),  dW = U V = [[A C, A D], [B C, B D]]
#       A: the first m_f = m // 2 rows of U, C: the first n_f = n // 2 columns of V, both frozen;
#       B and D, the rest, are learned.
# ---------------------------------------------------------------------------------------------


def halves(U, V):
    """(A, B, C, D) of a LoRA pair U (m x r), V (r x n): A = U[:m_f], B = U[m_f:], C = V[:, :n_f],
    D = V[:, n_f:], with m_f = m // 2 frozen rows of U and n_f = n // 2 frozen columns of V."""
    m_f, n_f = U.shape[0] // 2, V.shape[1] // 2
    return U[:m_f], U[m_f:], V[:, :n_f], V[:, n_f:]


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
    return {f"unet.{name}.lora_{x}.weight": w.detach().float().cpu().contiguous()
            for name, layer in layers.items() for x, w in (("A", layer.down), ("B", layer.up))}


@torch.no_grad()
def load_plp_state(layers, sd):
    """All four blocks of every layer from a LoRA state dict: the scaffold drawn at init is replaced."""
    for name, layer in layers.items():
        U, V = sd[f"unet.{name}.lora_B.weight"], sd[f"unet.{name}.lora_A.weight"]
        for block, value in zip((layer.A, layer.B, layer.C, layer.D), halves(U, V)):
            block.copy_(value)


# ---------------------------------------------------------------------------------------------
# 2. Orthogonal prior
#       Q = qr(N(0, 1)^{(m_f + n_f) x r}),  A = Q[:m_f],  C = Q[m_f:]^T   =>   A^T A + C C^T = I_r
#       (b4m draws it for every adapted layer; the official scripts only for some, see the README)
# ---------------------------------------------------------------------------------------------


def check_layer_rank(out_features, in_features, rank):
    if rank < 1 or out_features // 2 + in_features // 2 < rank:
        raise ValueError(f"rank must be between 1 and m_f + n_f = {out_features // 2 + in_features // 2} "
                         f"for a {out_features}x{in_features} layer, got {rank}")


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
    1e-6 is already small against them; it only guards ranks above m_f or n_f, where A or C alone
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
    use the full U and V (A and C included) as they are at each step, batched over layers of one
    shape. Two parameter groups, all B and all D: the two halves, clipped apart by the training loop.
    (The official make script's preconditioned step ran after the gradients were zeroed: it never acted.)
    """

    def __init__(self, layers, lr=1e-4, delta=1e-6, **adamw):  # adamw: betas, eps, weight_decay
        self.delta, self.shapes = delta, {}
        for layer in layers:
            self.shapes.setdefault((layer.A.shape, layer.C.shape), []).append(layer)
        layers = [layer for group in self.shapes.values() for layer in group]
        super().__init__([{"params": [layer.B for layer in layers]}, {"params": [layer.D for layer in layers]}],
                         lr=lr, **adamw)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("RiemannianAdamW needs the gradients before the step: call backward(), then step()")
        for group in self.shapes.values():
            if any(layer.B.grad is None or layer.D.grad is None for layer in group):
                raise ValueError("RiemannianAdamW: every layer needs gradients for both B and D")
            U, V, G_B, G_D = (torch.stack(t) for t in zip(*[(x.up, x.down, x.B.grad, x.D.grad) for x in group]))
            for layer, P_B, P_D in zip(group, *riemannian_precondition(U, V, G_B, G_D, self.delta)):
                layer.B.grad, layer.D.grad = P_B, P_D  # p.grad replaced by its preconditioned value
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
def encode_set(pipe, pixels, prompt):
    """Everything the loop needs from the VAE and the text encoders, computed once: the latent
    posterior (mean, std) of every image (N x 3 x H x W in [-1, 1]) and the prompt's conditioning."""
    vae, dtype = pipe.vae, pipe.vae.dtype
    vae.float()  # encode in fp32: SD/SDXL VAEs overflow in fp16 (float()/type(): no diffusers .to() warning)
    dists = [vae.encode(x.to(vae.device)).latent_dist for x in pixels.split(4)]
    vae.type(dtype)
    sf = vae.config.scaling_factor  # (mean + std eps) sf = mean sf + (std sf) eps
    return {"mean": torch.cat([d.mean for d in dists]) * sf, "std": torch.cat([d.std for d in dists]) * sf,
            "cond": encode_prompts(pipe, [prompt], pixels.shape[-1])}


def denoise(unet, z_t, t, cond):
    extra = {k: v for k, v in cond.items() if k != "encoder_hidden_states"}  # SDXL's pooled text and sizes
    return unet(z_t, t, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=extra or None).sample


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


def train(steps, unet, noise_scheduler, objectives, optimizer, generator, *, batch_size, grad_accum,
          max_grad_norm, state=None, on_step=lambda step, loop_state: None, desc=None):
    """The one training loop of every stage; returns the loss log [[step, loss, aux loss], ...].
    objectives: [(sets, params, reduce), ...]; each objective's loss is backpropagated into its own
    params only (Tensor.backward(inputs=...)), which is the exact gradient routing of section 4.
    Each optimizer param group (a trained half) is clipped to max_grad_norm (0: off), as the
    official break scripts clip each half. state: what a checkpoint holds (loop_state below), to continue
    exactly where it was taken. on_step(step, loop_state) runs after every optimizer step; it may
    save the state, or raise to stop the loop between two steps."""
    # fp16 models: backward through fp16 activations underflows without loss scaling (as in diffusers'
    # scripts). A no-op otherwise. Clipping and preconditioning see the unscaled gradients.
    scaler = torch.amp.GradScaler(unet.device.type, enabled=unet.dtype == torch.float16)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    start, log = 0, []
    if state:
        if [tuple(p.shape) for p in params] != [tuple(v.shape) for v in state["params"]]:
            raise ValueError("the checkpoint holds parameters of other shapes than this stage trains")
        with torch.no_grad():
            for p, value in zip(params, state["params"]):
                p.copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])  # a no-op unless the scaler is enabled (fp16)
        generator.set_state(state["generator"])
        start, log = state["step"], list(state["log"])

    def loop_state():  # everything that decides the rest of the stage
        return {"step": step, "params": [p.detach().cpu().clone() for p in params], "log": log,
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "generator": generator.get_state()}

    bar = tqdm(range(start + 1, steps + 1), initial=start, total=steps, desc=desc, dynamic_ncols=True)
    for step in bar:
        totals = [0.0] * len(objectives)
        for _ in range(grad_accum):
            for j, (sets, own, reduce) in enumerate(objectives):
                loss = reduce(set_losses(unet, noise_scheduler, sets, batch_size, generator))
                scaler.scale(loss / grad_accum).backward(inputs=own)
                totals[j] += loss.item() / grad_accum
        if not all(math.isfinite(v) for v in totals):
            bar.close()
            raise FloatingPointError(f"step {step}: the loss is not finite ({', '.join(f'{v:.4g}' for v in totals)})")
        scaler.unscale_(optimizer)
        for group in optimizer.param_groups if max_grad_norm else ():
            nn.utils.clip_grad_norm_(group["params"], max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        log.append([step, *totals])
        bar.set_postfix(loss=f"{totals[0]:.4f}")
        on_step(step, loop_state)
    bar.close()
    return log


def break_stage(stage, unet, noise_scheduler, target, aux, *, rank, seed, steps, lr, aux_lr, mcp=True,
                orth_prior=True, **loop):
    """Content stage: D learns the target (content) set at lr, B the auxiliary style sets at aux_lr.
    Style stage: the mirror image. target, aux: sets from encode_set. loop: train()'s keywords.
    Returns (the stage's adapter as a diffusers LoRA state dict, the loss log)."""
    layers = add_plp(unet, rank, seed, orthogonal_prior if orth_prior else random_prior)
    B, D = [layer.B for layer in layers.values()], [layer.D for layer in layers.values()]
    own, other = (D, B) if stage == "content" else (B, D)
    optimizer = torch.optim.AdamW([{"params": own, "lr": lr}, {"params": other, "lr": aux_lr}])
    objectives = [([target], own, torch.mean)]
    if mcp:  # MCP: the other half learns to work with several partners (--no-mcp: it stays as drawn)
        objectives.append((aux, other, torch.mean))
    try:
        log = train(steps, unet, noise_scheduler, objectives, optimizer, seeded(seed, stage), desc=stage, **loop)
    finally:
        remove_plp(unet)
    return lora_state_dict(layers), log


# ---------------------------------------------------------------------------------------------
# 5. Make: reassemble and fine-tune briefly
#       U = [A; B_style],  V = [C, D_content],  then B, D <- RiemannianAdamW on L_style + L_content
# ---------------------------------------------------------------------------------------------


def reassemble(content, style, content_scale=1.0, style_scale=1.0):
    """The made adapter: U = [A; s_s B_style], V = [C, s_c D_content]. A and C of the two break
    stages must be bit-identical, else the two halves were learned against different scaffolds."""
    made = {}
    for up in (key for key in content if key.endswith("lora_B.weight")):
        down = up.replace("lora_B", "lora_A")
        A, B_style, C_style, _ = halves(style[up], style[down])
        A_content, _, C, D_content = halves(content[up], content[down])
        if not (torch.equal(A, A_content) and torch.equal(C, C_style)):
            raise ValueError(f"make: the frozen A/C of {up.removesuffix('.lora_B.weight')} differ between the "
                             f"content and the style adapter; both must come from the same seed, rank and prior")
        made[up] = torch.cat([A, style_scale * B_style])
        made[down] = torch.cat([C, content_scale * D_content], 1)
    return made


def scale_made(sd, content_scale, style_scale):
    """U = [A; s_s B], V = [C, s_c D] on any PLP adapter: strengths at sampling time, no retraining."""
    return reassemble(sd, sd, content_scale, style_scale)


def make_stage(unet, noise_scheduler, content, style, content_sd, style_sd, *, rank, seed, steps, lr,
               precondition=True, **loop):
    """The made adapter: reassembled, then B and D fine-tuned together on L_content + L_style."""
    made, layers = reassemble(content_sd, style_sd), add_plp(unet, rank, seed)
    load_plp_state(layers, made)  # every block of the fresh draw replaced
    B, D = [layer.B for layer in layers.values()], [layer.D for layer in layers.values()]
    # Either way two parameter groups, all B and all D, so that each half is clipped on its own.
    optimizer = RiemannianAdamW(layers.values(), lr=lr) if precondition else torch.optim.AdamW([{"params": B}, {"params": D}], lr=lr)
    objectives = [([content, style], B + D, torch.sum)]
    try:  # L_content + L_style in one forward
        log = train(steps, unet, noise_scheduler, objectives, optimizer, seeded(seed, "b4m"), desc="b4m", **loop)
    finally:
        remove_plp(unet)
    return lora_state_dict(layers), log


def lora_stage(stage, unet, noise_scheduler, data, *, rank, seed, steps, lr, **loop):
    """Baseline (--baseline lora-merge): an ordinary peft LoRA, as the diffusers scripts train one."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(TARGETS)), adapter_name=stage)
    named = [(n, p) for n, p in unet.named_parameters() if f".{stage}." in n]
    g = seeded(seed, stage)  # peft's "gaussian" init (A ~ N(0, 1/r^2), B = 0), from our own generator
    for n, p in named:  # adapters train in fp32 whatever the model's dtype
        p.data = (torch.randn(p.shape, generator=g) / rank if "lora_A" in n else torch.zeros(p.shape)).to(p.device)
    params = [p for _, p in named]
    try:
        log = train(steps, unet, noise_scheduler, [([data], params, torch.mean)], torch.optim.AdamW(params, lr=lr),
                    g, desc=stage, **loop)
        sd = {f"unet.{k}": v.detach().float().cpu().contiguous()
              for k, v in get_peft_model_state_dict(unet, adapter_name=stage).items()}
    finally:
        unet.unload_lora()
    return sd, log


def merge_loras(content, style):
    """Sum of two rank-r LoRAs = one rank-2r LoRA: U = [U_c, U_s], V = [V_c; V_s]."""
    return {k: torch.cat([content[k], style[k]], 1 if "lora_B" in k else 0) for k in content}


# ---------------------------------------------------------------------------------------------
# 6. Sample: the made adapter is an ordinary diffusers LoRA
#       W = W0 + U V in every adapted projection; generate with the combined prompt
# ---------------------------------------------------------------------------------------------

DRIFT_PROMPTS = ["a photo of a dog", "a city street at night", "a bowl of fruit on a table", "a portrait of an old man"]
SCALES = (0.0, 0.5, 1.0, 1.5)


@contextlib.contextmanager
def lora_loaded(pipe, sd):
    """Load a LoRA state dict with diffusers' own loader, unfused: unfusing subtracts U V again,
    which is not exact in floating point, and later samples must see the untouched base weights."""
    pipe.unet.load_lora_adapter(dict(sd), prefix="unet", adapter_name="b4m")  # a copy: the loader pops keys
    try:
        yield
    finally:
        pipe.unet.unload_lora()


def generate(pipe, sd, prompt, *, num_samples, steps, resolution, seed):
    with lora_loaded(pipe, sd):
        generator = torch.Generator(pipe.unet.device).manual_seed(seed)
        return pipe(prompt, num_images_per_prompt=num_samples, num_inference_steps=steps,
                    height=resolution, width=resolution, generator=generator).images


def image_grid(rows):
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            grid.paste(im, (j * w, i * h))
    return grid


@torch.no_grad()
def drift_report(pipe, adapters, own_prompts, resolution, seed):
    """drift: mean squared change of the noise prediction on unrelated prompts (how much the
    adapter disturbs the base model); effect: the same on the adapter's own prompt. Same latents,
    noise and timesteps for the adapted and the base model."""
    unet, k, g = pipe.unet, len(DRIFT_PROMPTS), torch.Generator().manual_seed(seed)
    size = resolution // pipe.vae_scale_factor
    z = torch.randn(k, unet.config.in_channels, size, size, generator=g).to(unet.device, unet.dtype)
    t = torch.randint(100, 900, (k,), generator=g).to(unet.device)  # near t = 0 or T the prompt hardly matters
    eps = lambda cond: denoise(unet, z, t, cond).float()  # noqa: E731
    drift_cond = encode_prompts(pipe, DRIFT_PROMPTS, resolution)  # adapters change the UNet only
    base, report = eps(drift_cond), {"drift": {}, "effect": {}}
    for stage, sd in adapters.items():
        own_cond = encode_prompts(pipe, [own_prompts[stage]] * k, resolution)
        base_own = eps(own_cond)
        with lora_loaded(pipe, sd):
            report["drift"][stage] = F.mse_loss(eps(drift_cond), base).item()
            report["effect"][stage] = F.mse_loss(eps(own_cond), base_own).item()
    return report


# ---------------------------------------------------------------------------------------------
# 7. Files: image folders in; every write all or nothing (temporary file in the same folder,
#    fsync, os.replace), with the umask's permissions; adapters in safetensors (no pickle), in
#    diffusers' key layout and, beside it, in the kohya layout that ComfyUI and AUTOMATIC1111 read.
# ---------------------------------------------------------------------------------------------

WEIGHTS, KOHYA, CHECKPOINT = "pytorch_lora_weights.safetensors", "{}_kohya.safetensors", "checkpoint.pt"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}


class UsageError(Exception):
    """Bad input or a run that cannot go on: main() prints it as one line and exits with code 2."""


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


def read_prompt(path, flag):
    """A prompt.txt: UTF-8, with or without the byte-order mark Windows Notepad writes."""
    try:
        prompt = path.read_bytes().decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        raise UsageError(f"{flag} {path}: not UTF-8 text; save it as UTF-8") from None
    if not prompt:
        raise UsageError(f"{flag} {path}: empty; write the set's prompt in it")
    return prompt


def load_image_set(folder, flag, resolution, prompt=None, default_prompt=None):
    """(pixels in [-1, 1] of shape N x 3 x H x W, prompt). Unreadable images are skipped with a
    warning naming each; a folder with none left, or with no prompt, is a UsageError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{flag} {folder}: {'not a folder' if folder.exists() else 'no such folder'}; "
                         f"pass a folder of images")
    if prompt is not None and not prompt.strip():
        raise UsageError(f"{flag}-prompt: the prompt is empty; give a non-empty prompt")
    if prompt is None:
        prompt = read_prompt(folder / "prompt.txt", flag) if (folder / "prompt.txt").is_file() else default_prompt
    if prompt is None:
        raise UsageError(f"{flag} {folder}: no prompt.txt; an auxiliary set needs one holding its prompt")
    images = read_images(image_files(folder), resolution)
    if not images:
        raise UsageError(f"{flag} {folder}: no readable image (looked for {', '.join(sorted(IMAGE_SUFFIXES))}); "
                         f"add at least one image")
    pixels = torch.stack([torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8) for im in images])
    pixels = pixels.view(len(images), resolution, resolution, 3).permute(0, 3, 1, 2)
    return pixels.float() / 127.5 - 1, prompt.strip()


def write_file(path, write):
    """write(f) fills a binary file, all or nothing: a kill, a power cut or a full disk leaves the
    previous file (or none), never half a file. open() gives the umask's permissions, like any program."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise UsageError(f"{path}: cannot write ({e.strerror or e}); free some space or write elsewhere") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def save_lora(folder, sd, metadata):
    """folder/<stage>_kohya.safetensors (kohya keys: lora_unet_<module>.lora_down/lora_up/alpha, alpha =
    rank so the scale stays 1), then folder/pytorch_lora_weights.safetensors (peft keys), whose presence
    marks a finished stage.
    One metadata key: safetensors writes several keys in a random order, and the same run must give
    byte-identical files."""
    from diffusers.utils import convert_state_dict_to_kohya

    meta = {"b4m": json.dumps(metadata, sort_keys=True)}
    for name, tensors in ((KOHYA.format(metadata["stage"]), convert_state_dict_to_kohya(sd)), (WEIGHTS, sd)):
        write_file(Path(folder) / name, lambda f: f.write(safetensors_bytes(tensors, metadata=meta)))


def load_lora(path, unet, expect):
    """Read an adapter and check it against the model and the run: keys, shapes, metadata."""
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


def load_checkpoint(path, settings):
    """The stage's checkpoint if taken with these settings, else None. weights_only: no arbitrary pickles."""
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")  # the optimizer moves its state back
    except Exception as e:
        raise UsageError(f"{path}: unreadable checkpoint ({type(e).__name__}); delete it to start the stage over")
    return state if state.get("settings") == settings else None


def save_image(path, image):
    write_file(path, lambda f: image.save(f, format="PNG"))


def save_json(path, obj):
    write_file(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def save_csv(path, rows):
    text = io.StringIO(newline="")
    csv.writer(text).writerows([["stage", "step", "loss", "aux_loss"]] + rows)
    write_file(path, lambda f: f.write(text.getvalue().encode()))


# ---------------------------------------------------------------------------------------------
# 8. Models: any diffusers SD 1.x/2.x/SDXL pipeline, or a tiny random one built here (tests, offline)
# ---------------------------------------------------------------------------------------------

PRESETS = {"tiny": "sd", "tiny-sdxl": "sdxl"}


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
    import huggingface_hub as hub
    from diffusers import UNet2DConditionModel

    if not path.exists():
        try:
            hub.utils.validate_repo_id(model)
        except Exception:
            raise UsageError(f"--model {model}: no such folder and not a hub id (owner/name); "
                             f"pass a pipeline folder, a hub id, or tiny / tiny-sdxl")
        if not isinstance(hub.try_to_load_from_cache(model, "model_index.json"), str) and hub.constants.HF_HUB_OFFLINE:
            raise UsageError(f"--model {model}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                             f"run `huggingface-cli download {model}` with network access, or pass a local folder")
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
    if rank > limit:  # m_f + n_f >= r in every adapted layer (section 2)
        raise UsageError(f"--rank {rank}: this model's smallest attention projection allows at most {limit}")


def load_pipeline(model, device, dtype):
    if model in PRESETS:
        pipe = tiny_pipeline(PRESETS[model])
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
    else:
        from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

        try:
            pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype)
        except Exception as e:
            raise UsageError(f"--model {model}: could not load a diffusers pipeline ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); check the id/folder and network access")
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
# 9. Command line: flags, checks, --resume and checkpoints around sections 1-6
# ---------------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Every default, written once: the official recipe's values where it has one (the README's
# "Differences from the official code" says where b4m departs); the tiny presets override a few.
DEFAULTS = dict(model="stabilityai/stable-diffusion-xl-base-1.0", out="runs/b4m", rank=64, resolution=512,
                steps=1000, make_steps=1000, batch_size=1, grad_accum=4, lr=1e-4, aux_lr=1e-5, make_lr=1e-4,
                max_grad_norm=1.0, seed=0, checkpoint_every=100, sample_steps=25, num_samples=4)
TINY = dict(rank=4, resolution=64, steps=20, make_steps=10, sample_steps=4, num_samples=2)
PROMPTS = {"content": "a photo of snq object", "style": "an image in w@z style", "b4m": "a snq object in w@z style"}
# What --resume compares. RUN: any difference refuses the run. STAGES: a stage is kept, or continued
# from its checkpoint, only while its own settings match too (a later stage depends on the earlier).
RUN = ("model", "baseline", "rank", "resolution", "seed", "batch_size", "grad_accum", "max_grad_norm", "content",
       "style", "content_prompt", "style_prompt", "aux_style", "aux_content", "no_orth_prior", "no_mcp", "dtype")
STAGES = {"content": ("steps", "lr", "aux_lr"), "style": ("steps", "lr", "aux_lr"),
          "b4m": ("steps", "lr", "aux_lr", "make_steps", "make_lr", "no_precondition")}


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: training stopped between two steps, with a checkpoint written. (signum, message)"""


def number(kind, ok, rule):
    """An argparse type: kind(text), refused unless ok(value) (which nan never is)."""
    def parse(text):
        if not ok(value := kind(text)):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    return parse


POSITIVE_INT, POSITIVE = number(int, lambda v: v > 0, "> 0"), number(float, lambda v: v > 0, "> 0")
STEPS, NON_NEGATIVE = number(int, lambda v: v >= 0, ">= 0"), number(float, lambda v: v >= 0, ">= 0")
RESOLUTION = number(int, lambda v: v > 0 and v % 8 == 0, "a positive multiple of 8")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the whole usage block first)
        raise UsageError(message)

    def add(self, flag, text="", **kw):
        """A flag whose default lives in DEFAULTS (and TINY): filled in after parsing, named in the help."""
        key = flag[2:].replace("-", "_")
        tiny = f"; tiny: {TINY[key]}" if key in TINY else ""
        default = "the run's" if self.prog.endswith("sample") else f"{DEFAULTS[key]}{tiny}"
        self.add_argument(flag, help=f"{text} (default {default})".lstrip(), **kw)


def parse_args(argv):
    sample = argv[:1] == ["sample"]
    if sample:
        p = Parser(prog="b4m.py sample", description="Sample again from a finished run, without training.")
        p.add_argument("--run", required=True, help="a finished run's --out folder")
        p.add_argument("--seed", type=int, help="default: the run's")
        p.add_argument("--export", help=f"also write the (scaled) made adapter to DIR/{WEIGHTS} and DIR/{KOHYA.format('b4m')}")
        p.add_argument("--report", action="store_true", help="recompute report.json (drift and effect)")
    else:
        p = Parser(prog="b4m.py", description="Train B4M: content stage, style stage, make; then sample.",
                   epilog="Images: png, jpg/jpeg, webp, bmp, gif. `python b4m.py sample -h`: sampling again.")
        p.add_argument("--content", required=True, help="folder of content images (prompt.txt optional)")
        p.add_argument("--style", required=True, help="folder of style images (prompt.txt optional)")
        p.add_argument("--content-prompt", help=f"default: the folder's prompt.txt, else '{PROMPTS['content']}'")
        p.add_argument("--style-prompt", help=f"default: the folder's prompt.txt, else '{PROMPTS['style']}'")
        p.add_argument("--aux-style", nargs="+", default=[], metavar="DIR", help="auxiliary style sets (MCP), each with prompt.txt")
        p.add_argument("--aux-content", nargs="+", default=[], metavar="DIR", help="auxiliary content sets, each with prompt.txt")
        p.add("--model", "hub id or local folder of an SD 1.x/2.x/SDXL pipeline, or tiny / tiny-sdxl (offline, random)")
        p.add("--out")
        p.add("--rank", "LoRA rank r", type=POSITIVE_INT)
        p.add("--resolution", "training size", type=RESOLUTION)
        p.add("--steps", "optimizer steps per break stage", type=STEPS)
        p.add("--make-steps", "make fine-tuning steps; 0 = exact reassembly", type=STEPS)
        p.add("--batch-size", type=POSITIVE_INT)
        p.add("--grad-accum", type=POSITIVE_INT)
        p.add("--lr", "the stage's own half", type=POSITIVE)
        p.add("--aux-lr", "the other half, on the auxiliary sets", type=POSITIVE)
        p.add("--make-lr", type=POSITIVE)
        p.add("--max-grad-norm", "clip each trained half's gradient norm; 0 = off", type=NON_NEGATIVE)
        p.add("--seed", type=int)
        p.add("--checkpoint-every", "optimizer steps between checkpoints; 0 = only on Ctrl-C/SIGTERM", type=STEPS)
        p.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory (SDXL on small GPUs)")
        p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
        p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
        p.add_argument("--no-orth-prior", action="store_true", help="ablation: A, C drawn independently")
        p.add_argument("--no-mcp", action="store_true", help="ablation: no auxiliary loss in the break stages")
        p.add_argument("--no-precondition", action="store_true", help="ablation: plain AdamW in make")
        p.add_argument("--baseline", choices=["b4m", "lora-merge"], default="b4m",
                       help="lora-merge: the paper's naive baseline, two ordinary LoRAs trained apart and summed")
    p.add_argument("--prompt", help=f"combined prompt for the made adapter (default: '{PROMPTS['b4m']}')")
    p.add("--num-samples", "images per prompt", type=POSITIVE_INT)
    p.add("--sample-steps", "sampling steps", type=POSITIVE_INT)
    p.add_argument("--sample-resolution", type=RESOLUTION,
                   help="sampling size (default: the model's own, unet sample_size x VAE scale: 1024 for SDXL)")
    p.add_argument("--content-scale", type=float, default=1.0, help="s_c: V = [C, s_c D] at sampling")
    p.add_argument("--style-scale", type=float, default=1.0, help="s_s: U = [A; s_s B] at sampling")
    p.add_argument("--scale-grid", action="store_true", help=f"also render samples/scale_grid.png over {SCALES}")
    p.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="frozen model precision (auto: fp16 on cuda, else fp32); adapters stay fp32")
    args = p.parse_args(argv[1:] if sample else argv)
    args.command = "sample" if sample else "train"
    if not sample:  # `sample` takes the run's settings instead
        for key, value in {**DEFAULTS, **(TINY if args.model in PRESETS else {})}.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    args.prompt = args.prompt or (None if sample else PROMPTS["b4m"])
    return args


def pick_device(args):
    auto = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = auto if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available() or device == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: not available on this machine; use --device cpu or auto")
    dtype = args.dtype if args.dtype != "auto" else "fp16" if device == "cuda" else "fp32"
    if dtype == "fp16" and device == "cpu":
        raise UsageError("--dtype fp16: not supported on the CPU; use fp32 or bf16")
    return device, dtype


def check_baseline(args):
    """The lora-merge baseline has no PLP halves: the flags that act on them would do nothing."""
    given = {"--content-scale": args.content_scale != 1, "--style-scale": args.style_scale != 1, "--scale-grid":
             args.scale_grid, **{"--" + k.replace("_", "-"): getattr(args, k, None) for k in
                                 ("aux_style", "aux_content", "no_orth_prior", "no_mcp", "no_precondition")}}
    for flag in (f for f, v in given.items() if v and args.baseline != "b4m"):
        raise UsageError(f"{flag}: only for B4M runs, not --baseline {args.baseline}")


def settings_of(args, stage=None):
    now = vars(args)
    return {k: now[k] for k in RUN + (STAGES[stage] if stage else ())}  # KeyError on a misspelt name


def adapter_metadata(args, stage):
    return {"stage": stage, "method": args.baseline, "rank": args.rank, "seed": args.seed,
            "prior": "random" if args.no_orth_prior else "orthogonal", "base_model": args.model, "version": __version__}


def prepare_out(args):
    """Refuse to touch an existing run unless --resume or --overwrite; with --resume, the stored
    settings must match. Returns the stages already finished (to skip)."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is a file; pass a folder path")
    config = out / "config.json"
    if not (config.exists() or any((out / s).is_dir() for s in STAGES)):
        return set()
    if args.overwrite:  # the old run's adapters and checkpoints go: a later --resume must not take them as this run's
        for stage in STAGES:
            for name in (WEIGHTS, KOHYA.format(stage), CHECKPOINT):
                (out / stage / name).unlink(missing_ok=True)
        return set()
    if not args.resume:
        raise UsageError(f"--out {out}: already holds a run; pass --resume to continue it, --overwrite to "
                         f"replace it, or another --out")
    try:
        old = json.loads(config.read_text())["settings"]
    except Exception:
        raise UsageError(f"--resume: {config} is missing or unreadable; use --overwrite or another --out")
    now = settings_of(args)
    differ = [k for k in RUN if old.get(k) != now[k]]
    if differ:
        raise UsageError(f"--resume: settings differ from the run in {out}: "
                         + ", ".join(f"{k} (was {old.get(k)!r}, now {now[k]!r})" for k in differ))
    for folder in (out, out / "samples", *(out / s for s in STAGES)):  # left by a kill in the middle of a write
        for tmp in folder.glob(".*.tmp[0-9]*"):
            tmp.unlink()
    kept = lambda s: (out / s / WEIGHTS).exists() and all(old.get(k) == v for k, v in settings_of(args, s).items())  # noqa: E731
    done = set(itertools.takewhile(kept, STAGES))  # a later stage depends on every earlier one
    for stage in done:  # a kill between a stage's last write and this deletion leaves one behind
        (out / stage / CHECKPOINT).unlink(missing_ok=True)
    return done


@contextlib.contextmanager
def stop_on_signals():
    """Ctrl-C and SIGTERM (schedulers, `timeout`, `docker stop`) ask training to stop after the
    current step, in a checkpoint; a second Ctrl-C stops at once, keeping the last checkpoint."""
    asked = []

    def ask(signum, frame):
        if asked and signum == signal.SIGINT:
            raise KeyboardInterrupt
        asked.append(signum)
    old = {s: signal.signal(s, ask) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield asked
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def run_stage(stage, pipe, noise_scheduler, data, adapters, args, asked):
    """One stage of sections 4-5, continued from its checkpoint when one matches; a checkpoint every
    --checkpoint-every steps, and where a signal in `asked` stops it. Returns ((adapter, loss log), seconds)."""
    path, settings = Path(args.out) / stage / CHECKPOINT, settings_of(args, stage)
    state = load_checkpoint(path, settings) if args.resume and path.exists() else None
    if state:
        print(f"{stage}: continuing from step {state['step']} ({path})", file=sys.stderr)
    total, t0 = args.make_steps if stage == "b4m" else args.steps, time.time() - (state or {}).get("seconds", 0)

    def on_step(step, loop_state):
        if asked or args.checkpoint_every and step % args.checkpoint_every == 0 and step < total:
            checkpoint = {**loop_state(), "settings": settings, "seconds": time.time() - t0}
            write_file(path, lambda f: torch.save(checkpoint, f))
        if asked:
            raise Interrupted(asked[0], f"stopped in the {stage} stage after step {step}, saved in {path}; "
                                        f"run the same command with --resume to continue from there")

    kw = dict(rank=args.rank, seed=args.seed, batch_size=args.batch_size, grad_accum=args.grad_accum,
              max_grad_norm=args.max_grad_norm, state=state, on_step=on_step)
    try:
        if args.baseline == "lora-merge":
            result = ((merge_loras(adapters["content"], adapters["style"]), []) if stage == "b4m" else
                      lora_stage(stage, pipe.unet, noise_scheduler, data[stage], steps=args.steps, lr=args.lr, **kw))
        elif stage == "b4m":
            result = make_stage(pipe.unet, noise_scheduler, data["content"], data["style"], adapters["content"],
                                adapters["style"], steps=args.make_steps, lr=args.make_lr,
                                precondition=not args.no_precondition, **kw)
        else:
            result = break_stage(stage, pipe.unet, noise_scheduler, data[stage], data["aux"][stage], steps=args.steps,
                                 lr=args.lr, aux_lr=args.aux_lr, mcp=not args.no_mcp, orth_prior=not args.no_orth_prior, **kw)
    except FloatingPointError as e:
        raise UsageError(f"{stage} stage, {e}; lower --lr/--aux-lr/--make-lr (finished stages are kept)") from None
    except ValueError as e:  # the method's own refusals (scaffolds that differ, a checkpoint of other shapes)
        raise UsageError(f"{stage} stage: {e}") from None
    return result, time.time() - t0


def train_main(args):
    # Everything that can be checked without the model's weights is, so a typo costs seconds.
    device, args.dtype = pick_device(args)  # stored resolved: --resume must not mix fp16 and fp32 stages
    check_model(args.model, args.rank)
    check_baseline(args)
    content_px, args.content_prompt = load_image_set(args.content, "--content", args.resolution,
                                                     args.content_prompt, PROMPTS["content"])
    style_px, args.style_prompt = load_image_set(args.style, "--style", args.resolution,
                                                 args.style_prompt, PROMPTS["style"])
    aux_style_px = [load_image_set(folder, "--aux-style", args.resolution) for folder in args.aux_style]
    aux_content_px = [load_image_set(folder, "--aux-content", args.resolution) for folder in args.aux_content]
    # Absolute paths in config.json: `sample`, `--resume` and evaluate.py work from any folder.
    args.content, args.style = str(Path(args.content).resolve()), str(Path(args.style).resolve())
    args.aux_style, args.aux_content = ([str(Path(d).resolve()) for d in ds] for ds in (args.aux_style, args.aux_content))
    args.model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    done = prepare_out(args)

    pipe = load_pipeline(args.model, device, DTYPES[args.dtype])
    check_rank(args.rank, pipe.unet)
    args.sample_resolution = args.sample_resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    if args.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the training-time forward process
    data = {"content": encode_set(pipe, content_px, args.content_prompt), "style": encode_set(pipe, style_px, args.style_prompt)}
    # The sets each break stage trains its other half on. With none given, the other target set:
    # b4m's own default (the official scripts require three auxiliary folders, no single-set path).
    data["aux"] = {"content": [encode_set(pipe, *px_prompt) for px_prompt in aux_style_px] or [data["style"]],
                   "style": [encode_set(pipe, *px_prompt) for px_prompt in aux_content_px] or [data["content"]]}

    out = Path(args.out)
    versions = {"b4m": __version__, **{p: package_version(p) for p in ("torch", "diffusers", "transformers")}}
    save_json(out / "config.json", {"settings": {k: v for k, v in vars(args).items() if k not in ("resume", "overwrite")},
                                    "versions": versions})
    log, adapters = [], {}
    if done:
        log = [row for row in list(csv.reader((out / "losses.csv").read_text().splitlines()))[1:] if row[0] in done]
    seconds = read_report(out).get("seconds", {}) if done else {}  # a new or overwritten run starts a new report
    with stop_on_signals() as asked:
        for stage in STAGES:
            if stage in done:
                adapters[stage] = load_lora(out / stage / WEIGHTS, pipe.unet, adapter_metadata(args, stage))[0]
                print(f"{stage}: kept {out / stage / WEIGHTS} (--resume)", file=sys.stderr)
                continue
            (adapters[stage], stage_log), seconds[stage] = run_stage(stage, pipe, noise_scheduler, data, adapters, args, asked)
            log += [[stage, step, *(f"{v:.6g}" for v in losses), *[""] * (2 - len(losses))] for step, *losses in stage_log]
            save_csv(out / "losses.csv", log)
            save_json(out / "report.json", {"seconds": {k: round(v, 3) for k, v in seconds.items()}})
            save_lora(out / stage, adapters[stage], adapter_metadata(args, stage))  # the mark of a finished stage
            (out / stage / CHECKPOINT).unlink(missing_ok=True)
            if asked:  # a signal after the stage's last step
                raise Interrupted(asked[0], f"stopped after the {stage} stage (saved); run it again with --resume")
    finish(pipe, adapters, args)
    print(f"wrote {out}: content/, style/, b4m/ (adapters), config.json, losses.csv, report.json", file=sys.stderr)


def read_report(out):
    return json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else {}


def finish(pipe, adapters, args, report=True):
    """samples/{content,style,b4m}_{i}.png, grid.png (a row each) and report.json, shared by training and `sample`."""
    out = Path(args.out)
    for old in (out / "samples").glob("*.png"):  # samples/ holds the latest sampling only: evaluate.py reads it all
        old.unlink()
    sampling = dict(num_samples=args.num_samples, steps=args.sample_steps, resolution=args.sample_resolution, seed=args.seed)
    if args.scale_grid:  # the made adapter at every pair of strengths: rows s_s, columns s_c, one image each
        one = {**sampling, "num_samples": 1}
        cells = [[generate(pipe, scale_made(adapters["b4m"], c, s), args.prompt, **one)[0] for c in SCALES] for s in SCALES]
        save_image(out / "samples" / "scale_grid.png", image_grid(cells))
    adapters = {**adapters, "b4m": scale_made(adapters["b4m"], args.content_scale, args.style_scale)}  # (1, 1): as is
    prompts, rows = {"content": args.content_prompt, "style": args.style_prompt, "b4m": args.prompt}, []
    for stage, sd in adapters.items():
        rows.append(generate(pipe, sd, prompts[stage], **sampling))
        for i, im in enumerate(rows[-1]):
            save_image(out / "samples" / f"{stage}_{i}.png", im)
    save_image(out / "samples" / "grid.png", image_grid(rows))
    print(f"wrote {out / 'samples'}", file=sys.stderr)
    if not report:
        return
    result = drift_report(pipe, adapters, prompts, args.resolution, args.seed)  # at the training resolution
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
    missing = [s for s in STAGES if not (run / s / WEIGHTS).is_file()]
    if missing:
        raise UsageError(f"--run {run}: no {missing[0]}/{WEIGHTS}; finish the run first (--resume)")
    if args.export and Path(args.export).resolve() in [(run / s).resolve() for s in STAGES]:
        raise UsageError(f"--export {args.export}: a stage folder of the run, which it would overwrite; pick another folder")
    check_model(args.model, args.rank)
    pipe = load_pipeline(args.model, device, DTYPES[dtype])
    adapters = {s: load_lora(run / s / WEIGHTS, pipe.unet, adapter_metadata(argparse.Namespace(**config), s))[0]
                for s in STAGES}
    if args.export:
        made = scale_made(adapters["b4m"], args.content_scale, args.style_scale)
        meta = {**adapter_metadata(args, "b4m"), "content_scale": args.content_scale, "style_scale": args.style_scale}
        save_lora(args.export, made, meta)
    finish(pipe, adapters, args, report=args.report)


def main(argv=None):
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        (sample_main if args.command == "sample" else train_main)(args)
    except UsageError as e:
        print(f"b4m: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"\nb4m: {e.args[1]}", file=sys.stderr)
        return 128 + e.args[0]
    except KeyboardInterrupt:
        print("\nb4m: stopped at once; what was saved is kept: run the same command with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
