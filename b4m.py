"""
B4M, "Break-for-Make", in one file: content-style customization of a text-to-image diffusion
model with partly learnable LoRA projections (PLP).

    Yu Xu, Fan Tang, Juan Cao, Yuxin Zhang, Oliver Deussen, Weiming Dong, Jintao Li, Tong-Yee Lee.
    "B4M: Breaking Low-Rank Adapter for Making Content-Style Customization", ACM TOG 2025
    (arXiv 2403.19456, "Break-for-Make"). Preconditioner: Zhang & Pilanci, "Riemannian
    Preconditioned LoRA for Fine-Tuning Foundation Models", ICML 2024 (arXiv 2402.02347).

The method, sections 1-6, in the paper's order (they need torch alone and touch no files):
  1. PLP: a LoRA dW = U V whose up projection U = [A; B] and down projection V = [C, D] are
     half frozen (A, C) and half learned (B, D).
  2. The orthogonal prior: A and C cut from one orthonormal basis; a PLP in every attention layer.
  3. The Riemannian-preconditioned AdamW that make uses.
  4. Break: one PLP learns the content in D, another the style in B, each while its other half
     learns to work with auxiliary sets of the other kind (MCP).
  5. Make: the two halves reassembled into one LoRA, U = [A; B_style], V = [C, D_content], and
     fine-tuned briefly with 3.
  6. Sample: the made adapter is an ordinary diffusers LoRA.
Around it: 7. the flow-matching loss of SD3 / SD3.5 and FLUX.1, 8. the naive baseline and the
drift report, 9. models (diffusers), 10. files, 11. the command line (checkpoints, --resume,
one-line errors).

    python b4m.py --content DIR --style DIR [--model ID_OR_FOLDER] [--out runs/b4m]
    python b4m.py sample --run runs/b4m [--prompt "a snq object in w@z style"]
"""
import argparse
import contextlib
import csv
import functools
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

# Only torch is imported here: sections 1-6 copy out into any project that has torch. The
# plumbing's packages (diffusers, transformers, peft, PIL, safetensors, tqdm) are imported in
# the functions that use them.

__version__ = "0.2.0"

# ---------------------------------------------------------------------------------------------
# 1. Partly learnable projection (PLP)
#       U = [A; B]  (m x r),   V = [C, D]  (r x n),   dW = U V = [[A C, A D],
#                                                               [B C, B D]]
#       A: the first m_f = m // 2 rows of U,  C: the first n_f = n // 2 columns of V (frozen);
#       B: the other rows of U,               D: the other columns of V (learned).
# ---------------------------------------------------------------------------------------------


def halves(U, V):
    """The paper's four blocks (A, B, C, D) of a LoRA pair U (m x r), V (r x n)."""
    # The frozen halves take the first m // 2 rows and n // 2 columns: with odd sizes the learned
    # halves B and D are one row or column larger. Slices are views: no copy, same storage.
    m_f, n_f = U.shape[0] // 2, V.shape[1] // 2
    return U[:m_f], U[m_f:], V[:, :n_f], V[:, n_f:]


class PLPLinear(nn.Module):
    """y = W0 x + U (V x): a frozen linear layer W0 plus a rank-r LoRA whose blocks A and C are
    frozen (given, section 2) and whose blocks B and D are learned."""

    def __init__(self, base: nn.Linear, A, C, generator=None):
        super().__init__()
        self.base = base.requires_grad_(False)
        m, n, rank = base.out_features, base.in_features, A.shape[1]
        if A.shape != (m // 2, rank) or C.shape != (rank, n // 2):
            raise ValueError(f"A {tuple(A.shape)} and C {tuple(C.shape)} do not fit a {m}x{n} "
                             f"layer at rank {rank}: A must be {m // 2}x{rank}, C {rank}x{n // 2}")
        # At least fp32: Adam's small updates to B and D would round away in fp16/bf16 weights.
        dtype = torch.promote_types(base.weight.dtype, torch.float32)
        kw = dict(dtype=dtype, device=base.weight.device)
        # A and C are buffers, not parameters: frozen by construction. No gradient reaches them,
        # no optimizer holds them, weight decay cannot shrink them (it did in the official code),
        # and they stay bit-identical between the content and the style run, which make needs.
        self.register_buffer("A", A.to(**kw))
        self.register_buffer("C", C.to(**kw))
        # The official initialisation: B = 0, D ~ N(0, 1/r^2), the init of diffusers'
        # LoRALinearLayer that the official code builds on (down projection random, up zero).
        # Unlike in a plain LoRA, dW = [[A C, A D], [0, 0]] is NOT zero at step 0: a fresh PLP
        # already changes the layer through its frozen rows A, and A C never changes again.
        # (A, C != 0 also means that neither half needs the other's randomness to get gradients.)
        D = torch.randn(rank, n - n // 2, generator=generator, dtype=torch.float64) / rank
        self.B = nn.Parameter(torch.zeros(m - m // 2, rank, **kw))
        self.D = nn.Parameter(D.to(**kw))

    @property
    def U(self):  # m x r, the up projection [A; B]
        return torch.cat([self.A, self.B], 0)

    @property
    def V(self):  # r x n, the down projection [C, D]
        return torch.cat([self.C, self.D], 1)

    def delta_weight(self):
        return self.U @ self.V

    def forward(self, x):
        # y = W0 x + U (V x): two thin matmuls (r x n, then m x r), never the m x n product U V.
        # The rank-r path U (V x), in the adapter's dtype, at scale 1: the official scripts set
        # the LoRA alpha to the rank, and alpha / r = 1.
        h = F.linear(F.linear(x.to(self.B.dtype), self.V), self.U)
        return self.base(x) + h.to(x.dtype)


def lora_state_dict(layers, prefix="unet"):
    """PLP layers ({module name: PLPLinear}) as an ordinary diffusers LoRA state dict, scale 1.
    Legend: diffusers' letters are not the paper's. Its lora_A is the down projection, V = [C, D];
    its lora_B is the up projection, U = [A; B]."""
    sd = {}
    for name, layer in layers.items():
        # fp32 on the CPU, contiguous: what safetensors writes and any loader reads back.
        sd[f"{prefix}.{name}.lora_A.weight"] = layer.V.detach().float().cpu().contiguous()
        sd[f"{prefix}.{name}.lora_B.weight"] = layer.U.detach().float().cpu().contiguous()
    return sd


@torch.no_grad()
def load_plp_state(layers, sd, prefix="unet"):
    """Every block of every layer from a LoRA state dict: the scaffold drawn at init is replaced."""
    for name, layer in layers.items():
        U, V = sd[f"{prefix}.{name}.lora_B.weight"], sd[f"{prefix}.{name}.lora_A.weight"]
        A, B, C, D = halves(U, V)
        layer.A.copy_(A)
        layer.B.copy_(B)
        layer.C.copy_(C)
        layer.D.copy_(D)


# ---------------------------------------------------------------------------------------------
# 2. Orthogonal prior, and a PLP in every attention projection
#       Q = qr(N(0, 1)^{(m_f + n_f) x r}),   A = Q[:m_f],   C = Q[m_f:]^T
#       =>  A^T A + C C^T = Q^T Q = I_r
# ---------------------------------------------------------------------------------------------


def check_layer_rank(out_features, in_features, rank):
    limit = out_features // 2 + in_features // 2
    if rank < 1 or rank > limit:  # Q has m_f + n_f rows: at most that many orthonormal columns
        raise ValueError(f"rank must be between 1 and m_f + n_f = {limit} "
                         f"for a {out_features}x{in_features} layer, got {rank}")


def orthogonal_prior(out_features, in_features, rank, generator=None):
    """The frozen scaffold (A, C), cut from one orthonormal basis. Why: the two frozen blocks then
    share the r directions without redundancy (A^T A + C C^T = I), and when r <= m_f, n_f each of
    A and C alone has full rank r, so the Gram matrices U^T U and V V^T that the preconditioner of
    section 3 inverts are invertible from the first step, whatever B and D are.
    b4m draws it for every adapted layer; the official code only for some (README, differences).
    float64, on the CPU: the same (seed, layer) gives bit-identical A and C on any device."""
    check_layer_rank(out_features, in_features, rank)
    m_f, n_f = out_features // 2, in_features // 2
    gaussian = torch.randn(m_f + n_f, rank, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(gaussian)
    Q = Q * torch.sign(torch.diagonal(R))  # the unique QR (R's diagonal > 0): Q is the draw's alone
    A, C = Q[:m_f], Q[m_f:].T.contiguous()
    return A, C


def random_prior(out_features, in_features, rank, generator=None):
    """Ablation (--no-orth-prior): A and C drawn independently, at the orthonormal draw's scale."""
    check_layer_rank(out_features, in_features, rank)
    m_f, n_f = out_features // 2, in_features // 2
    std = (m_f + n_f) ** -0.5  # the size of an entry of a unit vector of length m_f + n_f
    A = torch.randn(m_f, rank, generator=generator, dtype=torch.float64) * std
    C = torch.randn(rank, n_f, generator=generator, dtype=torch.float64) * std
    return A, C


def seeded(seed, name):
    """A CPU generator seeded by (seed, name). The content and the style run must draw the same
    A and C in every layer, or make would join halves learned against different scaffolds: each
    layer draws from its own (seed, layer name). sha256, not hash(): Python salts hash() per run."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


# Every attention projection: a UNet's to_q, to_k, to_v, to_out.0 (self- and cross-attention);
# in an MMDiT (SD3, FLUX) also the text stream's add_q_proj, add_k_proj, add_v_proj, to_add_out.
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
           "to_add_out")


def is_target(name, module):
    return name.endswith(tuple("." + t for t in TARGETS)) and isinstance(module, nn.Linear)


def add_plp(denoiser, rank, seed, prior=orthogonal_prior, scale=1.0):
    """Wrap every attention projection of the denoiser (TARGETS) in a PLPLinear: every block, as
    in the paper; no feed-forward or convolution layers. Returns {module name: PLPLinear}.
    scale (--prior-scale; 1 = the paper's construction, the official init): multiplies A, C and
    D's initial draw, so A^T A + C C^T = scale^2 I and the step-0 change dW = [[A C, A D], [0, 0]]
    shrinks by scale^2. Why it is there: the frozen blocks carry the other half's learning (a
    step on D reaches the output through A, one on B through C), and at a low rank in a narrow
    layer the orthonormal A C is a large part of W0's own corner (0.38-0.94 of its norm in the toy
    world's models: README). Not in the paper."""
    layers = {}
    # list(...): the loop replaces modules, so it walks a snapshot of the module tree.
    for name, module in list(denoiser.named_modules()):
        if is_target(name, module):
            generator = seeded(seed, name)
            A, C = prior(module.out_features, module.in_features, rank, generator)
            layers[name] = PLPLinear(module, scale * A, scale * C, generator)  # D: same generator
            with torch.no_grad():
                layers[name].D.mul_(scale)  # (x 1.0 is exact: the default changes no bit)
            denoiser.set_submodule(name, layers[name])
    return layers


def remove_plp(denoiser):
    """The denoiser as it was: every PLPLinear replaced by its frozen base layer."""
    for name, module in list(denoiser.named_modules()):
        if isinstance(module, PLPLinear):
            denoiser.set_submodule(name, module.base)


# ---------------------------------------------------------------------------------------------
# 3. Riemannian preconditioned step (Zhang & Pilanci 2024), used by make (section 5)
#       G_B <- G_B (V V^T + delta I)^-1,      G_D <- (U^T U + delta I)^-1 G_D,      then AdamW
# ---------------------------------------------------------------------------------------------


def riemannian_precondition(U, V, G_B, G_D, delta=1e-6):
    """Preconditioned gradients of B (any block of rows of U) and D (any block of columns of V).

    Why: dW = U V has many factorisations (U M, M^-1 V), and a plain gradient step favours
    whichever factor happens to be larger. With these gradients a plain (SGD) step on the full U
    and V, at delta = 0, changes dW to first order by -lr (G P_row(V) + P_col(U) G), G = dL/d(dW):
    it depends only on U's column space and V's row space, the same for every factorisation.
    B4M steps only B and D, and through AdamW (the official choice), so this is the motivation
    rather than an exact property of make's step. In B4M this is what balances content and
    style: B's step (style) is rescaled by V's Gram matrix, which holds the content half D, and
    D's step (content) by U's Gram matrix, which holds the style half B.

    The r x r factors act on the rank side, so preconditioning the full gradients of U and V and
    then keeping the B rows and D columns is the same as this. Batched over a leading dimension.
    delta is absolute: under the orthogonal prior U^T U and V V^T are of order 1, so 1e-6 only
    guards ranks above m_f or n_f, where A or C alone cannot fill r dimensions."""
    eye = delta * torch.eye(U.shape[-1], dtype=U.dtype, device=U.device)
    G_B = torch.linalg.solve(V @ V.mT + eye, G_B, left=False)  # G_B (V V^T + delta I)^-1
    G_D = torch.linalg.solve(U.mT @ U + eye, G_D)  # (U^T U + delta I)^-1 G_D
    return G_B, G_D


class RiemannianAdamW(torch.optim.AdamW):
    """AdamW on the B and D of PLP layers, fed preconditioned gradients ("scaled AdamW": the
    preconditioner acts on the gradient that Adam's moments see, not on Adam's step).
    U and V are read as they are at each step, nothing is cached. Layers of one shape are
    preconditioned in one batched solve. Two parameter groups, every B and every D, so that the
    training loop clips the two halves apart."""

    def __init__(self, layers, lr=1e-4, delta=1e-6, **adamw):  # adamw: betas, eps, weight_decay
        self.delta = delta
        self.same_shape = {}  # (shapes of A, B, C, D): the layers that torch.stack can batch
        for layer in layers:
            key = (layer.A.shape, layer.B.shape, layer.C.shape, layer.D.shape)
            self.same_shape.setdefault(key, []).append(layer)
        layers = [layer for group in self.same_shape.values() for layer in group]
        halves_B = {"params": [layer.B for layer in layers]}
        halves_D = {"params": [layer.D for layer in layers]}
        super().__init__([halves_B, halves_D], lr=lr, **adamw)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("RiemannianAdamW needs the gradients before the step: "
                             "call backward(), then step()")
        for group in self.same_shape.values():
            # A layer the loss does not reach (SD3's last add_q_proj: that block's text output is
            # discarded) gets an exactly zero gradient, which make_step turns into None
            # (leave_unreached, section 4): it is left as it is, as AdamW leaves such parameters.
            reached = [layer.B.grad is not None or layer.D.grad is not None for layer in group]
            group = [layer for layer, was in zip(group, reached) if was]
            if any(layer.B.grad is None or layer.D.grad is None for layer in group):
                raise ValueError("RiemannianAdamW: a layer needs gradients for both B and D")
            if not group:
                continue
            # One batch of r x r systems for all layers of this shape: for SDXL's 140 layers a
            # few solves instead of 280 small ones, the same numbers as one layer at a time.
            U = torch.stack([layer.U for layer in group])
            V = torch.stack([layer.V for layer in group])
            G_B = torch.stack([layer.B.grad for layer in group])
            G_D = torch.stack([layer.D.grad for layer in group])
            P_B, P_D = riemannian_precondition(U, V, G_B, G_D, self.delta)
            for i, layer in enumerate(group):
                layer.B.grad = P_B[i]
                layer.D.grad = P_D[i]
        return super().step()


# ---------------------------------------------------------------------------------------------
# 4. Break: two PLPs trained apart, with multi-correspondence projection learning (MCP)
#       content stage:  D <- grad_D L_content,   B <- grad_B mean_k L_aux_style_k
#       style stage:    B <- grad_B L_style,     D <- grad_D mean_k L_aux_content_k
#       L = || eps_theta(z_t, t, c) - target ||^2,   target = eps, or v (v-prediction models)
# ---------------------------------------------------------------------------------------------
# The paper assigns the content to the down projection (D) and the style to the up projection
# (B). One way to read it (ours, not the paper's words): V reads the layer's input, choosing the
# directions the adapter responds to, and U writes the output, choosing what it adds there; a
# new subject is something to respond to, a new look a way of rendering. MCP keeps each half
# general: while one half learns its concept, the other is trained on other concepts of the
# other kind, so that the two learned halves of make, from different runs, work together.


def denoise(unet, z_t, t, cond):
    """eps_theta(z_t, t, c); SDXL's UNet also takes its pooled text embedding and size ids."""
    extra = {k: v for k, v in cond.items() if k != "encoder_hidden_states"}
    hidden = cond["encoder_hidden_states"]
    return unet(z_t, t, encoder_hidden_states=hidden, added_cond_kwargs=extra or None).sample


def draw_batch(sets, batch_size, generator, device):
    """batch_size images of each set, drawn with replacement: their latents z0, a fresh sample
    of each image's posterior, and the conditioning, repeated per image; all sets concatenated."""
    z0, cond = [], {}
    # Every random draw comes from the stage's generator, in a fixed order: a run is
    # reproducible, and a resumed run continues the same stream where it stopped.
    for s in sets:
        i = torch.randint(len(s["mean"]), (batch_size,), generator=generator)
        eps = torch.randn(s["mean"][i].shape, generator=generator).to(device)
        z0.append(s["mean"][i] + s["std"][i] * eps)  # z0 ~ q(z | image)
        for k, v in s["cond"].items():  # one prompt per set: its conditioning repeated per image
            cond.setdefault(k, []).append(v.expand(batch_size, *v.shape[1:]))
    return torch.cat(z0), {k: torch.cat(v) for k, v in cond.items()}


def denoising_loss(unet, noise_scheduler, batch_size, sets, generator):
    """The loss L of each set (a tensor, one value per set), on batch_size images of each, drawn
    with replacement. A set is a dict (made once, before training, by encode_set in section 9):
    "mean", "std": the latent posterior of each of its images (N x 4 x h x w); "cond": its
    prompt's conditioning for the UNet. All sets go through one forward: the UNet treats every
    image of a batch on its own (no batch statistics), so each set's loss is what a forward of its
    own would give, up to rounding. Fresh noise and timesteps for every set (the official scripts
    reused the main batch's for the auxiliary one, a coupling the paper does not ask for)."""
    dev = unet.device
    z0, cond = draw_batch(sets, batch_size, generator, dev)
    noise = torch.randn(z0.shape, generator=generator).to(dev)
    T = noise_scheduler.config.num_train_timesteps
    t = torch.randint(T, (len(z0),), generator=generator).to(dev)
    z_t = noise_scheduler.add_noise(z0, noise, t)  # sqrt(abar_t) z0 + sqrt(1 - abar_t) eps
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    else:  # v-prediction (SD 2.x): v = sqrt(abar_t) eps - sqrt(1 - abar_t) z0
        target = noise_scheduler.get_velocity(z0, noise, t)
    pred = denoise(unet, z_t.to(unet.dtype), t, cond)
    # Plain MSE, averaged over each image's latent, then over each set's images: no SNR
    # weighting and no prior preservation, as in the official scripts.
    per_image = F.mse_loss(pred.float(), target.float(), reduction="none").mean((1, 2, 3))
    return per_image.view(len(sets), -1).mean(1)


def leave_unreached(optimizer):
    """A PLP half whose gradient is exactly zero is one the loss does not reach (SD3's last
    add_q_proj: that block's text output is discarded). Its gradient set to None, AdamW leaves it
    as it is, instead of shrinking it by its weight decay. A reached half's gradient is not
    exactly zero in practice. With G = dL/d(dW): B's gradient is G's bottom rows times V^T, zero
    only if those rows are orthogonal to every row of V; D's is U^T times G's right columns, zero
    only if those are orthogonal to every column of U."""
    for half in optimizer.param_groups:
        for p in half["params"]:
            if p.grad is not None and not p.grad.any():
                p.grad = None


def clip_and_step(optimizer, scaler, max_grad_norm):
    """Clip each trained half (an optimizer parameter group) to max_grad_norm (0: off), as the
    official break scripts clip each half, then take the optimizer step.
    scaler: fp16 models' loss scaler (torch.amp.GradScaler); a disabled one changes nothing."""
    scaler.unscale_(optimizer)  # clipping sees the true gradients
    if max_grad_norm:
        for half in optimizer.param_groups:
            nn.utils.clip_grad_norm_(half["params"], max_grad_norm)
    scaler.step(optimizer)  # fp16: skipped if a gradient overflowed
    scaler.update()
    # None, not zero: the next backward(inputs=...) starts from nothing, and a half that gets no
    # gradient at all (--no-mcp) is skipped by AdamW, so its weight decay leaves it as it is too.
    optimizer.zero_grad(set_to_none=True)


def break_step(loss, target, aux, own, other, optimizer, *, generator, scaler,
               grad_accum=1, max_grad_norm=1.0):
    """One optimizer step of a break stage. loss(sets, generator): one loss per set. own, other:
    the parameters of the stage's own half and of the other half. aux: the auxiliary sets, or
    None (--no-mcp). Returns [L_target, L_aux] averaged over the
    grad_accum micro-steps ([L_target] alone without auxiliary sets)."""
    L_target, L_aux = 0.0, 0.0
    for _ in range(grad_accum):
        # MCP: the target loss is backpropagated into the stage's own half only, and the
        # auxiliary loss into the other half only: backward(inputs=...) computes and adds the
        # gradient of those tensors alone. In the content stage D learns from the content images
        # alone while B learns from the auxiliary style sets; in the style stage the reverse.
        # (The official scripts let both losses reach both halves: see the README.)
        L = loss([target], generator).mean()
        scaler.scale(L / grad_accum).backward(inputs=own)
        L_target += L.item() / grad_accum
        if aux:
            L = loss(aux, generator).mean()  # mean_k L_aux_k
            scaler.scale(L / grad_accum).backward(inputs=other)
            L_aux += L.item() / grad_accum
    leave_unreached(optimizer)
    clip_and_step(optimizer, scaler, max_grad_norm)
    return [L_target, L_aux] if aux else [L_target]


def plain_loop(steps, step, **state):
    """Runs a stage's steps: [[1, losses of step 1...], [2, ...], ...]. state (optimizer, scaler,
    generator) is what a checkpoint would hold: the command line's loop (section 11) uses it to
    save and resume, and adds a progress bar."""
    return [[i, *step()] for i in range(1, steps + 1)]


def loss_scaler(module):
    """fp16 models: gradients through fp16 activations underflow without loss scaling (as in
    diffusers' scripts). For fp32 and bf16 models a disabled scaler, a no-op."""
    weight = next(module.parameters())
    return torch.amp.GradScaler(weight.device.type, enabled=weight.dtype == torch.float16)


def break_stage(stage, unet, loss, content, style, aux=None, *, rank, seed, steps, lr, aux_lr,
                grad_accum=1, max_grad_norm=1.0, mcp=True, prior=orthogonal_prior, prior_scale=1.0,
                loop=plain_loop, prefix="unet"):
    """The content stage ("content") or the style stage ("style") of break.
    content, style: the two target sets. aux: the auxiliary sets, of the other kind (styles for
    the content stage); None: the other target set is the one auxiliary set. That is b4m's
    default, not an official mode (the official scripts require three auxiliary folders).
    lr: the stage's own half (official 1e-4); aux_lr: the other half (official 1e-5).
    prior, prior_scale: the scaffold's construction and size (add_plp).
    loss(sets, generator): one loss per set, for diffusers models
    functools.partial(denoising_loss, unet, noise_scheduler, batch_size). prefix: the state dict's
    key prefix, "unet", or "transformer" for SD3 and FLUX (section 7).
    Returns (the stage's adapter as a diffusers LoRA state dict, the loss log)."""
    target, other_target = (content, style) if stage == "content" else (style, content)
    aux = aux or [other_target]  # MCP with one partner: the set the stage's half must work with

    layers = add_plp(unet, rank, seed, prior, prior_scale)
    every_B = [layer.B for layer in layers.values()]  # the style half of every layer
    every_D = [layer.D for layer in layers.values()]  # the content half of every layer
    # The content stage learns the content in D (its own half); B, the other half, learns from
    # the auxiliary style sets. The style stage is the mirror image.
    own, other = (every_D, every_B) if stage == "content" else (every_B, every_D)
    # AdamW's defaults (betas 0.9/0.999, eps 1e-8, weight decay 1e-2) are the official values.
    optimizer = torch.optim.AdamW([{"params": own, "lr": lr}, {"params": other, "lr": aux_lr}])
    generator, scaler = seeded(seed, stage), loss_scaler(unet)
    # mcp=False (--no-mcp): no auxiliary loss, so the other half gets no gradient and stays as
    # initialised.
    step = functools.partial(break_step, loss, target, aux if mcp else None, own, other, optimizer,
                             generator=generator, scaler=scaler, grad_accum=grad_accum,
                             max_grad_norm=max_grad_norm)
    try:
        log = loop(steps, step, optimizer=optimizer, scaler=scaler, generator=generator)
    finally:
        remove_plp(unet)
    return lora_state_dict(layers, prefix), log


# ---------------------------------------------------------------------------------------------
# 5. Make: reassemble and fine-tune briefly
#       U = [A; B_style],   V = [C, D_content],
#       then B, D <- RiemannianAdamW on L = L_content + L_style (no auxiliary sets)
# ---------------------------------------------------------------------------------------------


def reassemble(content, style, content_scale=1.0, style_scale=1.0):
    """The made adapter, U = [A; s_s B_style], V = [C, s_c D_content], from the two stages'
    adapters (s_c = s_s = 1 in the paper). A and C of the two stages must be bit-identical, else
    the two halves were learned against different scaffolds."""
    made = {}
    for key_U in (key for key in content if key.endswith("lora_B.weight")):  # lora_B holds U
        key_V = key_U.replace("lora_B", "lora_A")
        A, B_style, C_style, _ = halves(style[key_U], style[key_V])
        A_content, _, C, D_content = halves(content[key_U], content[key_V])
        if not (torch.equal(A, A_content) and torch.equal(C, C_style)):
            layer = key_U.removesuffix(".lora_B.weight")
            raise ValueError(f"make: the frozen A/C of {layer} differ between the content and the "
                             f"style adapter; both must come from the same seed, rank and prior")
        # A from the style adapter, C from the content adapter: the same tensors, checked above.
        made[key_U] = torch.cat([A, style_scale * B_style])
        made[key_V] = torch.cat([C, content_scale * D_content], 1)
    return made


def scale_made(sd, content_scale, style_scale):
    """U = [A; s_s B], V = [C, s_c D] on any PLP adapter: strengths at sampling time."""
    return reassemble(sd, sd, content_scale, style_scale)


def make_step(loss, content, style, optimizer, *, generator, scaler, grad_accum=1,
              max_grad_norm=1.0):
    """One optimizer step of make: L = L_content + L_style, into B and D together. Returns [L]."""
    trained = [p for half in optimizer.param_groups for p in half["params"]]  # every B and D
    L_total = 0.0
    # No routing and no auxiliary sets here: the official make trains both halves on the two
    # target sets only. The preconditioner (section 3) balances the two halves' steps instead.
    for _ in range(grad_accum):
        L = loss([content, style], generator).sum()  # L_content + L_style, in one forward
        scaler.scale(L / grad_accum).backward(inputs=trained)
        L_total += L.item() / grad_accum
    leave_unreached(optimizer)
    # B and D each clipped once, after both losses; with RiemannianAdamW the clipped gradients are
    # then preconditioned, so the step itself is not bounded by max_grad_norm.
    clip_and_step(optimizer, scaler, max_grad_norm)
    return [L_total]


def make_stage(unet, loss, content, style, content_sd, style_sd, *, rank, seed, steps, lr,
               grad_accum=1, max_grad_norm=1.0, precondition=True, loop=plain_loop, prefix="unet"):
    """The made adapter: the stages' halves reassembled, then B and D fine-tuned together.
    lr: official 1e-4. precondition=False (--no-precondition): plain AdamW.
    Returns (the made adapter as a diffusers LoRA state dict, the loss log)."""
    # A fresh PLP in every attention projection, only for its structure: the same modules the
    # break stages adapted, and their B and D as parameters.
    layers = add_plp(unet, rank, seed)
    # Every block of the fresh draw replaced: U = [A; B_style], V = [C, D_content].
    load_plp_state(layers, reassemble(content_sd, style_sd), prefix)
    if precondition:
        optimizer = RiemannianAdamW(layers.values(), lr=lr)
    else:  # two parameter groups all the same, so that each half is clipped on its own
        every_B = [layer.B for layer in layers.values()]
        every_D = [layer.D for layer in layers.values()]
        optimizer = torch.optim.AdamW([{"params": every_B}, {"params": every_D}], lr=lr)
    # The make stage's random stream is named "b4m": the name it had before the stage was called
    # make in the code. Renaming it would change every made adapter's bytes.
    generator, scaler = seeded(seed, "b4m"), loss_scaler(unet)
    step = functools.partial(make_step, loss, content, style, optimizer, generator=generator,
                             scaler=scaler, grad_accum=grad_accum, max_grad_norm=max_grad_norm)
    try:
        log = loop(steps, step, optimizer=optimizer, scaler=scaler, generator=generator)
    finally:
        remove_plp(unet)
    return lora_state_dict(layers, prefix), log


# ---------------------------------------------------------------------------------------------
# 6. Sample: the made adapter is an ordinary diffusers LoRA
#       W = W0 + U V in every adapted projection; generate with the combined prompt
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def lora_loaded(pipe, sd):
    """A LoRA state dict loaded with diffusers' own loader, unfused: unfusing subtracts U V
    again, which is not exact in floating point, and later samples must see the base weights."""
    denoiser, prefix = denoiser_of(pipe)
    # dict(sd): a copy, the loader pops keys
    denoiser.load_lora_adapter(dict(sd), prefix=prefix, adapter_name="b4m")
    try:
        yield
    finally:
        denoiser.unload_lora()


def denoiser_of(pipe):
    """(the pipeline's denoiser, its LoRA key prefix): the UNet of SD/SDXL, the transformer of
    SD3 and FLUX."""
    if getattr(pipe, "unet", None) is not None:
        return pipe.unet, "unet"
    return pipe.transformer, "transformer"


def generate(pipe, sd, prompt, *, num_samples, steps, resolution, seed):
    """Images from the pipeline with the adapter sd loaded: the pipeline's own sampler and
    guidance, as the official inference script (SDXL's default guidance is 5.0)."""
    # The content and style stages' own adapters sample the same way: "individual generation".
    with lora_loaded(pipe, sd):
        generator = torch.Generator(pipe.device).manual_seed(seed)
        return pipe(prompt, num_images_per_prompt=num_samples, num_inference_steps=steps,
                    height=resolution, width=resolution, generator=generator).images


# ---------------------------------------------------------------------------------------------
# 7. Flow-matching transformers (SD3 / SD3.5, FLUX.1): the loss that changes
#       x_t = (1 - sigma) x0 + sigma eps,    L = || v_theta(x_t, t, c) - (eps - x0) ||^2
#       (sections 1-3 and 5 are unchanged: the PLP split is defined on any nn.Linear)
# ---------------------------------------------------------------------------------------------
# As diffusers' DreamBooth LoRA scripts for SD3 and FLUX train: sigma is read from a fresh copy
# of the model's FlowMatchEulerDiscreteScheduler at a timestep drawn from a density, logit-normal
# (mean 0, std 1) for SD3 as its script's default, uniform for FLUX as its script's default
# ("none"). Dropped, for one plain loss across families: the SD3 script's output
# preconditioning (on by default; it weights this loss by sigma^2) and the optional weighting
# schemes. The PLPs sit in the transformer's attention projections, image and text streams.


def flow_velocity(transformer, x_t, t, cond, flux=False, guidance=None):
    """v_theta(x_t, t, c) in latent layout (N x C x h x w). FLUX takes its latents packed in
    2 x 2 patches, position ids for the text and image tokens, the timestep divided by 1000 (its
    transformer multiplies it by 1000 again), and, if guidance-distilled (FLUX.1 dev), a guidance
    value. Its output is unpacked back to N x C x h x w."""
    text = dict(encoder_hidden_states=cond["encoder_hidden_states"],
                pooled_projections=cond["pooled_projections"])
    if not flux:  # SD3 / SD3.5
        return transformer(hidden_states=x_t, timestep=t, **text).sample
    from diffusers import FluxPipeline

    n, c, h, w = x_t.shape
    packed = FluxPipeline._pack_latents(x_t, n, c, h, w)
    image_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, x_t.device, x_t.dtype)
    text_ids = torch.zeros(text["encoder_hidden_states"].shape[1], 3).to(x_t.device, x_t.dtype)
    if transformer.config.guidance_embeds:
        g = torch.full((n,), guidance, device=x_t.device, dtype=x_t.dtype)
    else:  # FLUX.1 schnell: no guidance input
        g = None
    v = transformer(hidden_states=packed, timestep=t / 1000, guidance=g, txt_ids=text_ids,
                    img_ids=image_ids, **text).sample
    return FluxPipeline._unpack_latents(v, h, w, 1)  # sizes given in latents, not pixels: scale 1


def flow_matching_loss(transformer, noise_scheduler, batch_size, sets, generator, *,
                       density="logit_normal", flux=False, guidance=None):
    """The loss L of each set for a flow-matching transformer, like denoising_loss (section 4):
    batch_size images of each set, one forward over all sets, fresh noise and timesteps."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    dev = transformer.device
    x0, cond = draw_batch(sets, batch_size, generator, dev)  # latents (z - shift) * scale
    noise = torch.randn(x0.shape, generator=generator).to(dev)
    # u in (0, 1) from the density; t and sigma at index u T of the training schedule, which
    # runs from t = T, sigma = 1 (pure noise) down (both densities are symmetric about 1/2)
    u = compute_density_for_timestep_sampling(density, len(x0), logit_mean=0.0, logit_std=1.0,
                                              generator=generator)
    index = (u * noise_scheduler.config.num_train_timesteps).long()
    t = noise_scheduler.timesteps[index].to(dev)
    sigma = noise_scheduler.sigmas[index].to(dev).view(-1, 1, 1, 1)
    x_t = (1 - sigma) * x0 + sigma * noise  # a straight line from the image (0) to noise (1)
    target = noise - x0  # its velocity
    pred = flow_velocity(transformer, x_t.to(transformer.dtype), t, cond, flux, guidance)
    per_image = F.mse_loss(pred.float(), target.float(), reduction="none").mean((1, 2, 3))
    return per_image.view(len(sets), -1).mean(1)


# ---------------------------------------------------------------------------------------------
# 8. Beyond the method: the naive baseline, the drift report, the sample grid
# ---------------------------------------------------------------------------------------------


def lora_stage(stage, unet, loss, data, *, rank, seed, steps, lr, grad_accum=1, max_grad_norm=1.0,
               loop=plain_loop, prefix="unet"):
    """Baseline (--baseline lora-merge): an ordinary peft LoRA, as the diffusers scripts train
    one: plain AdamW on its loss, every parameter one half, every parameter stepped."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(TARGETS))
    unet.add_adapter(config, adapter_name=stage)
    named = [(n, p) for n, p in unet.named_parameters() if f".{stage}." in n]
    generator = seeded(seed, stage)
    for n, p in named:  # peft's "gaussian" init, from our own generator; fp32 whatever the model
        if "lora_A" in n:  # peft's lora_A is V: N(0, 1/r^2)
            p.data = (torch.randn(p.shape, generator=generator) / rank).to(p.device)
        else:  # lora_B is U: 0, so that dW = 0 at step 0
            p.data = torch.zeros(p.shape).to(p.device)
    params = [p for _, p in named]
    optimizer, scaler = torch.optim.AdamW(params, lr=lr), loss_scaler(unet)

    def step():
        L_total = 0.0
        for _ in range(grad_accum):
            L = loss([data], generator).mean()
            scaler.scale(L / grad_accum).backward(inputs=params)
            L_total += L.item() / grad_accum
        # No leave_unreached here: lora_A's gradient is exactly 0 at step 1 (lora_B = 0), and
        # AdamW steps it all the same, as in the diffusers scripts.
        clip_and_step(optimizer, scaler, max_grad_norm)
        return [L_total]

    try:
        log = loop(steps, step, optimizer=optimizer, scaler=scaler, generator=generator)
        sd = {}
        for k, v in get_peft_model_state_dict(unet, adapter_name=stage).items():
            sd[f"{prefix}.{k}"] = v.detach().float().cpu().contiguous()
    finally:
        unet.unload_lora()
    return sd, log


def merge_loras(content, style):
    """Sum of two rank-r LoRAs = one rank-2r LoRA: U = [U_c, U_s], V = [V_c; V_s]."""
    merged = {}
    for key in content:
        side_by_side = 1 if "lora_B" in key else 0  # U's columns, V's rows
        merged[key] = torch.cat([content[key], style[key]], side_by_side)
    return merged


DRIFT_PROMPTS = ["a photo of a dog", "a city street at night", "a bowl of fruit on a table",
                 "a portrait of an old man"]
SCALES = (0.0, 0.5, 1.0, 1.5)


@torch.no_grad()
def drift_report(pipe, adapters, own_prompts, resolution, seed, guidance=None):
    """drift: mean squared change of the denoiser's prediction on unrelated prompts (how much the
    adapter disturbs the base model); effect: the same on the adapter's own prompt. Same latents,
    noise and timesteps for the adapted and the base model."""
    denoiser, _ = denoiser_of(pipe)
    k, g = len(DRIFT_PROMPTS), torch.Generator().manual_seed(seed)
    size = resolution // pipe.vae_scale_factor
    channels = pipe.vae.config.latent_channels
    z = torch.randn(k, channels, size, size, generator=g).to(denoiser.device, denoiser.dtype)
    # Timesteps in the middle: near t = 0 or T the prompt hardly matters.
    t = torch.randint(100, 900, (k,), generator=g).to(denoiser.device)

    def predict(cond):
        if denoiser is getattr(pipe, "unet", None):
            return denoise(denoiser, z, t, cond).float()
        return flow_velocity(denoiser, z, t, cond, is_flux(pipe), guidance).float()

    drift_cond = encode_prompts(pipe, DRIFT_PROMPTS, resolution)  # adapters change the denoiser
    base, report = predict(drift_cond), {"drift": {}, "effect": {}}
    for name, sd in adapters.items():
        own_cond = encode_prompts(pipe, [own_prompts[name]] * k, resolution)
        base_own = predict(own_cond)
        with lora_loaded(pipe, sd):
            report["drift"][name] = F.mse_loss(predict(drift_cond), base).item()
            report["effect"][name] = F.mse_loss(predict(own_cond), base_own).item()
    return report


def image_grid(rows):
    from PIL import Image

    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            grid.paste(im, (j * w, i * h))
    return grid


# ---------------------------------------------------------------------------------------------
# 9. Models: any diffusers SD 1.x/2.x, SDXL, SD3/SD3.5 or FLUX.1 pipeline, or a tiny random one
#    built here (offline); the sets of section 4 (latent posteriors, prompt conditioning, once)
# ---------------------------------------------------------------------------------------------

PRESETS = {"tiny": "sd", "tiny-sdxl": "sdxl", "tiny-sd3": "sd3", "tiny-flux": "flux"}
# The text-to-image pipelines b4m trains, and where each keeps its denoiser.
PIPELINES = {"StableDiffusionPipeline": "unet", "StableDiffusionXLPipeline": "unet",
             "StableDiffusion3Pipeline": "transformer", "FluxPipeline": "transformer"}
SUPPORTED = "an SD 1.x/2.x, SDXL, SD3/SD3.5 or FLUX.1 text-to-image pipeline"


class UsageError(Exception):
    """Bad input or a run that cannot go on: main() prints it as one line and exits with code 2."""


def is_flux(pipe):
    from diffusers import FluxPipeline

    return isinstance(pipe, FluxPipeline)


@torch.no_grad()
def encode_prompts(pipe, prompts, resolution):
    """Denoiser conditioning for a list of prompts, batched: {'encoder_hidden_states': ..., and for
    SDXL the pooled 'text_embeds' and the 'time_ids' (size, crop (0, 0), target size); for SD3
    and FLUX the pooled text as 'pooled_projections'}."""
    dev = pipe.device
    if getattr(pipe, "transformer", None) is not None:  # SD3 (CLIP x 2 + T5), FLUX (CLIP + T5)
        if is_flux(pipe):
            emb, pooled, _ = pipe.encode_prompt(prompts, None, device=dev)  # text ids: all zero
        else:
            emb, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=dev,
                                                   do_classifier_free_guidance=False)
        return {"encoder_hidden_states": emb, "pooled_projections": pooled}
    if getattr(pipe, "text_encoder_2", None) is None:  # SD 1.x/2.x: one text encoder
        return {"encoder_hidden_states": pipe.encode_prompt(prompts, dev, 1, False)[0]}
    emb, _, pooled, _ = pipe.encode_prompt(prompts, device=dev, num_images_per_prompt=1,
                                           do_classifier_free_guidance=False)
    sizes = [resolution, resolution, 0, 0, resolution, resolution]
    time_ids = torch.tensor([sizes] * len(prompts)).to(dev, emb.dtype)
    return {"encoder_hidden_states": emb, "text_embeds": pooled, "time_ids": time_ids}


@torch.no_grad()
def encode_set(pipe, pixels, prompt):
    """A set for the stages: the latent posterior (mean, std) of every image (N x 3 x H x W in
    [-1, 1]) and the prompt's conditioning, computed once, outside the training loop. Latents
    are (z - shift) * scale with the VAE's own factors (SD3 and FLUX shift, SD does not)."""
    vae, dtype = pipe.vae, pipe.vae.dtype
    vae.float()  # encode in fp32: SD/SDXL VAEs overflow in fp16 (float(), type(): no .to() warning)
    dists = [vae.encode(x.to(vae.device)).latent_dist for x in pixels.split(4)]
    vae.type(dtype)
    sf, shift = vae.config.scaling_factor, vae.config.get("shift_factor")
    mean = torch.cat([d.mean for d in dists])
    if shift:  # (mean + std eps - shift) sf = (mean - shift) sf + (std sf) eps
        mean = mean - shift
    mean = mean * sf
    std = torch.cat([d.std for d in dists]) * sf
    return {"mean": mean, "std": std, "cond": encode_prompts(pipe, [prompt], pixels.shape[-1])}


def tiny_pipeline(kind):
    """A small random SD, SDXL, SD3 or FLUX pipeline with a byte-level CLIP tokenizer (in every
    tokenizer slot, T5's too): its images are noise, it exists so the whole method runs offline
    in seconds."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                              CLIPTokenizer)

    torch.manual_seed(0)  # the same random model in every process: adapters saved from it load back
    chars = sorted(ByteLevel.alphabet())  # every byte is a token: no merges, no vocab file needed
    words = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(words)}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    text = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                          num_hidden_layers=2, vocab_size=len(vocab), projection_dim=32,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    if kind in ("sd3", "flux"):
        return tiny_flow_pipeline(kind, tokenizer, text)
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


def tiny_flow_pipeline(kind, tokenizer, text):
    """tiny_pipeline's SD3 (2 joint blocks, the last context_pre_only as in SD3) and FLUX (one
    joint and one single block, guidance-distilled like FLUX.1 dev); 64 px, 8 x 8 latents (a VAE
    of scale 8, as the real ones)."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                           FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    flux = kind == "flux"
    vae = AutoencoderKL(block_out_channels=(16, 16, 16, 16), norm_num_groups=8, latent_channels=4,
                        sample_size=64, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    # (the tiny VAE's shift and scale are those of diffusers' own tests: any nonzero values do)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=64, d_kv=8,
                                 num_layers=2, num_heads=4))
    if flux:
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


def check_model(model, rank):
    """Fail fast, before any weights load: a preset, a local pipeline folder, or a cached or
    fetchable hub id, of a pipeline b4m trains, whose attention layers allow the rank (checked
    on a weightless 'meta' copy of the denoiser, built from its config)."""
    if model in PRESETS:
        return  # the tiny model loads in a second; its rank is checked right after
    path = Path(model)
    if path.exists() and not (path / "model_index.json").is_file():
        raise UsageError(f"--model {model}: this folder holds no diffusers pipeline (no "
                         f"model_index.json); pass a folder written by save_pretrained, a hub id, "
                         f"or a preset ({', '.join(PRESETS)})")
    import huggingface_hub as hub
    from diffusers import (DiffusionPipeline, FluxTransformer2DModel, SD3Transformer2DModel,
                           UNet2DConditionModel)

    if not path.exists():
        try:
            hub.utils.validate_repo_id(model)
        except Exception:
            presets = ", ".join(PRESETS)
            raise UsageError(f"--model {model}: no such folder and not a hub id (owner/name); "
                             f"pass a pipeline folder, a hub id, or a preset ({presets})")
        cached = isinstance(hub.try_to_load_from_cache(model, "model_index.json"), str)
        if not cached and hub.constants.HF_HUB_OFFLINE:
            raise UsageError(f"--model {model}: not in the local Hugging Face cache and "
                             f"HF_HUB_OFFLINE is set; run `huggingface-cli download {model}` with "
                             f"network access, or pass a local folder")
    where = "its folder" if path.exists() else "the hub (check the id and the network)"
    try:
        kind = DiffusionPipeline.load_config(model)["_class_name"]
    except Exception as e:
        raise UsageError(f"--model {model}: could not read model_index.json from {where} "
                         f"({type(e).__name__}); b4m needs {SUPPORTED}")
    if kind not in PIPELINES:  # not img2img, inpainting, ...: their call takes other inputs
        raise UsageError(f"--model {model}: a {kind}; b4m needs {SUPPORTED}")
    classes = {"unet": UNet2DConditionModel, "StableDiffusion3Pipeline": SD3Transformer2DModel,
               "FluxPipeline": FluxTransformer2DModel}
    subfolder = PIPELINES[kind]
    denoiser_class = classes["unet" if subfolder == "unet" else kind]
    try:
        config = denoiser_class.load_config(model, subfolder=subfolder)
        with torch.device("meta"):
            denoiser = denoiser_class.from_config(config)
    except Exception as e:
        raise UsageError(f"--model {model}: could not read a {denoiser_class.__name__} config in "
                         f"{subfolder}/ of {where} ({type(e).__name__}); b4m needs {SUPPORTED}")
    check_rank(rank, denoiser)


def check_rank(rank, denoiser):
    targets = [m for n, m in denoiser.named_modules() if is_target(n, m)]
    limit = min(m.out_features // 2 + m.in_features // 2 for m in targets)
    if rank > limit:  # m_f + n_f >= r in every adapted layer (section 2)
        raise UsageError(f"--rank {rank}: this model's smallest attention projection allows "
                         f"at most {limit}")


def check_resolution(pipe, resolution, flag):
    """SD3 patches its latents 2 x 2, FLUX packs them 2 x 2: sizes a multiple of twice the VAE's
    scale (16 for the real models)."""
    step = 2 * pipe.vae_scale_factor
    if getattr(pipe, "transformer", None) is not None and resolution % step:
        raise UsageError(f"{flag} {resolution}: this model needs a multiple of {step}")


def native_resolution(pipe):
    """The pipeline's own image size: the UNet's sample size (SD, SDXL) or the pipeline's default
    sample size (SD3, FLUX), in latents, times the VAE's scale (1024 for SDXL and FLUX.1)."""
    if getattr(pipe, "unet", None) is not None:
        return pipe.unet.config.sample_size * pipe.vae_scale_factor
    return pipe.default_sample_size * pipe.vae_scale_factor


def training_loss(pipe, batch_size, guidance):
    """loss(sets, generator) for the stages: denoising_loss with a DDPM copy of the pipeline's
    scheduler (SD, SDXL: the training-time forward process), or flow_matching_loss with a fresh
    copy of its FlowMatchEulerDiscreteScheduler (SD3, FLUX; guidance: FLUX's guidance input)."""
    denoiser, prefix = denoiser_of(pipe)
    if prefix == "unet":
        from diffusers import DDPMScheduler

        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        return functools.partial(denoising_loss, denoiser, noise_scheduler, batch_size)
    from diffusers import FlowMatchEulerDiscreteScheduler

    noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    flux = is_flux(pipe)
    density = "uniform" if flux else "logit_normal"
    return functools.partial(flow_matching_loss, denoiser, noise_scheduler, batch_size,
                             density=density, flux=flux, guidance=guidance if flux else None)


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
            first = str(e).splitlines()[0] if str(e) else ""
            raise UsageError(f"--model {model}: could not load a diffusers pipeline "
                             f"({type(e).__name__}: {first}); check the id/folder and network "
                             f"access")
        if type(pipe).__name__ not in PIPELINES:  # check_model has refused these already
            raise UsageError(f"--model {model}: a {type(pipe).__name__}; b4m needs {SUPPORTED}")
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise UsageError(f"--model {model}: prediction_type {prediction}; "
                         f"b4m trains epsilon and v-prediction models")
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for part in pipe.components.values():
        if isinstance(part, nn.Module):
            part.requires_grad_(False)
    return pipe


# ---------------------------------------------------------------------------------------------
# 10. Files: image folders in; every write all or nothing (temporary file in the same folder,
#    fsync, os.replace), with the umask's permissions; adapters in safetensors (no pickle), in
#    diffusers' key layout and, beside it, in the kohya layout that ComfyUI and AUTOMATIC1111 read.
# ---------------------------------------------------------------------------------------------

WEIGHTS, KOHYA = "pytorch_lora_weights.safetensors", "{}_kohya.safetensors"
CHECKPOINT = "checkpoint.pt"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}
SIXTEEN_BIT = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def open_image(path, resolution):
    """RGB, EXIF-upright, centre-cropped to resolution x resolution. Raises on unreadable files."""
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img.draft("RGB", (resolution, resolution))  # JPEG: decode at reduced size, cheap when huge
        img = ImageOps.exif_transpose(img)
        if img.mode in SIXTEEN_BIT:  # 16-bit grayscale: keep the top 8 bits
            img = img.point(lambda v: v / 256).convert("L")
        if "A" in img.getbands() or "transparency" in img.info:  # transparent pixels become white
            img = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img)
        size = (resolution, resolution)
        return ImageOps.fit(img.convert("RGB"), size, Image.Resampling.BICUBIC)


def image_files(folder):
    files = (p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return sorted(p for p in files if p.is_file())


def read_images(paths, resolution):
    """The readable ones, each unreadable file named in a warning and skipped."""
    images = []
    for path in paths:
        try:
            images.append(open_image(path, resolution))
        except Exception as e:  # PIL raises many kinds (OSError, SyntaxError, ValueError, ...)
            print(f"warning: skipping {path}: not a readable image ({type(e).__name__})",
                  file=sys.stderr)
    return images


def read_prompt(path):
    """A prompt.txt: UTF-8, with or without the byte-order mark Windows Notepad writes."""
    try:
        prompt = path.read_bytes().decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    if not prompt:
        raise UsageError(f"{path}: empty; write the set's prompt in it")
    return prompt


def load_image_set(folder, resolution, prompt=None, default_prompt=None):
    """(pixels in [-1, 1] of shape N x 3 x H x W, prompt). The prompt: `prompt`, else the
    folder's prompt.txt, else default_prompt. Unreadable images are skipped with a warning naming
    each; a folder with none left, or with no prompt, is a UsageError naming the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        problem = "not a folder" if folder.exists() else "no such folder"
        raise UsageError(f"{folder}: {problem}; pass a folder of images")
    if prompt is not None and not prompt.strip():
        raise UsageError("the prompt is empty; give a non-empty prompt")
    if prompt is None and (folder / "prompt.txt").is_file():
        prompt = read_prompt(folder / "prompt.txt")
    if prompt is None:
        prompt = default_prompt
    if prompt is None:
        raise UsageError(f"{folder}: no prompt.txt; an auxiliary set needs one holding its prompt")
    images = read_images(image_files(folder), resolution)
    if not images:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise UsageError(f"{folder}: no readable image (looked for {suffixes}); "
                         f"add at least one image")
    data = [torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8) for im in images]
    pixels = torch.stack(data).view(len(images), resolution, resolution, 3).permute(0, 3, 1, 2)
    return pixels.float() / 127.5 - 1, prompt.strip()


def write_file(path, write):
    """write(f) fills a binary file, all or nothing: a kill, a power cut or a full disk leaves the
    previous file (or none), never half a file. open() gives the umask's permissions."""
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
        raise UsageError(f"{path}: cannot write ({e.strerror or e}); free some space or write "
                         f"elsewhere") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def save_lora(folder, sd, metadata):
    """folder/<name>_kohya.safetensors (UNets only; kohya keys: lora_unet_<module>.lora_down,
    lora_up, alpha = rank so the scale stays 1), then folder/pytorch_lora_weights.safetensors
    (diffusers keys), whose presence marks a finished stage. One metadata key: safetensors writes
    several keys in a random order, and the same run must give byte-identical files."""
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save as safetensors_bytes

    meta = {"b4m": json.dumps(metadata, sort_keys=True)}
    files = [(WEIGHTS, sd)]
    # kohya keys for UNets only: diffusers' converter has no mapping for transformer keys, and
    # ComfyUI reads the diffusers keys of SD3 and FLUX transformers as they are.
    if all(key.startswith("unet.") for key in sd):
        files.insert(0, (KOHYA.format(metadata["stage"]), convert_state_dict_to_kohya(sd)))
    for name, tensors in files:
        data = safetensors_bytes(tensors, metadata=meta)
        write_file(Path(folder) / name, lambda f: f.write(data))


def load_lora(path, denoiser, prefix, expect):
    """Read an adapter and check it against the model and the run: keys, shapes, metadata."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("b4m", "{}"))
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise UsageError(f"{path}: not a readable b4m adapter ({type(e).__name__}); "
                         f"re-run with --overwrite")
    for key, value in expect.items():
        if key != "version" and meta.get(key) != value:
            raise UsageError(f"{path}: made with {key}={meta.get(key)}, this run has "
                             f"{key}={value}; use the matching model/settings or another --out")
    layers = {n: m for n, m in denoiser.named_modules() if is_target(n, m)}
    keys = {f"{prefix}.{n}.lora_{x}.weight" for n in layers for x in "AB"}
    for key in sorted(keys ^ set(sd)):
        raise UsageError(f"{path}: {'has no' if key in keys else 'has an unknown'} key {key}; "
                         f"the adapter was made for another model")
    for name, layer in layers.items():
        V, U = sd[f"{prefix}.{name}.lora_A.weight"], sd[f"{prefix}.{name}.lora_B.weight"]
        m, n = layer.out_features, layer.in_features
        if V.ndim != 2 or U.ndim != 2 or V.shape[1] != n or U.shape != (m, V.shape[0]):
            raise UsageError(f"{path}: {name} has U {tuple(U.shape)}, V {tuple(V.shape)}, this "
                             f"model's layer is {m}x{n}; the adapter was made for another model")
    return sd, meta


def load_checkpoint(path, settings):
    """The stage's checkpoint if taken with these settings, else None. weights_only: no
    arbitrary pickles."""
    try:  # on the CPU: the optimizer moves its state back to the parameters' device
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise UsageError(f"{path}: unreadable checkpoint ({type(e).__name__}); delete it to "
                         f"start the stage over")
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
# 11. Command line: flags, checks, --resume and checkpoints around sections 1-8
# ---------------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Every default, written once: the official recipe's values where it has one (the README's
# "Differences from the official code" says where b4m departs); the tiny presets override a few.
DEFAULTS = dict(model="stabilityai/stable-diffusion-xl-base-1.0", out="runs/b4m", rank=64,
                resolution=512, steps=1000, make_steps=1000, batch_size=1, grad_accum=4, lr=1e-4,
                aux_lr=1e-5, make_lr=1e-4, max_grad_norm=1.0, seed=0, checkpoint_every=100,
                sample_steps=25, num_samples=4, guidance=3.5)
TINY = dict(rank=4, resolution=64, steps=20, make_steps=10, sample_steps=4, num_samples=2)
# The three stages, in order. The make stage's files carry the name users know them by, "b4m":
# the folder b4m/, b4m_kohya.safetensors, samples/b4m_N.png, its rows of losses.csv.
NAMES = {"content": "content", "style": "style", "make": "b4m"}
PROMPTS = {"content": "a photo of snq object", "style": "an image in w@z style",
           "make": "a snq object in w@z style"}
# What --resume compares. RUN: any difference refuses the run. STAGES: a stage is kept, or
# continued from its checkpoint, only while its own settings match too (a later stage depends on
# the earlier ones).
RUN = ("model", "baseline", "rank", "resolution", "seed", "batch_size", "grad_accum",
       "max_grad_norm", "content", "style", "content_prompt", "style_prompt", "aux_style",
       "aux_content", "no_orth_prior", "prior_scale", "no_mcp", "dtype", "guidance")
STAGES = {"content": ("steps", "lr", "aux_lr"), "style": ("steps", "style_lr", "aux_lr"),
          "make": ("steps", "lr", "style_lr", "aux_lr", "make_steps", "make_lr",
                   "no_precondition")}


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: training stopped between two steps, with a checkpoint written.
    (signum, message)"""


def number(kind, ok, rule):
    """An argparse type: kind(text), refused unless ok(value) (which nan never is)."""
    def parse(text):
        value = kind(text)
        if not ok(value):
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
        """A flag whose default lives in DEFAULTS (and TINY): filled in after parsing, named in
        the help."""
        key = flag[2:].replace("-", "_")
        tiny = f"; tiny: {TINY[key]}" if key in TINY else ""
        default = "the run's" if self.prog.endswith("sample") else f"{DEFAULTS[key]}{tiny}"
        self.add_argument(flag, help=f"{text} (default {default})".lstrip(), **kw)


def parse_args(argv):
    sample = argv[:1] == ["sample"]
    if sample:
        p = Parser(prog="b4m.py sample", description="Sample again from a finished run, "
                                                     "without training.")
        p.add_argument("--run", required=True, help="a finished run's --out folder")
        p.add_argument("--seed", type=int, help="default: the run's")
        p.add_argument("--export", help=f"also write the (scaled) made adapter to DIR/{WEIGHTS} "
                                        f"and DIR/{KOHYA.format('b4m')}")
        p.add_argument("--report", action="store_true",
                       help="recompute report.json (drift and effect)")
    else:
        p = Parser(prog="b4m.py", description="Train B4M: content stage, style stage, make; "
                                              "then sample.",
                   epilog="Images: png, jpg/jpeg, webp, bmp, gif. "
                          "`python b4m.py sample -h`: sampling again.")
        p.add_argument("--content", required=True,
                       help="folder of content images (prompt.txt optional)")
        p.add_argument("--style", required=True,
                       help="folder of style images (prompt.txt optional)")
        p.add_argument("--content-prompt",
                       help=f"default: the folder's prompt.txt, else '{PROMPTS['content']}'")
        p.add_argument("--style-prompt",
                       help=f"default: the folder's prompt.txt, else '{PROMPTS['style']}'")
        p.add_argument("--aux-style", nargs="+", default=[], metavar="DIR",
                       help="auxiliary style sets (MCP), each with prompt.txt")
        p.add_argument("--aux-content", nargs="+", default=[], metavar="DIR",
                       help="auxiliary content sets, each with prompt.txt")
        p.add("--model", "hub id or local folder of an SD 1.x/2.x, SDXL, SD3/SD3.5 or FLUX.1 "
                         "pipeline, or tiny / tiny-sdxl / tiny-sd3 / tiny-flux (offline, random)")
        p.add("--out")
        p.add("--rank", "LoRA rank r", type=POSITIVE_INT)
        p.add("--resolution", "training size", type=RESOLUTION)
        p.add("--steps", "optimizer steps per break stage", type=STEPS)
        p.add("--make-steps", "make fine-tuning steps; 0 = exact reassembly", type=STEPS)
        p.add("--batch-size", type=POSITIVE_INT)
        p.add("--grad-accum", type=POSITIVE_INT)
        p.add("--lr", "the stage's own half (the content stage's, and the style stage's unless "
                      "--style-lr)", type=POSITIVE)
        p.add_argument("--style-lr", type=POSITIVE, help="the style stage's own half (default: "
                                                         "--lr)")
        p.add("--aux-lr", "the other half, on the auxiliary sets", type=POSITIVE)
        p.add("--make-lr", type=POSITIVE)
        p.add("--max-grad-norm", "clip each trained half's gradient norm; 0 = off",
              type=NON_NEGATIVE)
        p.add("--seed", type=int)
        p.add("--guidance", "FLUX.1 dev (guidance-distilled): the guidance input in training, "
                            "as diffusers' FLUX script", type=POSITIVE)
        p.add("--checkpoint-every", "optimizer steps between checkpoints; 0 = only on "
                                    "Ctrl-C/SIGTERM", type=STEPS)
        p.add_argument("--gradient-checkpointing", action="store_true",
                       help="trade compute for memory (SDXL on small GPUs)")
        p.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its last checkpoint")
        p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
        p.add_argument("--no-orth-prior", action="store_true",
                       help="ablation: A, C drawn independently")
        p.add_argument("--prior-scale", type=POSITIVE, default=1.0,
                       help="multiply A, C and D's init (default 1: the official construction)")
        p.add_argument("--no-mcp", action="store_true",
                       help="ablation: no auxiliary loss in the break stages")
        p.add_argument("--no-precondition", action="store_true",
                       help="ablation: plain AdamW in make")
        p.add_argument("--baseline", choices=["b4m", "lora-merge"], default="b4m",
                       help="lora-merge: the paper's naive baseline, two ordinary LoRAs trained "
                            "apart and summed")
    p.add_argument("--prompt",
                   help=f"combined prompt for the made adapter (default: '{PROMPTS['make']}')")
    p.add("--num-samples", "images per prompt", type=POSITIVE_INT)
    p.add("--sample-steps", "sampling steps", type=POSITIVE_INT)
    p.add_argument("--sample-resolution", type=RESOLUTION,
                   help="sampling size (default: the model's own: 1024 for SDXL and FLUX.1)")
    p.add_argument("--content-scale", type=float, default=1.0,
                   help="s_c: V = [C, s_c D] at sampling")
    p.add_argument("--style-scale", type=float, default=1.0,
                   help="s_s: U = [A; s_s B] at sampling")
    p.add_argument("--scale-grid", action="store_true",
                   help=f"also render samples/scale_grid.png over {SCALES}")
    p.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="frozen model precision (auto: fp16 on cuda, else fp32); adapters "
                        "stay fp32")
    args = p.parse_args(argv[1:] if sample else argv)
    args.command = "sample" if sample else "train"
    if not sample:  # `sample` takes the run's settings instead
        for key, value in {**DEFAULTS, **(TINY if args.model in PRESETS else {})}.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
        args.style_lr = args.style_lr or args.lr
    args.prompt = args.prompt or (None if sample else PROMPTS["make"])
    return args


def pick_device(args):
    if torch.cuda.is_available():
        auto = "cuda"
    else:
        auto = "mps" if torch.backends.mps.is_available() else "cpu"
    device = auto if args.device == "auto" else args.device
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device, True):
        raise UsageError(f"--device {device}: not available on this machine; use --device cpu "
                         f"or auto")
    dtype = args.dtype if args.dtype != "auto" else "fp16" if device == "cuda" else "fp32"
    if dtype == "fp16" and device == "cpu":
        raise UsageError("--dtype fp16: not supported on the CPU; use fp32 or bf16")
    return device, dtype


def check_baseline(args):
    """The lora-merge baseline has no PLP halves: the flags that act on them would do nothing."""
    if args.baseline == "b4m":
        return
    given = {"--content-scale": args.content_scale != 1, "--style-scale": args.style_scale != 1,
             "--scale-grid": args.scale_grid}
    given["--prior-scale"] = getattr(args, "prior_scale", 1) != 1
    for key in ("aux_style", "aux_content", "no_orth_prior", "no_mcp", "no_precondition"):
        given["--" + key.replace("_", "-")] = getattr(args, key, None)
    for flag in (f for f, v in given.items() if v):
        raise UsageError(f"{flag}: only for B4M runs, not --baseline {args.baseline}")


def settings_of(args, stage=None):
    now = vars(args)
    keys = RUN + (STAGES[stage] if stage else ())
    return {k: now[k] for k in keys}  # KeyError on a misspelt name


def adapter_metadata(args, stage):
    prior = "random" if args.no_orth_prior else "orthogonal"
    return {"stage": NAMES[stage], "method": args.baseline, "rank": args.rank, "seed": args.seed,
            "prior": prior, "base_model": args.model, "version": __version__}


def prepare_out(args):
    """Refuse to touch an existing run unless --resume or --overwrite; with --resume, the stored
    settings must match. Returns the stages already finished (to skip)."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is a file; pass a folder path")
    config = out / "config.json"
    if not (config.exists() or any((out / NAMES[s]).is_dir() for s in STAGES)):
        return set()
    if args.overwrite:  # the old run's adapters and checkpoints go: --resume must not take them
        for stage in STAGES:
            for name in (WEIGHTS, KOHYA.format(NAMES[stage]), CHECKPOINT):
                (out / NAMES[stage] / name).unlink(missing_ok=True)
        return set()
    if not args.resume:
        raise UsageError(f"--out {out}: already holds a run; pass --resume to continue it, "
                         f"--overwrite to replace it, or another --out")
    try:
        old = json.loads(config.read_text())["settings"]
    except Exception:
        raise UsageError(f"--resume: {config} is missing or unreadable; use --overwrite or "
                         f"another --out")
    now = settings_of(args)
    differ = [k for k in RUN if old.get(k) != now[k]]
    if differ:
        changes = ", ".join(f"{k} (was {old.get(k)!r}, now {now[k]!r})" for k in differ)
        raise UsageError(f"--resume: settings differ from the run in {out}: {changes}")
    # left by a kill in the middle of a write
    for folder in (out, out / "samples", *(out / NAMES[s] for s in STAGES)):
        for tmp in folder.glob(".*.tmp[0-9]*"):
            tmp.unlink()

    def kept(stage):
        same = all(old.get(k) == v for k, v in settings_of(args, stage).items())
        return (out / NAMES[stage] / WEIGHTS).exists() and same

    done = set(itertools.takewhile(kept, STAGES))  # a later stage depends on every earlier one
    for stage in done:  # a kill between a stage's last write and this deletion leaves one behind
        (out / NAMES[stage] / CHECKPOINT).unlink(missing_ok=True)
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


class CheckpointedLoop:
    """The loop the command line runs a stage's steps in (sections 4-5 take it as `loop`): the
    same steps as plain_loop, plus a progress bar, a stop on a non-finite loss, a checkpoint
    every `every` steps and when a signal in `asked` stops the run, and a start from `state`, a
    checkpoint of this stage, exactly where it was taken."""

    def __init__(self, stage, path, settings, every, asked, state=None):
        self.stage, self.path, self.settings = stage, path, settings
        self.every, self.asked, self.state = every, asked, state
        self.t0 = time.time() - (state or {}).get("seconds", 0)

    def __call__(self, steps, step, optimizer, scaler, generator):
        from tqdm import tqdm

        params = [p for half in optimizer.param_groups for p in half["params"]]
        start, log = 0, []
        if self.state:
            shapes = [tuple(v.shape) for v in self.state["params"]]
            if [tuple(p.shape) for p in params] != shapes:
                raise ValueError("the checkpoint holds parameters of other shapes than this "
                                 "stage trains")
            with torch.no_grad():
                for p, value in zip(params, self.state["params"]):
                    p.copy_(value)
            optimizer.load_state_dict(self.state["optimizer"])
            scaler.load_state_dict(self.state["scaler"])  # a no-op unless enabled (fp16)
            generator.set_state(self.state["generator"])
            start, log = self.state["step"], list(self.state["log"])
        bar = tqdm(range(start + 1, steps + 1), initial=start, total=steps, desc=self.stage,
                   dynamic_ncols=True)
        for i in bar:
            losses = step()
            if not all(math.isfinite(v) for v in losses):
                bar.close()
                values = ", ".join(f"{v:.4g}" for v in losses)
                raise FloatingPointError(f"step {i}: the loss is not finite ({values})")
            log.append([i, *losses])
            bar.set_postfix(loss=f"{losses[0]:.4f}")
            everything = {"step": i, "params": [p.detach().cpu().clone() for p in params],
                          "log": log, "optimizer": optimizer.state_dict(),
                          "scaler": scaler.state_dict(), "generator": generator.get_state()}
            self.after_step(i, steps, everything)
        bar.close()
        return log

    def after_step(self, i, steps, everything):
        """A checkpoint when one is due or a signal asked to stop; then the stop."""
        due = self.every and i % self.every == 0 and i < steps
        if self.asked or due:
            checkpoint = {**everything, "settings": self.settings,
                          "seconds": time.time() - self.t0}
            write_file(self.path, lambda f: torch.save(checkpoint, f))
        if self.asked:
            raise Interrupted(self.asked[0], f"stopped in the {self.stage} stage after step {i}, "
                                             f"saved in {self.path}; run the same command with "
                                             f"--resume to continue from there")


def run_stage(stage, pipe, loss, data, adapters, args, asked):
    """One stage of sections 4-5 (or the baseline's), continued from its checkpoint when one
    matches. Returns ((adapter, loss log), seconds)."""
    path, settings = Path(args.out) / NAMES[stage] / CHECKPOINT, settings_of(args, stage)
    state = load_checkpoint(path, settings) if args.resume and path.exists() else None
    if state:
        print(f"{stage}: continuing from step {state['step']} ({path})", file=sys.stderr)
    loop = CheckpointedLoop(stage, path, settings, args.checkpoint_every, asked, state)
    unet, prefix = denoiser_of(pipe)  # the UNet, or SD3's / FLUX's transformer
    lr = args.style_lr if stage == "style" else args.lr
    kw = dict(rank=args.rank, seed=args.seed, grad_accum=args.grad_accum,
              max_grad_norm=args.max_grad_norm, loop=loop, prefix=prefix)
    try:
        if args.baseline == "lora-merge" and stage == "make":
            result = merge_loras(adapters["content"], adapters["style"]), []
        elif args.baseline == "lora-merge":
            result = lora_stage(stage, unet, loss, data[stage], steps=args.steps, lr=lr, **kw)
        elif stage == "make":
            result = make_stage(unet, loss, data["content"], data["style"], adapters["content"],
                                adapters["style"], steps=args.make_steps, lr=args.make_lr,
                                precondition=not args.no_precondition, **kw)
        else:
            prior = random_prior if args.no_orth_prior else orthogonal_prior
            aux = data["aux_style" if stage == "content" else "aux_content"]
            result = break_stage(stage, unet, loss, data["content"], data["style"], aux,
                                 steps=args.steps, lr=lr, aux_lr=args.aux_lr,
                                 mcp=not args.no_mcp, prior=prior,
                                 prior_scale=args.prior_scale, **kw)
    except FloatingPointError as e:
        raise UsageError(f"{stage} stage, {e}; lower --lr/--aux-lr/--make-lr (finished stages "
                         f"are kept)") from None
    except ValueError as e:  # the method's own refusals (scaffolds that differ, a checkpoint...)
        raise UsageError(f"{stage} stage: {e}") from None
    return result, time.time() - loop.t0


def read_set(flag, folder, resolution, prompt=None, default_prompt=None):
    """load_image_set, its errors prefixed with the flag that named the folder (or the prompt)."""
    try:
        return load_image_set(folder, resolution, prompt, default_prompt)
    except UsageError as e:
        if str(e).startswith("the prompt is empty"):
            raise UsageError(f"{flag}-prompt: {e}") from None
        raise UsageError(f"{flag} {e}") from None


def train_main(args):
    # Everything that can be checked without the model's weights is, so a typo costs seconds.
    device, args.dtype = pick_device(args)  # stored resolved: --resume must not mix fp16 and fp32
    check_model(args.model, args.rank)
    check_baseline(args)
    res = args.resolution
    content_px, args.content_prompt = read_set("--content", args.content, res,
                                               args.content_prompt, PROMPTS["content"])
    style_px, args.style_prompt = read_set("--style", args.style, res, args.style_prompt,
                                           PROMPTS["style"])
    aux_style_px = [read_set("--aux-style", folder, res) for folder in args.aux_style]
    aux_content_px = [read_set("--aux-content", folder, res) for folder in args.aux_content]
    # Absolute paths in config.json: `sample`, `--resume` and evaluate.py work from any folder.
    args.content, args.style = str(Path(args.content).resolve()), str(Path(args.style).resolve())
    args.aux_style = [str(Path(d).resolve()) for d in args.aux_style]
    args.aux_content = [str(Path(d).resolve()) for d in args.aux_content]
    if Path(args.model).exists():
        args.model = str(Path(args.model).resolve())
    done = prepare_out(args)

    pipe = load_pipeline(args.model, device, DTYPES[args.dtype])
    denoiser, prefix = denoiser_of(pipe)
    check_rank(args.rank, denoiser)
    if not args.sample_resolution:
        args.sample_resolution = native_resolution(pipe)
    check_resolution(pipe, args.resolution, "--resolution")
    check_resolution(pipe, args.sample_resolution, "--sample-resolution")
    if args.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    loss = training_loss(pipe, args.batch_size, args.guidance)
    data = {"content": encode_set(pipe, content_px, args.content_prompt),
            "style": encode_set(pipe, style_px, args.style_prompt),
            "aux_style": [encode_set(pipe, *px_prompt) for px_prompt in aux_style_px],
            "aux_content": [encode_set(pipe, *px_prompt) for px_prompt in aux_content_px]}

    out = Path(args.out)
    versions = {"b4m": __version__}
    for package in ("torch", "diffusers", "transformers"):
        versions[package] = package_version(package)
    settings = {k: v for k, v in vars(args).items() if k not in ("resume", "overwrite")}
    save_json(out / "config.json", {"settings": settings, "versions": versions})
    log, adapters, seconds = [], {}, {}
    if done:  # the finished stages' rows of losses.csv and seconds of report.json are kept
        rows = list(csv.reader((out / "losses.csv").read_text().splitlines()))[1:]
        log = [row for row in rows if row[0] in {NAMES[s] for s in done}]
        seconds = read_report(out).get("seconds", {})
    with stop_on_signals() as asked:
        for stage in STAGES:
            folder = out / NAMES[stage]
            if stage in done:
                expect = adapter_metadata(args, stage)
                adapters[stage] = load_lora(folder / WEIGHTS, denoiser, prefix, expect)[0]
                print(f"{stage}: kept {folder / WEIGHTS} (--resume)", file=sys.stderr)
                continue
            (adapters[stage], stage_log), took = run_stage(stage, pipe, loss, data, adapters,
                                                           args, asked)
            seconds[NAMES[stage]] = took
            for step, *losses in stage_log:
                cells = [f"{v:.6g}" for v in losses] + [""] * (2 - len(losses))
                log.append([NAMES[stage], step, *cells])
            save_csv(out / "losses.csv", log)
            rounded = {k: round(v, 3) for k, v in seconds.items()}
            save_json(out / "report.json", {"seconds": rounded})
            save_lora(folder, adapters[stage], adapter_metadata(args, stage))  # marks it finished
            (folder / CHECKPOINT).unlink(missing_ok=True)
            if asked:  # a signal after the stage's last step
                raise Interrupted(asked[0], f"stopped after the {stage} stage (saved); run it "
                                            f"again with --resume")
    finish(pipe, adapters, args)
    print(f"wrote {out}: content/, style/, b4m/ (adapters), config.json, losses.csv, report.json",
          file=sys.stderr)


def read_report(out):
    return json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else {}


def finish(pipe, adapters, args, report=True):
    """samples/{content,style,b4m}_{i}.png, grid.png (a row each) and report.json, shared by
    training and `sample`."""
    out = Path(args.out)
    for old in (out / "samples").glob("*.png"):  # samples/ holds the latest sampling only
        old.unlink()
    sampling = dict(num_samples=args.num_samples, steps=args.sample_steps,
                    resolution=args.sample_resolution, seed=args.seed)
    if args.scale_grid:  # the made adapter at every pair of strengths: rows s_s, columns s_c
        one = {**sampling, "num_samples": 1}
        cells = []
        for s in SCALES:
            row = [generate(pipe, scale_made(adapters["make"], c, s), args.prompt, **one)[0]
                   for c in SCALES]
            cells.append(row)
        save_image(out / "samples" / "scale_grid.png", image_grid(cells))
    # Every adapter under its file name; the made one at the asked strengths ((1, 1): as is).
    named = {"content": adapters["content"], "style": adapters["style"],
             "b4m": scale_made(adapters["make"], args.content_scale, args.style_scale)}
    prompts = {"content": args.content_prompt, "style": args.style_prompt, "b4m": args.prompt}
    rows = []
    for name, sd in named.items():
        rows.append(generate(pipe, sd, prompts[name], **sampling))
        for i, im in enumerate(rows[-1]):
            save_image(out / "samples" / f"{name}_{i}.png", im)
    save_image(out / "samples" / "grid.png", image_grid(rows))
    print(f"wrote {out / 'samples'}", file=sys.stderr)
    if not report:
        return
    # at the training resolution
    result = drift_report(pipe, named, prompts, args.resolution, args.seed, args.guidance)
    result["seconds"] = read_report(out).get("seconds", {})  # written stage by stage
    save_json(out / "report.json", result)
    print(f"{'adapter':8} {'drift':>12} {'effect':>12}", file=sys.stderr)
    for name in named:
        print(f"{name:8} {result['drift'][name]:12.4g} {result['effect'][name]:12.4g}",
              file=sys.stderr)


def sample_main(args):
    run = Path(args.run)
    try:
        config = json.loads((run / "config.json").read_text())["settings"]
    except Exception:
        raise UsageError(f"--run {run}: no readable config.json; pass the --out folder of a "
                         f"finished b4m run")
    for k, v in config.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.out = str(run)
    check_baseline(args)
    device, dtype = pick_device(args)
    missing = [NAMES[s] for s in STAGES if not (run / NAMES[s] / WEIGHTS).is_file()]
    if missing:
        raise UsageError(f"--run {run}: no {missing[0]}/{WEIGHTS}; finish the run first (--resume)")
    stage_folders = [(run / NAMES[s]).resolve() for s in STAGES]
    if args.export and Path(args.export).resolve() in stage_folders:
        raise UsageError(f"--export {args.export}: a stage folder of the run, which it would "
                         f"overwrite; pick another folder")
    check_model(args.model, args.rank)
    pipe = load_pipeline(args.model, device, DTYPES[dtype])
    check_resolution(pipe, args.sample_resolution, "--sample-resolution")
    run_args = argparse.Namespace(**config)
    adapters = {}
    for s in STAGES:
        expect = adapter_metadata(run_args, s)
        adapters[s] = load_lora(run / NAMES[s] / WEIGHTS, *denoiser_of(pipe), expect)[0]
    if args.export:
        made = scale_made(adapters["make"], args.content_scale, args.style_scale)
        meta = {**adapter_metadata(args, "make"), "content_scale": args.content_scale,
                "style_scale": args.style_scale}
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
        print("\nb4m: stopped at once; what was saved is kept: run the same command with --resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
