"""B4M, "Break-for-Make", in one file: content-style customization of a text-to-image diffusion
model with partly learnable LoRA projections (PLP).

    Yu Xu, Fan Tang, Juan Cao, Yuxin Zhang, Oliver Deussen, Weiming Dong, Jintao Li, Tong-Yee Lee.
    "B4M: Breaking Low-Rank Adapter for Making Content-Style Customization", ACM TOG 2025
    (arXiv 2403.19456, "Break-for-Make"). Preconditioner: Zhang & Pilanci, "Riemannian
    Preconditioned LoRA for Fine-Tuning Foundation Models", ICML 2024 (arXiv 2402.02347).

The method (sections 1-7, torch alone, no files): 1. PLP, 2. the orthogonal prior, 3. the
preconditioned AdamW, 4. break (with MCP), 5. make, 6. sample, 7. the flow-matching loss of SD3
and FLUX.1. Plumbing: 8. the naive baseline, 9. models, 10. files, 11. the command line.

    python b4m.py --content DIR --style DIR [--model ID_OR_FOLDER] [--out runs/b4m]
    python b4m.py sample --run runs/b4m [--prompt "a snq object in w@z style"]
"""
import hashlib
import torch
import torch.nn as nn
import torch.nn.functional as F
__version__ = "0.3.0"

# 1. Partly learnable projection (PLP) --------------------------------------------------------
#       U = [A; B]  (m x r),   V = [C, D]  (r x n),   dW = U V = [[A C, A D],
#                                                               [B C, B D]]
#       A: the first m_f = m // 2 rows of U,  C: the first n_f = n // 2 columns of V (frozen);
#       B: the other rows of U (learns style), D: the other columns of V (learns content).
# An adapter, in sections 1-8: {layer name: (U, V)}.

def halves(U, V):
    """(A, B, C, D) of U (m x r), V (r x n), as views. Odd sizes: B, D get the extra row/column."""
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
        # At least fp32: Adam's small updates to B and D would round away in fp16/bf16.
        kw = dict(dtype=torch.promote_types(base.weight.dtype, torch.float32),
                  device=base.weight.device)
        # Buffers: no gradient or weight decay reaches A, C; they stay bit-identical across runs.
        self.register_buffer("A", A.to(**kw))
        self.register_buffer("C", C.to(**kw))
        # The official init (its LoRALinearLayer's): B = 0, D ~ N(0, 1/r^2). Unlike a plain LoRA,
        # dW = [[A C, A D], [0, 0]] is not zero at step 0, and A C never changes.
        D = torch.randn(rank, n - n // 2, generator=generator, dtype=torch.float64) / rank
        self.B = nn.Parameter(torch.zeros(m - m // 2, rank, **kw))
        self.D = nn.Parameter(D.to(**kw))

    @property
    def U(self):  # m x r, the up projection [A; B]
        return torch.cat([self.A, self.B], 0)

    @property
    def V(self):  # r x n, the down projection [C, D]
        return torch.cat([self.C, self.D], 1)

    def forward(self, x):
        # U (V x): two thin matmuls, never the m x n product; scale 1 (official: alpha = rank).
        h = F.linear(F.linear(x.to(self.B.dtype), self.V), self.U)
        return self.base(x) + h.to(x.dtype)

def adapter_of(layers):  # {name: PLPLinear} as an adapter: fp32 copies of U and V on the CPU
    return {name: (layer.U.detach().float().cpu().contiguous(),
                   layer.V.detach().float().cpu().contiguous()) for name, layer in layers.items()}

@torch.no_grad()
def load_blocks(layers, adapter):  # every block from an adapter, replacing the init's draw
    for name, layer in layers.items():
        for mine, theirs in zip((layer.A, layer.B, layer.C, layer.D), halves(*adapter[name])):
            mine.copy_(theirs)

# 2. Orthogonal prior, and a PLP in every attention projection --------------------------------
#       Q = qr(N(0, 1)^{(m_f + n_f) x r}),   A = Q[:m_f],   C = Q[m_f:]^T
#       =>  A^T A + C C^T = Q^T Q = I_r

def check_layer_rank(out_features, in_features, rank):
    limit = out_features // 2 + in_features // 2
    if not 1 <= rank <= limit:  # Q has m_f + n_f rows: at most that many orthonormal columns
        raise ValueError(f"rank must be between 1 and m_f + n_f = {limit} "
                         f"for a {out_features}x{in_features} layer, got {rank}")

def orthogonal_prior(out_features, in_features, rank, generator=None):
    """The frozen scaffold (A, C), cut from r orthonormal columns of length m_f + n_f, in every
    layer (deliberately unlike the official code: only to_q and self-attention to_k/to_v; A = 0
    elsewhere, so there D gets no gradient until B moves). Why: for r <= m_f, n_f, A and C have full
    rank r, so make's U^T U and V V^T (section 3) are invertible from its first step. float64 on the
    CPU: the same (seed, layer) gives the same A and C on any --device."""
    check_layer_rank(out_features, in_features, rank)
    m_f, n_f = out_features // 2, in_features // 2
    Q, R = torch.linalg.qr(torch.randn(m_f + n_f, rank, generator=generator, dtype=torch.float64))
    Q = Q * torch.sign(torch.diagonal(R))  # R's diagonal > 0: Q depends on the draw, not on LAPACK
    return Q[:m_f], Q[m_f:].T.contiguous()

def random_prior(out_features, in_features, rank, generator=None):
    """Ablation (--no-orth-prior): A and C drawn independently, at the orthonormal draw's scale
    (an entry of a unit vector of length m_f + n_f)."""
    check_layer_rank(out_features, in_features, rank)
    m_f, n_f = out_features // 2, in_features // 2
    std = (m_f + n_f) ** -0.5
    A = torch.randn(m_f, rank, generator=generator, dtype=torch.float64) * std
    return A, torch.randn(rank, n_f, generator=generator, dtype=torch.float64) * std

def seeded(seed, name):
    """A CPU generator seeded by (seed, name): the content and the style run draw the same A and C
    in every layer, each layer from its own (seed, layer name), or make would join halves learned
    against different scaffolds. sha256, not hash(): Python salts hash() per run."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))

# Every attention projection: a UNet's to_q, to_k, to_v, to_out.0 (self- and cross-attention);
# in an MMDiT (SD3, FLUX) also the text stream's add_q_proj, add_k_proj, add_v_proj, to_add_out.
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
           "to_add_out")

def is_target(name, module):
    return name.endswith(tuple("." + t for t in TARGETS)) and isinstance(module, nn.Linear)

def add_plp(denoiser, rank, seed, prior=orthogonal_prior, scale=1.0):
    """Wrap every attention projection (TARGETS; the paper adapts a UNet's) in a PLPLinear; no
    feed-forward or convolution layers. Returns {module name: PLPLinear}. scale (--prior-scale,
    not in the paper; 1: as drawn) multiplies A, C and D's draw, so the step-0 change
    dW = [[A C, A D], [0, 0]] shrinks by scale^2: where r is a sizeable part of m_f + n_f (a small
    model), the orthonormal A C can be as large as W0's own corner."""
    layers = {}
    for name, module in list(denoiser.named_modules()):  # a snapshot: the loop replaces modules
        if is_target(name, module):
            generator = seeded(seed, name)
            A, C = prior(module.out_features, module.in_features, rank, generator)
            layers[name] = PLPLinear(module, scale * A, scale * C, generator)  # D: same generator
            with torch.no_grad():
                layers[name].D.mul_(scale)
            denoiser.set_submodule(name, layers[name])
    return layers

def remove_plp(denoiser):  # the denoiser as it was: each PLPLinear back to its base layer
    for name, module in list(denoiser.named_modules()):
        if isinstance(module, PLPLinear):
            denoiser.set_submodule(name, module.base)

# 3. Riemannian preconditioned step (Zhang & Pilanci 2024), used by make (section 5) ------------
#       G_B <- G_B (V V^T + delta I)^-1,      G_D <- (U^T U + delta I)^-1 G_D,      then AdamW

def riemannian_precondition(U, V, G_B, G_D, delta=1e-6):
    """Preconditioned gradients of B (rows of U) and D (columns of V); the r x r factors act on the
    rank side, so this equals preconditioning all of U's and V's gradient and keeping B and D.
    Why: dW = U V has many factorisations (U M, M^-1 V). With these gradients an SGD step on the
    full U and V (delta = 0) changes dW by -lr (G P_row(V) + P_col(U) G) to first order, G =
    dL/d(dW), whichever factorisation is held. Make steps only B and D, through AdamW (as the
    official code), so this motivates the step rather than holds exactly for it. It balances the
    halves: B's gradient (style) is rescaled by V's Gram matrix, which holds the content half D,
    and D's by U's, which holds B. Batched over a leading dimension; delta is absolute (under the
    orthogonal prior U^T U and V V^T are of order 1)."""
    eye = delta * torch.eye(U.shape[-1], dtype=U.dtype, device=U.device)
    G_B = torch.linalg.solve(V @ V.mT + eye, G_B, left=False)  # G_B (V V^T + delta I)^-1
    G_D = torch.linalg.solve(U.mT @ U + eye, G_D)  # (U^T U + delta I)^-1 G_D
    return G_B, G_D

class RiemannianAdamW(torch.optim.AdamW):
    """AdamW on the B and D of PLP layers, fed preconditioned gradients ("scaled AdamW": the
    preconditioner acts on the gradient Adam's moments see). U and V are read as they are at each
    step. Two parameter groups, every B and every D, so that each half is clipped on its own."""

    def __init__(self, layers, lr=1e-4, delta=1e-6, **adamw):  # adamw: betas, eps, weight_decay
        self.delta, self.same_shape = delta, {}  # layers that torch.stack batches in one solve
        for layer in layers:
            key = (layer.A.shape, layer.B.shape, layer.C.shape, layer.D.shape)
            self.same_shape.setdefault(key, []).append(layer)
        layers = [layer for group in self.same_shape.values() for layer in group]
        super().__init__([{"params": [layer.B for layer in layers]},
                          {"params": [layer.D for layer in layers]}], lr=lr, **adamw)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("RiemannianAdamW needs the gradients before the step: "
                             "call backward(), then step()")
        for group in self.same_shape.values():  # one batch of solves per shape, one at a time
            # A layer the loss does not reach (leave_unreached) is left as it is, as AdamW would.
            group = [layer for layer in group
                     if layer.B.grad is not None or layer.D.grad is not None]
            if any(layer.B.grad is None or layer.D.grad is None for layer in group):
                raise ValueError("RiemannianAdamW: a layer needs gradients for both B and D")
            if group:
                U, V = torch.stack([l.U for l in group]), torch.stack([l.V for l in group])  # noqa
                G_B = torch.stack([layer.B.grad for layer in group])
                G_D = torch.stack([layer.D.grad for layer in group])
                P_B, P_D = riemannian_precondition(U, V, G_B, G_D, self.delta)
                for layer, P_B_i, P_D_i in zip(group, P_B, P_D):
                    layer.B.grad, layer.D.grad = P_B_i, P_D_i
        return super().step()

# 4. Break: two PLPs trained apart, with multi-correspondence projection learning (MCP) --------
#       content stage:  D <- grad_D L_content,   B <- grad_B mean_k L_aux_style_k
#       style stage:    B <- grad_B L_style,     D <- grad_D mean_k L_aux_content_k
#       L = || eps_theta(z_t, t, c) - target ||^2,   target = eps, or v (v-prediction models)
# Content goes to the down projection's half D, style to the up projection's half B (the
# official scripts). MCP keeps the learned half general: while it learns its concept, the other
# half is trained on other concepts of the other kind (default: the other target set), so that
# the learned half fits a partner from another run in make.
# A set: one folder of images and its prompt, encoded once before training (section 9):
#   {"mean", "std": each image's latent posterior, in the denoiser's latent scale (N x c x h x w),
#    "cond": the prompt's conditioning for the denoiser (a dict of tensors, batch 1)}.
# A loss: loss(sets, generator) -> one value per set (denoising_loss, or section 7's, with its
# model, scheduler and batch size bound: section 9's training_loss).

def denoise(unet, z_t, t, cond):  # eps_theta(z_t, t, c); SDXL's also takes pooled text, sizes
    extra = {k: v for k, v in cond.items() if k != "encoder_hidden_states"}
    return unet(z_t, t, encoder_hidden_states=cond["encoder_hidden_states"],
                added_cond_kwargs=extra or None).sample

def draw_batch(sets, batch_size, generator):
    """batch_size images of each set, with replacement: a fresh z0 ~ q(z | image) of each and the
    set's conditioning per image; all sets concatenated. Every draw comes from the stage's
    generator in a fixed order: a run is reproducible, and a resumed run continues the stream."""
    z0, cond = [], {}
    for s in sets:
        i = torch.randint(len(s["mean"]), (batch_size,), generator=generator)
        eps = torch.randn(s["mean"][i].shape, generator=generator).to(s["mean"].device)
        z0.append(s["mean"][i] + s["std"][i] * eps)
        for k, v in s["cond"].items():
            cond.setdefault(k, []).append(v.expand(batch_size, *v.shape[1:]))
    return torch.cat(z0), {k: torch.cat(v) for k, v in cond.items()}

def per_set(pred, target, sets):
    """Plain MSE per image, then the mean over each set's images: no SNR weighting and no prior
    preservation, as in the official scripts."""
    per_image = F.mse_loss(pred.float(), target.float(), reduction="none").mean((1, 2, 3))
    return per_image.view(len(sets), -1).mean(1)

def denoising_loss(unet, noise_scheduler, batch_size, sets, generator):
    """L of each set, all sets in one forward, with fresh noise and timesteps for every set (the
    official scripts reuse the main batch's for the auxiliary one). noise_scheduler: diffusers'
    DDPMScheduler."""
    z0, cond = draw_batch(sets, batch_size, generator)
    noise = torch.randn(z0.shape, generator=generator).to(z0.device)
    t = torch.randint(noise_scheduler.config.num_train_timesteps, (len(z0),),
                      generator=generator).to(z0.device)
    z_t = noise_scheduler.add_noise(z0, noise, t)  # sqrt(abar_t) z0 + sqrt(1 - abar_t) eps
    kind = noise_scheduler.config.prediction_type
    if kind not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type {kind}: b4m trains epsilon and v-prediction models")
    # v (SD 2.x): sqrt(abar_t) eps - sqrt(1 - abar_t) z0
    target = noise if kind == "epsilon" else noise_scheduler.get_velocity(z0, noise, t)
    return per_set(denoise(unet, z_t.to(unet.dtype), t, cond), target, sets)

def loss_scaler(module):
    """fp16 models: gradients through fp16 activations underflow without loss scaling (as in
    diffusers' scripts). fp32 and bf16: a disabled scaler, a no-op."""
    weight = next(module.parameters())
    return torch.amp.GradScaler(weight.device.type, enabled=weight.dtype == torch.float16)

def leave_unreached(optimizer):
    """A half whose gradient is exactly zero is one the loss does not reach (SD3's last
    add_q_proj, whose text output is discarded): its gradient set to None, AdamW leaves it as it
    is instead of shrinking it by weight decay."""
    for half in optimizer.param_groups:
        for p in half["params"]:
            if p.grad is not None and not p.grad.any():
                p.grad = None

def clip_and_step(optimizer, scaler, max_grad_norm):
    """Clip each trained half (a parameter group) to max_grad_norm (0: off), as the official
    scripts clip each half, then step. scaler: fp16's loss scaler, else a no-op."""
    scaler.unscale_(optimizer)  # clipping sees the true gradients
    if max_grad_norm:
        for half in optimizer.param_groups:
            nn.utils.clip_grad_norm_(half["params"], max_grad_norm)
    scaler.step(optimizer)  # fp16: skipped if a gradient overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)  # None: a half with no gradient (--no-mcp) is skipped

def resume(checkpoint, optimizer, scaler, generator):
    """(first step, loss log): 1 and [] for a fresh stage, else where `checkpoint` (step, log,
    params, optimizer, scaler, generator: what on_step saw) left it, exactly."""
    if checkpoint is None:
        return 1, []
    params = [p for half in optimizer.param_groups for p in half["params"]]
    if [tuple(p.shape) for p in params] != [tuple(v.shape) for v in checkpoint["params"]]:
        raise ValueError("its checkpoint holds parameters of other shapes; delete it to start over")
    with torch.no_grad():
        for p, value in zip(params, checkpoint["params"]):
            p.copy_(value)
    optimizer.load_state_dict(checkpoint["optimizer"])
    scaler.load_state_dict(checkpoint["scaler"])
    generator.set_state(checkpoint["generator"])
    return checkpoint["step"] + 1, list(checkpoint["log"])

def break_stage(stage, denoiser, loss, content, style, aux=None, *, rank, seed, steps, lr, aux_lr,
                grad_accum=1, max_grad_norm=1.0, mcp=True, prior=orthogonal_prior,
                prior_scale=1.0, checkpoint=None, on_step=None):
    """The content or the style stage of break. aux: the auxiliary sets, of the other kind (styles
    for the content stage); None or []: the other target set (the official scripts require three
    folders). mcp=False (--no-mcp): no auxiliary loss. lr: the stage's own half (official 1e-4),
    aux_lr: the other (1e-5). on_step(step, log, optimizer, scaler, generator) runs after every
    step; checkpoint: what it saw, to continue from. Returns (adapter, loss log)."""
    target, partner = (content, style) if stage == "content" else (style, content)
    aux = (aux or [partner]) if mcp else []
    layers = add_plp(denoiser, rank, seed, prior, prior_scale)
    every_B = [layer.B for layer in layers.values()]  # the style half of every layer
    every_D = [layer.D for layer in layers.values()]  # the content half of every layer
    own, other = (every_D, every_B) if stage == "content" else (every_B, every_D)
    # AdamW's defaults (betas 0.9/0.999, eps 1e-8, weight decay 1e-2) are the official values.
    optimizer = torch.optim.AdamW([{"params": own, "lr": lr}, {"params": other, "lr": aux_lr}])
    generator, scaler = seeded(seed, stage), loss_scaler(denoiser)
    first, log = resume(checkpoint, optimizer, scaler, generator)
    try:
        for step in range(first, steps + 1):
            L_target = L_aux = 0.0
            for _ in range(grad_accum):
                # MCP: backward(inputs=...) adds the gradient of those tensors alone, so the
                # target loss reaches the stage's own half only and the auxiliary loss the other
                # half only. (The official scripts let both losses reach both halves.)
                L = loss([target], generator).mean()
                scaler.scale(L / grad_accum).backward(inputs=own)
                L_target += L.item() / grad_accum
                if aux:
                    L = loss(aux, generator).mean()  # mean_k L_aux_k
                    scaler.scale(L / grad_accum).backward(inputs=other)
                    L_aux += L.item() / grad_accum
            leave_unreached(optimizer)
            clip_and_step(optimizer, scaler, max_grad_norm)
            log.append([step, L_target, L_aux] if aux else [step, L_target])
            if on_step:
                on_step(step, log, optimizer, scaler, generator)
    finally:
        remove_plp(denoiser)
    return adapter_of(layers), log

# 5. Make: reassemble and fine-tune briefly ---------------------------------------------------
#       U = [A; B_style],   V = [C, D_content],
#       then B, D <- RiemannianAdamW on L = L_content + L_style (no auxiliary sets)

def reassemble(content, style, content_scale=1.0, style_scale=1.0):
    """The made adapter, U = [A; s_s B_style], V = [C, s_c D_content] per layer (s_c = s_s = 1 in
    the paper; other values: strengths at sampling time). A and C of the two stages must be
    bit-identical, else the two halves were learned against different scaffolds."""
    made = {}
    for name in content:
        A, B_style, C_style, _ = halves(*style[name])
        A_content, _, C, D_content = halves(*content[name])
        if not (torch.equal(A, A_content) and torch.equal(C, C_style)):
            raise ValueError(f"make: the frozen A/C of {name} differ between the content and the "
                             f"style adapter; both must come from the same seed, rank and prior")
        made[name] = (torch.cat([A, style_scale * B_style]),
                      torch.cat([C, content_scale * D_content], 1))
    return made

def make_stage(denoiser, loss, content, style, content_adapter, style_adapter, *, rank, seed,
               steps, lr, grad_accum=1, max_grad_norm=1.0, precondition=True, checkpoint=None,
               on_step=None):
    """The break stages' adapters reassembled, then B and D fine-tuned together on the two target
    sets (official lr 1e-4). precondition=False (--no-precondition): plain AdamW. on_step,
    checkpoint: as in break_stage. Returns (adapter, loss log)."""
    layers = add_plp(denoiser, rank, seed)  # the same modules; load_blocks replaces the draw
    load_blocks(layers, reassemble(content_adapter, style_adapter))
    if precondition:
        optimizer = RiemannianAdamW(layers.values(), lr=lr)
    else:  # two parameter groups all the same, so that each half is clipped on its own
        optimizer = torch.optim.AdamW([{"params": [layer.B for layer in layers.values()]},
                                       {"params": [layer.D for layer in layers.values()]}], lr=lr)
    trained = [p for half in optimizer.param_groups for p in half["params"]]  # every B and D
    generator, scaler = seeded(seed, "b4m"), loss_scaler(denoiser)  # "b4m": the made adapter
    first, log = resume(checkpoint, optimizer, scaler, generator)
    try:
        for step in range(first, steps + 1):
            L_total = 0.0
            for _ in range(grad_accum):
                # No routing and no auxiliary sets: the optimizer balances the halves (section 3).
                L = loss([content, style], generator).sum()  # L_content + L_style, one forward
                scaler.scale(L / grad_accum).backward(inputs=trained)
                L_total += L.item() / grad_accum
            leave_unreached(optimizer)
            clip_and_step(optimizer, scaler, max_grad_norm)  # clip, then precondition and step
            log.append([step, L_total])
            if on_step:
                on_step(step, log, optimizer, scaler, generator)
    finally:
        remove_plp(denoiser)
    return adapter_of(layers), log

# 6. Sample: the made adapter is an ordinary diffusers LoRA -----------------------------------
#       W = W0 + U V in every adapted projection; generate with the combined prompt

def diffusers_keys(adapter, prefix):
    """An adapter in diffusers' LoRA layout, scale 1. Its letters are not the paper's: diffusers'
    lora_A is the down projection V = [C, D], its lora_B the up projection U = [A; B]."""
    sd = {}
    for name, (U, V) in adapter.items():
        sd[f"{prefix}.{name}.lora_A.weight"] = V
        sd[f"{prefix}.{name}.lora_B.weight"] = U
    return sd

def generate(pipe, adapter, prompt, *, num_samples, steps, resolution, seed, guidance=None):
    """Images from a diffusers pipeline with the adapter put in by diffusers' own loader: the
    pipeline's sampler, and its default guidance unless given (SDXL's 5.0, as the official
    inference). Unloaded afterwards, not unfused: unfusing subtracts U V again, which is not
    exact in floating point, and later samples must see the base weights."""
    denoiser = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
    prefix = "unet" if denoiser is getattr(pipe, "unet", None) else "transformer"
    denoiser.load_lora_adapter(diffusers_keys(adapter, prefix), prefix=prefix, adapter_name="b4m")
    try:
        kw = {} if guidance is None else {"guidance_scale": guidance}
        return pipe(prompt, num_images_per_prompt=num_samples, num_inference_steps=steps,
                    height=resolution, width=resolution,
                    generator=torch.Generator(pipe.device).manual_seed(seed), **kw).images
    finally:
        denoiser.unload_lora()

# 7. Flow-matching transformers (SD3 / SD3.5, FLUX.1): the loss that changes -------------------
#       x_t = (1 - sigma) x0 + sigma eps,    L = || v_theta(x_t, t, c) - (eps - x0) ||^2
#       (sections 1-5 take the loss as given: the PLP split is defined on any nn.Linear)
# Beyond the paper (it adapts SDXL's UNet): whether the split parts content from style in an MMDiT
# is an open question.
# As diffusers' DreamBooth LoRA scripts for SD3 and FLUX train: sigma read from a fresh copy of
# the model's FlowMatchEulerDiscreteScheduler at a timestep drawn from a density, logit-normal
# (mean 0, std 1) for SD3 and uniform for FLUX, each its script's default. Dropped, for one plain
# loss across families: the SD3 script's output preconditioning (on by default; it weights this
# loss by sigma^2) and its optional weighting schemes.

def flow_matching_loss(velocity, noise_scheduler, batch_size, sets, generator, density):
    """L of each set, like denoising_loss. velocity(x_t, t, cond): the transformer's prediction
    (section 9 builds it per family). density: "logit_normal" or "uniform"."""
    x0, cond = draw_batch(sets, batch_size, generator)  # latents (z - shift) * scale
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    if density == "logit_normal":  # u = sigmoid(N(0, 1))
        u = torch.sigmoid(torch.normal(0.0, 1.0, size=(len(x0),), generator=generator))
    else:
        u = torch.rand(size=(len(x0),), generator=generator)
    # t and sigma at index u T of the training schedule, which runs down from t = T, sigma = 1
    # (pure noise); both densities are symmetric about 1/2, so the direction does not matter
    index = (u * noise_scheduler.config.num_train_timesteps).long()
    t = noise_scheduler.timesteps[index].to(x0.device)
    sigma = noise_scheduler.sigmas[index].to(x0.device).view(-1, 1, 1, 1)
    x_t = (1 - sigma) * x0 + sigma * noise  # a straight line from the image (0) to noise (1)
    return per_set(velocity(x_t, t, cond), noise - x0, sets)  # target: the line's velocity


# =============================================================================================
# The plumbing: everything below reads files, loads models or parses flags.
# =============================================================================================
import argparse, contextlib, csv, io, itertools, json, math, os, re, signal, sys, time  # noqa
from importlib.metadata import version as package_version  # noqa: E402
from pathlib import Path  # noqa: E402

# 8. The naive baseline (--baseline lora-merge): two ordinary LoRAs trained apart, summed -------
def lora_stage(stage, denoiser, loss, data, *, rank, seed, steps, lr, grad_accum=1,
               max_grad_norm=1.0, checkpoint=None, on_step=None):
    """An ordinary peft LoRA as diffusers' scripts train one: AdamW on its set's loss, every
    parameter stepped, the "gaussian" init they ask of peft (V ~ N(0, 1/r^2), U = 0)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(TARGETS)),
                         adapter_name=stage)
    named = [(n, p) for n, p in denoiser.named_parameters() if f".{stage}." in n]
    generator = seeded(seed, stage)
    for n, p in named:  # drawn from our generator, fp32 whatever the model's dtype
        p.data = (torch.randn(p.shape, generator=generator) / rank if "lora_A" in n
                  else torch.zeros(p.shape)).to(p.device)
    params = [p for _, p in named]
    optimizer, scaler = torch.optim.AdamW(params, lr=lr), loss_scaler(denoiser)
    first, log = resume(checkpoint, optimizer, scaler, generator)
    try:
        for step in range(first, steps + 1):
            L_total = 0.0
            for _ in range(grad_accum):
                L = loss([data], generator).mean()
                scaler.scale(L / grad_accum).backward(inputs=params)
                L_total += L.item() / grad_accum
            clip_and_step(optimizer, scaler, max_grad_norm)  # U = 0 at step 1: V's grad is 0
            log.append([step, L_total])
            if on_step:
                on_step(step, log, optimizer, scaler, generator)
        sd = get_peft_model_state_dict(denoiser, adapter_name=stage)
    finally:
        denoiser.unload_lora()
    return {k[:-len(".lora_A.weight")]: (sd[k.replace("lora_A", "lora_B")].float().cpu(),
                                          v.float().cpu())
            for k, v in sd.items() if k.endswith(".lora_A.weight")}, log
def merge_loras(content, style):
    """Sum of two rank-r LoRAs = one rank-2r LoRA: U = [U_c, U_s], V = [V_c; V_s]."""
    return {name: (torch.cat([U, style[name][0]], 1), torch.cat([V, style[name][1]], 0))
            for name, (U, V) in content.items()}

# 9. Models: any diffusers SD 1.x/2.x, SDXL, SD3/SD3.5 or FLUX.1 pipeline; the sets of section 4
PIPELINES = {"StableDiffusionPipeline": ("unet", "UNet2DConditionModel"),  # (folder, class)
             "StableDiffusionXLPipeline": ("unet", "UNet2DConditionModel"),
             "StableDiffusion3Pipeline": ("transformer", "SD3Transformer2DModel"),
             "FluxPipeline": ("transformer", "FluxTransformer2DModel")}
class UsageError(Exception):
    """Bad input or a run that cannot go on: main() prints it as one line and exits with code 2."""
def denoiser_of(pipe):  # (the UNet of SD/SDXL or the transformer of SD3/FLUX, its key prefix)
    unet = getattr(pipe, "unet", None)
    return (unet, "unet") if unet is not None else (pipe.transformer, "transformer")
def is_flux(pipe):
    return type(pipe).__name__ == "FluxPipeline"
@torch.no_grad()
def encode_prompts(pipe, prompts, resolution):
    """Conditioning by the pipeline's own encode_prompt: 'encoder_hidden_states', and the pooled
    embedding: SDXL's 'text_embeds' with 'time_ids' (size, crop (0, 0), size), or SD3's and
    FLUX's 'pooled_projections'."""
    kw = {} if is_flux(pipe) else {"do_classifier_free_guidance": False}
    if type(pipe).__name__ == "StableDiffusion3Pipeline":  # CLIP x 2 + T5: the same prompt
        kw.update(prompt_2=None, prompt_3=None)
    out = pipe.encode_prompt(prompts, device=pipe.device, num_images_per_prompt=1, **kw)
    if len(out) == 2:  # SD 1.x/2.x: (embeddings, negative embeddings)
        return {"encoder_hidden_states": out[0]}
    emb, pooled = out[0], out[1 if is_flux(pipe) else 2]  # FLUX: (emb, pooled, text ids)
    if denoiser_of(pipe)[1] == "transformer":
        return {"encoder_hidden_states": emb, "pooled_projections": pooled}
    ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * len(prompts))
    return {"encoder_hidden_states": emb, "text_embeds": pooled, "time_ids": ids.to(emb)}
@torch.no_grad()
def encode_set(pipe, pixels, prompt):
    """A set (section 4) from pixels (N x 3 x H x W in [-1, 1]) and a prompt. Latents are
    (z - shift) * scale with the VAE's own factors (SD3, FLUX shift)."""
    vae, dtype = pipe.vae, pipe.vae.dtype
    vae.float()  # encode in fp32: SDXL's VAE overflows in fp16
    dists = [vae.encode(x.to(vae.device)).latent_dist for x in pixels.split(4)]
    vae.type(dtype)
    sf, shift = vae.config.scaling_factor, vae.config.get("shift_factor") or 0
    mean = torch.cat([d.mean for d in dists]) - shift  # (mean + std eps - shift) sf
    return {"mean": mean * sf, "std": torch.cat([d.std for d in dists]) * sf,
            "cond": encode_prompts(pipe, [prompt], pixels.shape[-1])}
def training_loss(pipe, batch_size, guidance):
    """loss(sets, generator): denoising_loss with a DDPM copy of the pipeline's scheduler, or
    flow_matching_loss with the transformer's velocity. FLUX takes latents packed 2 x 2, position
    ids, t / 1000 and, if guidance-distilled (FLUX.1 dev), a guidance value, as diffusers does."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
    denoiser, prefix = denoiser_of(pipe)
    if prefix == "unet":
        ddpm = DDPMScheduler.from_config(pipe.scheduler.config)
        return lambda sets, g: denoising_loss(denoiser, ddpm, batch_size, sets, g)

    def velocity(x, t, cond):
        x, text = x.to(denoiser.dtype), {k: cond[k] for k in ("encoder_hidden_states",
                                                               "pooled_projections")}
        if not is_flux(pipe):  # SD3 / SD3.5
            return denoiser(hidden_states=x, timestep=t, **text).sample
        (n, c, h, w), g = x.shape, None  # FLUX.1 schnell: no guidance input
        if denoiser.config.guidance_embeds:
            g = torch.full((n,), guidance, device=x.device, dtype=x.dtype)
        text_ids = torch.zeros(text["encoder_hidden_states"].shape[1], 3).to(x)
        image_ids = pipe._prepare_latent_image_ids(n, h // 2, w // 2, x.device, x.dtype)
        v = denoiser(hidden_states=pipe._pack_latents(x, n, c, h, w), timestep=t / 1000,
                     guidance=g, txt_ids=text_ids, img_ids=image_ids, **text).sample
        return pipe._unpack_latents(v, h, w, 1)  # sizes in latents, not pixels: scale 1
    flow = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    density = "uniform" if is_flux(pipe) else "logit_normal"
    return lambda sets, g: flow_matching_loss(velocity, flow, batch_size, sets, g, density)
def check_rank(rank, denoiser):
    limit = min(m.out_features // 2 + m.in_features // 2
                for n, m in denoiser.named_modules() if is_target(n, m))
    if rank > limit:  # m_f + n_f >= r in every adapted layer (section 2)
        raise UsageError(f"--rank {rank}: this model's smallest attention layer allows {limit}")
def check_model(model, rank):
    """Before any weights load: a pipeline b4m trains, by folder or hub id, whose attention
    layers allow the rank (checked on a weightless 'meta' copy of the denoiser)."""
    import diffusers
    try:
        kind = diffusers.DiffusionPipeline.load_config(model)["_class_name"]
        folder, cls = PIPELINES.get(kind, (None, None))
        config = folder and getattr(diffusers, cls).load_config(model, subfolder=folder)
    except Exception as e:
        raise UsageError(f"--model {model}: no diffusers pipeline there ({type(e).__name__}); "
                         "pass a folder written by save_pretrained or a reachable hub id") from None
    if not config:  # img2img, inpainting, ...: their call takes other inputs
        raise UsageError(f"--model {model}: a {kind}; b4m needs an SD 1.x/2.x, SDXL, SD3/SD3.5 "
                         f"or FLUX.1 text-to-image pipeline")
    with torch.device("meta"):
        check_rank(rank, getattr(diffusers, cls).from_config(config))
def load_pipeline(model, device, dtype):  # frozen, in eval mode: no dropout in the text encoder
    from diffusers import DiffusionPipeline
    try:
        pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype).to(device)
    except Exception as e:
        raise UsageError(f"--model {model}: could not load it ({type(e).__name__})") from None
    pipe.set_progress_bar_config(disable=True)
    for part in pipe.components.values():
        if isinstance(part, nn.Module):
            part.requires_grad_(False).eval()
    return pipe
def model_sizes(pipe, args):
    """The sampling size (default: the model's own, 1024 for SDXL and FLUX.1); SD3 and FLUX
    patch latents 2 x 2, so both sizes must be multiples of 16 for the real models."""
    denoiser, prefix = denoiser_of(pipe)
    latents = denoiser.config.sample_size if prefix == "unet" else pipe.default_sample_size
    args.sample_resolution = args.sample_resolution or latents * pipe.vae_scale_factor
    for flag, size in (("--resolution", args.resolution),
                       ("--sample-resolution", args.sample_resolution)):
        if prefix == "transformer" and size % (2 * pipe.vae_scale_factor):
            raise UsageError(f"{flag} {size}: this model needs a multiple of "
                             f"{2 * pipe.vae_scale_factor}")

# 10. Files: image folders in; every write all or nothing (a temporary file in the same folder,
#    fsync, os.replace); adapters in safetensors, in diffusers' key layout and, for UNets, in the
#    kohya layout that ComfyUI and AUTOMATIC1111 read.
WEIGHTS, KOHYA = "pytorch_lora_weights.safetensors", "{}_kohya.safetensors"
CHECKPOINT, IMAGES = "checkpoint.pt", (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
def open_image(path, resolution):
    """RGB, EXIF-upright, transparent pixels white, 16-bit grey cut to 8 bits, centre-cropped."""
    from PIL import Image, ImageOps
    with Image.open(path) as img:
        img.draft("RGB", (resolution, resolution))  # JPEG: decode at reduced size, cheap when huge
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
            img = img.point(lambda v: v / 256).convert("L")
        if "A" in img.getbands() or "transparency" in img.info:
            img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
        return ImageOps.fit(img.convert("RGB"), (resolution, resolution), Image.Resampling.BICUBIC)
def load_image_set(flag, folder, resolution):
    """(pixels in [-1, 1], N x 3 x H x W; the folder's prompt.txt or None). Unreadable images are
    named in a warning and skipped."""
    folder, prompt, images = Path(folder), None, []
    try:
        if (folder / "prompt.txt").is_file():  # utf-8-sig: with or without Notepad's BOM
            prompt = (folder / "prompt.txt").read_bytes().decode("utf-8-sig").strip()
            if not prompt:
                raise UsageError(f"{flag} {folder}/prompt.txt: empty; write the set's prompt in it")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGES and p.is_file())
    except UnicodeDecodeError:
        raise UsageError(f"{flag} {folder}/prompt.txt: not UTF-8 text; save it as UTF-8") from None
    except OSError as e:
        raise UsageError(f"{flag} {folder}: cannot read it ({e.strerror or e}); pass a readable "
                         f"folder of images") from None
    for path in files:
        try:
            images.append(open_image(path, resolution))
        except Exception as e:  # PIL raises many kinds (OSError, SyntaxError, ValueError, ...)
            print(f"warning: skipping {path}: not a readable image ({type(e).__name__})",
                  file=sys.stderr)
    if not images:
        raise UsageError(f"{flag} {folder}: no readable image ({', '.join(IMAGES)})")
    data = torch.stack([torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
                        for im in images])
    pixels = data.view(len(images), resolution, resolution, 3).permute(0, 3, 1, 2)
    return pixels.float() / 127.5 - 1, prompt
def write_file(path, data):
    """bytes to a file, all or nothing: a kill, a power cut or a full disk leaves the previous
    file (or none), never half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise UsageError(f"{path}: cannot write ({e.strerror or e}); free some space or write "
                         f"elsewhere") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
def to_bytes(write):  # what write(file) writes into a file, as bytes
    f = io.BytesIO()
    write(f)
    return f.getvalue()
def save_json(path, obj):  # allow_nan=False: what b4m writes is always valid JSON
    write_file(path, (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode())
def save_lora(folder, adapter, prefix, metadata, dtype=torch.float32):
    """folder/<stage>_kohya.safetensors (UNets: the converter maps no transformer, and ComfyUI reads
    diffusers keys), then folder/pytorch_lora_weights.safetensors, which marks a finished stage.
    One metadata key: safetensors orders several at random, and a run must give identical bytes."""
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save
    sd = {k: v.to(dtype) for k, v in diffusers_keys(adapter, prefix).items()}
    meta = {"b4m": json.dumps(metadata, sort_keys=True)}
    if prefix == "unet":
        kohya = convert_state_dict_to_kohya(sd)
        write_file(Path(folder) / KOHYA.format(metadata["stage"]), save(kohya, metadata=meta))
    write_file(Path(folder) / WEIGHTS, save(sd, metadata=meta))
def read_lora(path):  # (tensors, b4m's metadata or None) of a safetensors file
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            meta = (f.metadata() or {}).get("b4m")
            return {k: f.get_tensor(k) for k in f.keys()}, meta and json.loads(meta)
    except Exception as e:
        raise UsageError(f"{path}: not a readable safetensors adapter ({type(e).__name__}); "
                         f"restore it or train the run again (--overwrite)") from None
def load_lora(path, denoiser, prefix, expect):
    """An adapter written by save_lora, in the file's dtype, checked against the run (metadata)
    and the model (keys, shapes)."""
    sd, meta = read_lora(path)
    for key, value in expect.items():
        if key != "version" and (meta or {}).get(key) != value:
            raise UsageError(f"{path}: made with {key}={(meta or {}).get(key)}, this run has "
                             f"{key}={value}; use the matching model/settings or another --out")
    layers = {n: m for n, m in denoiser.named_modules() if is_target(n, m)}
    for key in sorted(set(diffusers_keys(dict.fromkeys(layers, (0, 0)), prefix)) ^ set(sd)):
        raise UsageError(f"{path}: has {'an unknown' if key in sd else 'no'} key {key}; the "
                         f"adapter was made for another model")
    adapter = {n: (sd[f"{prefix}.{n}.lora_B.weight"], sd[f"{prefix}.{n}.lora_A.weight"])
               for n in layers}
    for name, (U, V) in adapter.items():
        m, n = layers[name].out_features, layers[name].in_features
        if V.ndim != 2 or U.ndim != 2 or V.shape[1] != n or U.shape != (m, V.shape[0]):
            raise UsageError(f"{path}: {name} has U {tuple(U.shape)}, V {tuple(V.shape)}, this "
                             f"model's layer is {m}x{n}; the adapter was made for another model")
    return adapter


# 11. Command line: flags, --out and --resume, checkpoints, samples -----------------------------
def number(kind, ok, rule):  # an argparse type: kind(text), refused unless finite and ok(value)
    def parse(text):
        with contextlib.suppress(ValueError):
            if math.isfinite(value := kind(text)) and ok(value):
                return value
        raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
    return parse
INT, STEPS = number(int, lambda v: v > 0, "a whole number > 0"), number(int, lambda v: v >= 0,
                                                                          "a whole number >= 0")
POSITIVE, FINITE = number(float, lambda v: v > 0, "a number > 0"), number(float, lambda v: True,
                                                                         "a finite number")
NON_NEGATIVE = number(float, lambda v: v >= 0, "a number >= 0")
SIZE = number(int, lambda v: v > 0 and v % 8 == 0, "a positive multiple of 8")
SEED = number(int, lambda v: 0 <= v < 2**64, "a whole number from 0 to 2^64 - 1")  # torch's range
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Training flags: (type, default, help). Every default written once: the official recipe's
# values where it has one (the README's "Differences from the official code" says where not).
FLAGS = {
    "--model": (str, "stabilityai/stable-diffusion-xl-base-1.0",
                "hub id or folder of an SD 1.x/2.x, SDXL, SD3/SD3.5 or FLUX.1 pipeline"),
    "--out": (str, "runs/b4m", "the run's folder: new, empty, or a b4m run"),
    "--rank": (INT, 64, "LoRA rank r"), "--resolution": (SIZE, 512, "training size"),
    "--steps": (STEPS, 1000, "optimizer steps per break stage"),
    "--make-steps": (STEPS, 1000, "make's steps; 0 = exact reassembly"),
    "--batch-size": (INT, 1, ""), "--grad-accum": (INT, 4, ""),
    "--lr": (POSITIVE, 1e-4, "a stage's own half (the style stage's too, unless --style-lr)"),
    "--style-lr": (POSITIVE, None, "the style stage's own half (None: --lr)"),
    "--aux-lr": (POSITIVE, 1e-5, "the other half, on the auxiliary sets"),
    "--make-lr": (POSITIVE, 1e-4, ""), "--seed": (SEED, 0, ""),
    "--max-grad-norm": (NON_NEGATIVE, 1.0, "clip each trained half's gradient norm; 0 = off"),
    "--guidance": (NON_NEGATIVE, 3.5, "FLUX.1 dev's guidance input in training (diffusers')"),
    "--checkpoint-every": (STEPS, 100, "steps between checkpoints; 0 = only on Ctrl-C/SIGTERM"),
    "--gradient-checkpointing": (bool, False, "trade compute for memory (SDXL, FLUX)"),
    "--resume": (bool, False, "continue the run in --out"),
    "--overwrite": (bool, False, "replace the run in --out (only its own files are removed)"),
    "--no-orth-prior": (bool, False, "ablation: A, C drawn independently"),
    "--prior-scale": (POSITIVE, 1.0, "multiply A, C and D's initial draw (1: as drawn)"),
    "--no-mcp": (bool, False, "ablation: no auxiliary loss in break"),
    "--no-precondition": (bool, False, "ablation: plain AdamW in make"),
    "--baseline": (["b4m", "lora-merge"], "b4m", "lora-merge: the paper's naive baseline, two "
                                                 "ordinary LoRAs trained apart and summed")}
SAMPLE_FLAGS = {  # for training and `sample` (where they default to the run's)
    "--prompt": (str, "a snq object in w@z style", "the made adapter's prompt"),
    "--num-samples": (INT, 4, "images per prompt"),
    "--sample-steps": (INT, 25, "sampling steps (SD3.5 Large Turbo, FLUX.1 schnell: 4)"),
    "--sample-guidance": (NON_NEGATIVE, None, "sampling guidance (None: the pipeline's)"),
    "--sample-resolution": (SIZE, None, "sampling size (None: the model's own)"),
    "--content-scale": (FINITE, 1.0, "s_c: V = [C, s_c D] at sampling"),
    "--style-scale": (FINITE, 1.0, "s_s: U = [A; s_s B] at sampling"),
    "--device": (["auto", "cuda", "mps", "cpu"], "auto", ""),
    "--dtype": (["auto", *DTYPES], "auto", "the frozen model's precision; auto: bf16 on CUDA "
                "(else fp16; FLUX's and T5's activations overflow in fp16), fp32 elsewhere"),
    "--save-dtype": (list(DTYPES), "fp32", "adapter files' precision (fp16/bf16: half the size)")}
DEFAULTS = {f[2:].replace("-", "_"): d for f, (_, d, _) in {**FLAGS, **SAMPLE_FLAGS}.items()}
PROMPTS = {"content": "a photo of snq object", "style": "an image in w@z style"}
# The made adapter's files are named "b4m": b4m/, samples/b4m_N.png.
NAMES = {"content": "content", "style": "style", "make": "b4m"}
# What --resume compares. RUN: any difference refuses the run. STAGES (the stages, in order): a
# stage is kept, or continued from its checkpoint, only while its own settings match too.
RUN = ("model", "baseline", "rank", "resolution", "seed", "batch_size", "grad_accum",
       "max_grad_norm", "content", "style", "content_prompt", "style_prompt", "aux_style",
       "aux_content", "no_orth_prior", "prior_scale", "no_mcp", "dtype", "guidance", "save_dtype")
STAGES = {"content": ("steps", "lr", "aux_lr"), "style": ("steps", "style_lr", "aux_lr"),
          "make": ("steps", "lr", "style_lr", "aux_lr", "make_steps", "make_lr",
                   "no_precondition")}
SAMPLES = re.compile(r"(content|style|b4m)_\d+\.png|grid\.png")  # the PNGs b4m writes
LOCK = ".b4m.lock"
class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the usage block first)
        raise UsageError(message)

    def add(self, flags, runs=False):  # runs: `sample`, whose defaults are the run's
        for flag, (kind, default, text) in flags.items():
            kw = (dict(action="store_true") if kind is bool else dict(choices=kind)
                  if isinstance(kind, list) else dict(type=kind))
            self.add_argument(flag, default=None if runs else default, **kw,
                              help=f"{text} (default: {'the run' if runs else default})".lstrip())
def parse_args(argv):
    if argv[:1] == ["sample"]:
        p = Parser(prog="b4m.py sample", description="Sample again from a finished run.")
        p.add_argument("--run", required=True, help="a finished run's --out folder")
        p.add_argument("--seed", type=SEED, help="(default: the run)")
        p.add_argument("--export", metavar="DIR", help="also write the (scaled) made adapter to "
                       f"DIR/{WEIGHTS} and DIR/{KOHYA.format('b4m')}")
        p.add(SAMPLE_FLAGS, runs=True)
        return argparse.Namespace(**vars(p.parse_args(argv[1:])), command="sample")
    p = Parser(prog="b4m.py", description="Train B4M: content stage, style stage, make; then "
               "sample.", epilog="Images: png, jpg/jpeg, webp, bmp, gif. `python b4m.py sample "
               "-h`: sampling again.")
    p.add_argument("--content", required=True, help="folder of content images (+ prompt.txt)")
    p.add_argument("--style", required=True, help="folder of style images (+ prompt.txt)")
    for kind in ("content", "style"):
        p.add_argument(f"--{kind}-prompt", help=f"default: {kind}'s prompt.txt, else "
                                                f"'{PROMPTS[kind]}'")
        p.add_argument(f"--aux-{kind}", nargs="+", default=[], metavar="DIR",
                       help=f"auxiliary {kind} sets (MCP), each with prompt.txt")
    p.add(FLAGS)
    p.add(SAMPLE_FLAGS)
    args = p.parse_args(argv)
    args.command, args.style_lr = "train", args.style_lr or args.lr
    return args
def pick_device(args):
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    device = args.device if args.device != "auto" else "cuda" if cuda else "mps" if mps else "cpu"
    if not {"cuda": cuda, "mps": mps}.get(device, True):
        raise UsageError(f"--device {device}: not available on this machine; use cpu or auto")
    dtype = args.dtype
    if dtype == "auto":
        dtype = "fp32" if device != "cuda" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if dtype == "fp16" and device == "cpu":
        raise UsageError("--dtype fp16: not supported on the CPU; use fp32 or bf16")
    return device, dtype
def check_baseline(args):  # the baseline has no PLP halves: these flags would do nothing
    given = [k for k in ("content_scale", "style_scale", "prior_scale")
             if vars(args).get(k, 1) != 1]
    given += [k for k in ("aux_style", "aux_content", "no_orth_prior", "no_mcp", "no_precondition")
              if vars(args).get(k)]
    if given and args.baseline != "b4m":
        raise UsageError(f"--{given[0].replace('_', '-')}: only for B4M runs, not --baseline "
                         f"{args.baseline}")
def settings_of(args, stage=None):
    return {k: vars(args)[k] for k in RUN + (STAGES[stage] if stage else ())}
def adapter_metadata(args, stage):
    return {"stage": NAMES[stage], "method": args.baseline, "rank": args.rank, "seed": args.seed,
            "prior": "random" if args.no_orth_prior else "orthogonal", "base_model": args.model,
            "version": __version__}
def read_config(out):  # a run's stored settings, or None where `out` holds no b4m run
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        config = json.loads((Path(out) / "config.json").read_text())
        return config["settings"] if "b4m" in config["versions"] else None
@contextlib.contextmanager
def locked(out):
    """One process per run folder: an exclusive lock on out/.b4m.lock, which the system drops when
    the process ends, also after kill -9, so --resume works after a crash."""
    import fcntl
    Path(out).mkdir(parents=True, exist_ok=True)
    with open(Path(out) / LOCK, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UsageError(f"--out {out}: another b4m process is using this run; wait for it "
                             f"to finish, or pick another --out") from None
        yield
def check_out(out, inputs):
    """--out is refused where b4m would write among files it did not write: a filesystem root,
    the home folder, in, at or around an input folder, a file, a folder with files and no run."""
    out = Path(out).resolve()
    if out == Path(out.anchor) or out == Path.home().resolve():
        raise UsageError(f"--out {out}: a filesystem root or the home folder; pick a new folder")
    for flag, folder in inputs:
        folder = Path(folder).resolve()
        if out == folder or folder in out.parents or out in folder.parents:
            raise UsageError(f"--out {out}: overlaps the {flag} folder {folder}; pick a folder "
                             f"outside every input")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is a file; pass a folder path")
    if read_config(out) is None and out.is_dir() and any(p.name != LOCK for p in out.iterdir()):
        raise UsageError(f"--out {out}: holds files and no b4m run; pick an empty or new folder")
def prepare_out(args):
    """Under the lock: a run is touched only with --resume or --overwrite; --overwrite removes
    the run's own files only; --resume needs the same settings. Returns the finished stages."""
    out, old = Path(args.out), read_config(args.out)
    if old is None:
        return set()
    if args.overwrite:
        own = [out / name for name in ("config.json", "losses.csv", "report.json")]
        own += [out / NAMES[s] / f for s in STAGES
                for f in (WEIGHTS, KOHYA.format(NAMES[s]), CHECKPOINT)]
        for path in own + [p for p in out.glob("samples/*.png") if SAMPLES.fullmatch(p.name)]:
            path.unlink(missing_ok=True)
        return set()
    if not args.resume:
        raise UsageError(f"--out {out}: already holds a run; pass --resume to continue it, "
                         f"--overwrite to replace it, or another --out")
    differ = [f"{k} (was {old.get(k)!r}, now {v!r})" for k, v in settings_of(args).items()
              if old.get(k) != v]
    if differ:
        raise UsageError(f"--resume: settings differ from the run in {out}: {', '.join(differ)}")
    for folder in ("", "samples", *NAMES.values()):  # files left by a kill in mid-write
        for tmp in (out / folder).glob(".*.tmp[0-9]*"):
            tmp.unlink()

    def kept(stage):  # finished, with the same settings
        same = all(old.get(k) == v for k, v in settings_of(args, stage).items())
        return (out / NAMES[stage] / WEIGHTS).exists() and same
    done = set(itertools.takewhile(kept, STAGES))  # in order: make needs both break stages
    if done and not (out / "losses.csv").is_file():
        raise UsageError(f"--resume: {out / 'losses.csv'} is missing, and with it the finished "
                         f"stages' losses; use --overwrite to train again")
    for stage in done:  # a kill between a stage's last write and this deletion leaves one behind
        (out / NAMES[stage] / CHECKPOINT).unlink(missing_ok=True)
    return done
class Interrupted(Exception):
    """Ctrl-C or SIGTERM: training stopped between two steps, what it did saved. (signum, text)"""
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
def load_checkpoint(path, settings):
    """The stage's checkpoint if taken with these settings, else None. weights_only: no
    arbitrary pickles; on the CPU: the optimizer moves its state to the parameters' device."""
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
        assert {"step", "log", "params", "optimizer", "scaler", "generator", "settings"} <= {*state}
    except Exception as e:
        raise UsageError(f"{path}: not a readable b4m checkpoint ({type(e).__name__}); delete it "
                         f"to start the stage over") from None
    return state if state["settings"] == settings else None
def run_stage(stage, pipe, loss, data, adapters, args, asked):
    """One stage (sections 4, 5, 8), from its checkpoint when one matches; its on_step shows
    progress, stops on a non-finite loss, checkpoints every --checkpoint-every steps and on a
    signal in `asked`. Returns (adapter, loss log, seconds)."""
    from tqdm import tqdm
    path, settings = Path(args.out) / NAMES[stage] / CHECKPOINT, settings_of(args, stage)
    state = load_checkpoint(path, settings) if args.resume and path.exists() else None
    if args.resume and path.exists():
        print(f"{stage}: continuing from step {state['step']} ({path})" if state else
              f"{stage}: {path} was taken with other settings; starting the stage over",
              file=sys.stderr)
    steps = args.make_steps if stage == "make" else args.steps
    t0 = time.time() - (state or {}).get("seconds", 0)
    bar = tqdm(total=steps, initial=state["step"] if state else 0, desc=stage, dynamic_ncols=True)

    def on_step(step, log, optimizer, scaler, generator):
        bar.update()
        bar.set_postfix(loss=f"{log[-1][1]:.4f}")
        if not all(math.isfinite(v) for v in log[-1][1:]):
            raise FloatingPointError(f"step {step}: the loss is not finite ({log[-1][1:]})")
        if asked or (args.checkpoint_every and step % args.checkpoint_every == 0 and step < steps):
            params = [p.detach().cpu().clone() for g in optimizer.param_groups for p in g["params"]]
            ckpt = {"step": step, "log": log, "params": params, "settings": settings,
                    "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                    "generator": generator.get_state(), "seconds": time.time() - t0}
            write_file(path, to_bytes(lambda f: torch.save(ckpt, f)))
        if asked:
            raise Interrupted(asked[0], f"stopped in the {stage} stage after step {step}, saved "
                                        f"in {path}; run the same command with --resume")
    kw = dict(rank=args.rank, seed=args.seed, steps=steps, grad_accum=args.grad_accum,
              max_grad_norm=args.max_grad_norm, checkpoint=state, on_step=on_step)
    denoiser, lr = denoiser_of(pipe)[0], args.style_lr if stage == "style" else args.lr
    try:
        if args.baseline == "lora-merge" and stage == "make":
            adapter, log = merge_loras(adapters["content"], adapters["style"]), []
        elif args.baseline == "lora-merge":
            adapter, log = lora_stage(stage, denoiser, loss, data[stage], lr=lr, **kw)
        elif stage == "make":
            adapter, log = make_stage(denoiser, loss, data["content"], data["style"],
                                      adapters["content"], adapters["style"], lr=args.make_lr,
                                      precondition=not args.no_precondition, **kw)
        else:
            adapter, log = break_stage(
                stage, denoiser, loss, data["content"], data["style"],
                data["aux_style" if stage == "content" else "aux_content"], lr=lr,
                aux_lr=args.aux_lr, mcp=not args.no_mcp, prior_scale=args.prior_scale,
                prior=random_prior if args.no_orth_prior else orthogonal_prior, **kw)
    except FloatingPointError as e:
        raise UsageError(f"{stage} stage, {e}; lower --lr/--aux-lr/--make-lr, or use --dtype "
                         f"bf16 or fp32 (finished stages are kept)") from None
    except ValueError as e:  # the method's own refusals (scaffolds that differ, a checkpoint...)
        raise UsageError(f"{stage} stage: {e}") from None
    finally:
        bar.close()
    return adapter, log, time.time() - t0
def train_main(args):
    # Everything that can be checked without the model's weights is, so a typo costs seconds.
    device, args.dtype = pick_device(args)  # stored resolved: --resume must not mix precisions
    check_baseline(args)
    check_model(args.model, args.rank)
    sets, folders = {}, []  # folders: every input folder, absolute (config.json: any cwd)
    for kind in ("content", "style", "aux_style", "aux_content"):
        flag, many = f"--{kind.replace('_', '-')}", kind.startswith("aux")
        paths = [str(Path(d).resolve()) for d in (vars(args)[kind] if many else [vars(args)[kind]])]
        sets[kind] = [load_image_set(flag, d, args.resolution) for d in paths]
        for folder in [d for d, (_, p) in zip(paths, sets[kind]) if many and p is None][:1]:
            raise UsageError(f"{flag} {folder}: no prompt.txt; an auxiliary set needs one")
        setattr(args, kind, paths if many else paths[0])
        folders += [(flag, d) for d in paths]
    for kind in ("content", "style"):  # the flag, else the folder's prompt.txt, else the default
        prompt = vars(args)[f"{kind}_prompt"] or sets[kind][0][1] or PROMPTS[kind]
        if not prompt.strip():
            raise UsageError(f"--{kind}-prompt: empty; give a non-empty prompt")
        setattr(args, f"{kind}_prompt", prompt.strip())
    if Path(args.model).exists():
        args.model = str(Path(args.model).resolve())
        folders.append(("--model", args.model))
    check_out(args.out, folders)
    with locked(args.out):
        done = prepare_out(args)
        pipe = load_pipeline(args.model, device, DTYPES[args.dtype])
        model_sizes(pipe, args)
        if args.gradient_checkpointing:
            denoiser_of(pipe)[0].enable_gradient_checkpointing()
        prompts = {"content": args.content_prompt, "style": args.style_prompt}
        data = {k: [encode_set(pipe, px, prompts.get(k, p)) for px, p in v]
                for k, v in sets.items()}
        data["content"], data["style"] = data["content"][0], data["style"][0]
        train(pipe, training_loss(pipe, args.batch_size, args.guidance), data, done, args)
def train(pipe, loss, data, done, args):
    """The three stages in order, each saved when it ends; a finished one (`done`) is loaded."""
    out, (denoiser, prefix) = Path(args.out), denoiser_of(pipe)
    versions = {p: package_version(p) for p in ("torch", "diffusers", "transformers")}
    settings = {k: v for k, v in vars(args).items() if k not in ("resume", "overwrite")}
    save_json(out / "config.json", {"settings": settings,
                                    "versions": {"b4m": __version__, **versions}})
    log, adapters, seconds = [], {}, {}
    if done:  # the finished stages' rows of losses.csv and seconds of report.json are kept
        rows = list(csv.reader((out / "losses.csv").read_text().splitlines()))[1:]
        log = [row for row in rows if row[0] in {NAMES[s] for s in done}]
        with contextlib.suppress(OSError, ValueError, KeyError):
            seconds = json.loads((out / "report.json").read_text())["seconds"]
    save_dtype = DTYPES[args.save_dtype]
    with stop_on_signals() as asked:
        for stage in STAGES:
            folder = out / NAMES[stage]
            if stage in done:
                adapters[stage] = load_lora(folder / WEIGHTS, denoiser, prefix,
                                            adapter_metadata(args, stage))
                print(f"{stage}: kept {folder / WEIGHTS} (--resume)", file=sys.stderr)
                continue
            adapter, stage_log, seconds[NAMES[stage]] = run_stage(stage, pipe, loss, data,
                                                                  adapters, args, asked)
            # In memory as in the file, so that a resumed run's make starts from the same halves.
            adapters[stage] = {n: (U.to(save_dtype), V.to(save_dtype))
                               for n, (U, V) in adapter.items()}
            log += [[NAMES[stage], step, *[f"{v:.6g}" for v in losses], *[""] * (2 - len(losses))]
                    for step, *losses in stage_log]
            text = io.StringIO(newline="")
            csv.writer(text).writerows([["stage", "step", "loss", "aux_loss"]] + log)
            write_file(out / "losses.csv", text.getvalue().encode())
            save_json(out / "report.json", {"seconds": {k: round(v, 3)
                                                        for k, v in seconds.items()}})
            save_lora(folder, adapter, prefix, adapter_metadata(args, stage), save_dtype)
            (folder / CHECKPOINT).unlink(missing_ok=True)  # the adapter marks the stage finished
            if asked:  # a signal after the stage's last step
                raise Interrupted(asked[0], f"stopped after the {stage} stage (saved); run it "
                                            f"again with --resume")
    write_samples(pipe, adapters, args)
    print(f"wrote {out}: content/, style/, b4m/ (adapters), samples/, config.json, losses.csv",
          file=sys.stderr)
def made(adapters, args):  # reassemble(x, x): the made adapter's halves at the asked strengths
    if args.baseline != "b4m":
        return adapters["make"]
    return reassemble(adapters["make"], adapters["make"], args.content_scale, args.style_scale)
def write_samples(pipe, adapters, args):
    """samples/{content,style,b4m}_{i}.png and grid.png (a row each). Every image is made before
    any file is written, and the old samples go only when the new ones are all written."""
    from diffusers.utils import make_image_grid
    named = {**{k: adapters[k] for k in ("content", "style")}, "b4m": made(adapters, args)}
    prompts = {"content": args.content_prompt, "style": args.style_prompt, "b4m": args.prompt}
    files = {}
    for name, adapter in named.items():
        images = generate(pipe, adapter, prompts[name], num_samples=args.num_samples,
                          steps=args.sample_steps, resolution=args.sample_resolution,
                          seed=args.seed, guidance=args.sample_guidance)
        files.update({f"{name}_{j}.png": im for j, im in enumerate(images)})
    files["grid.png"] = make_image_grid(list(files.values()), len(named), args.num_samples)
    samples = Path(args.out) / "samples"
    for name, im in files.items():
        write_file(samples / name, to_bytes(lambda f: im.save(f, format="PNG")))
    for old in samples.glob("*.png"):
        if SAMPLES.fullmatch(old.name) and old.name not in files:
            old.unlink()
    print(f"wrote {samples}", file=sys.stderr)
def sample_main(args):
    run, config = Path(args.run), read_config(args.run)
    if config is None:
        raise UsageError(f"--run {run}: no b4m config.json; pass the --out of a finished b4m run")
    for k, v in config.items():
        if vars(args).get(k) is None:
            setattr(args, k, v)
    args.out = str(run)
    check_baseline(args)
    device, dtype = pick_device(args)
    for s in STAGES:
        if not (run / NAMES[s] / WEIGHTS).is_file():
            raise UsageError(f"--run {run}: no {NAMES[s]}/{WEIGHTS}; finish the run (--resume)")
    export = args.export and Path(args.export)
    if export and export.resolve() in [(run / NAMES[s]).resolve() for s in STAGES]:
        raise UsageError(f"--export {export}: a stage folder of the run; pick another folder")
    for file in [export / WEIGHTS, export / KOHYA.format("b4m")] if export else []:
        if file.exists() and not (file.is_file() and read_lora(file)[1]):
            raise UsageError(f"--export {file}: exists and is not b4m's; pick another folder")
    check_model(args.model, args.rank)
    with locked(run):
        pipe = load_pipeline(args.model, device, DTYPES[dtype])
        denoiser, prefix = denoiser_of(pipe)
        model_sizes(pipe, args)
        run_args = argparse.Namespace(**config)
        adapters = {s: load_lora(run / NAMES[s] / WEIGHTS, denoiser, prefix,
                                 adapter_metadata(run_args, s)) for s in STAGES}
        if export:
            meta = {**adapter_metadata(run_args, "make"), "content_scale": args.content_scale,
                    "style_scale": args.style_scale}
            save_lora(export, made(adapters, args), prefix, meta, DTYPES[args.save_dtype])
        write_samples(pipe, adapters, args)
def main(argv=None):
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        (sample_main if args.command == "sample" else train_main)(args)
    except (UsageError, OSError) as e:  # OSError: a file system refusal not foreseen above
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
