"""Tests for b4m.py. First the paper's identities, in the method's order, each an executable
statement on small float64 tensors; then sections 1-3 in detail; then the product, end to end on
the tiny random SD/SDXL pipelines (offline): break, make and sample, bad input, never losing work,
checkpoints, the additions beyond the paper, the examples, and the toy world."""
import argparse
import functools
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import b4m

ROOT = Path(__file__).resolve().parent
EXAMPLES = ROOT / "examples"
FAST = ["--steps", "2", "--make-steps", "2", "--grad-accum", "1", "--sample-steps", "2", "--num-samples", "1"]


def plp(m=12, n=10, r=4, seed=0, dtype=torch.float64, bias=True):
    torch.manual_seed(seed)
    base = nn.Linear(n, m, bias=bias).to(dtype)
    g = torch.Generator().manual_seed(seed)
    layer = b4m.PLPLinear(base, *b4m.orthogonal_prior(m, n, r, g), g)
    with torch.no_grad():
        layer.B.normal_()  # B = 0 at init hides half of the identities below
    return layer


# The paper's identities, in the method's order ------------------------------------------------
# Each test states one identity of sections 1-5 on small float64 tensors; the product's tests
# (the tiny pipelines, files, bad input, resume, the toy world) follow further down.

def toy_denoiser(seed=0):
    """Two attention-named linear layers of odd, mixed widths: what add_plp adapts, in miniature."""
    torch.manual_seed(seed)
    return nn.ModuleDict({"attn": nn.ModuleDict({"to_q": nn.Linear(7, 9), "to_k": nn.Linear(9, 5)})}).double()


def toy_sets(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(4, 7, generator=g, dtype=torch.float64),
             "y": torch.randn(4, 5, generator=g, dtype=torch.float64)} for _ in range(n)]


def toy_loss(denoiser):
    """loss(sets, generator): one squared error per set, as b4m's stages expect of a loss."""
    def loss(sets, generator=None):
        f = lambda x: denoiser.attn.to_k(torch.tanh(denoiser.attn.to_q(x)))  # noqa: E731
        return torch.stack([(f(s["x"]) - s["y"]).pow(2).mean() for s in sets])
    return loss


class Recorder(torch.optim.SGD):
    """lr 0: keeps a copy of every gradient it is asked to step with."""
    def __init__(self, groups):
        super().__init__(groups, lr=0.0)
        self.seen = []

    def step(self, closure=None):
        self.seen.append([p.grad.clone() if p.grad is not None else None
                          for g in self.param_groups for p in g["params"]])


def test_plp_shapes_and_what_is_trainable():
    layer = plp(m=12, n=9, r=4)
    assert layer.A.shape == (6, 4) and layer.B.shape == (6, 4)
    assert layer.C.shape == (4, 4) and layer.D.shape == (4, 5)
    assert layer.U.shape == (12, 4) and layer.V.shape == (4, 9)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["B", "D"]
    assert set(layer.state_dict()) == {"A", "C", "B", "D", "base.weight", "base.bias"}
    g = torch.Generator().manual_seed(0)
    fresh = b4m.PLPLinear(nn.Linear(9, 12), *b4m.orthogonal_prior(12, 9, 4, g), g)
    assert torch.equal(fresh.B, torch.zeros(6, 4))
    assert fresh.D.std().item() == pytest.approx(1 / 4, rel=0.5)


def test_only_B_and_D_move_even_with_weight_decay():
    layer = plp(dtype=torch.float32)
    frozen = {k: v.clone() for k, v in layer.state_dict().items() if k not in ("B", "D")}
    B0, D0 = layer.B.detach().clone(), layer.D.detach().clone()
    opt = b4m.RiemannianAdamW([layer], lr=1e-2, weight_decay=0.5)
    for _ in range(25):
        layer(torch.randn(4, 10)).pow(2).sum().backward()
        assert layer.base.weight.grad is None and layer.A.grad is None
        opt.step()
        opt.zero_grad()
    for k, v in layer.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k
    assert not torch.equal(layer.B, B0) and not torch.equal(layer.D, D0)
    assert set(map(id, opt.state)) == {id(layer.B), id(layer.D)}


def test_plp_reconstruction_identity_and_forward():
    layer = plp()
    A, B, C, D = layer.A, layer.B, layer.C, layer.D
    blocks = torch.cat([torch.cat([A @ C, A @ D], 1), torch.cat([B @ C, B @ D], 1)], 0)
    assert torch.allclose(layer.delta_weight(), blocks, atol=1e-12)
    x = torch.randn(2, 3, 10, dtype=torch.float64)  # any leading batch shape
    W = layer.base.weight + layer.delta_weight()
    assert torch.allclose(layer(x), x @ W.T + layer.base.bias, atol=1e-12)


@pytest.mark.parametrize("m,n,r", [(12, 10, 4), (64, 32, 48), (7, 9, 3), (1280, 2048, 64)])
def test_orthogonal_prior_identity(m, n, r):
    A, C = b4m.orthogonal_prior(m, n, r, torch.Generator().manual_seed(1))
    assert A.shape == (m // 2, r) and C.shape == (r, n // 2)
    assert torch.allclose(A.T @ A + C @ C.T, torch.eye(r, dtype=torch.float64), atol=1e-12)


def test_preconditioner_formula():
    g = torch.Generator().manual_seed(0)
    U, V = torch.randn(12, 4, generator=g, dtype=torch.float64), torch.randn(4, 10, generator=g, dtype=torch.float64)
    gU, gV = torch.randn(12, 4, generator=g, dtype=torch.float64), torch.randn(4, 10, generator=g, dtype=torch.float64)
    d = 1e-3
    pU, pV = b4m.riemannian_precondition(U, V, gU, gV, delta=d)
    I = torch.eye(4, dtype=torch.float64)
    assert torch.allclose(pU, gU @ torch.linalg.inv(V @ V.T + d * I), atol=1e-12)
    assert torch.allclose(pV, torch.linalg.inv(U.T @ U + d * I) @ gV, atol=1e-12)
    # Slicing commutes with preconditioning: the B rows / D columns of the full result.
    pB, pD = b4m.riemannian_precondition(U, V, gU[6:], gV[:, 5:], delta=d)
    assert torch.allclose(pB, pU[6:], atol=1e-12) and torch.allclose(pD, pV[:, 5:], atol=1e-12)


def test_preconditioned_step_is_invariant_to_reparametrisation():
    """Why the preconditioner exists. dW = U V has many factorisations (U M, M^-1 V). A plain
    gradient step changes dW by -lr (G V^T V + U U^T G): it depends on which factorisation we hold.
    The preconditioned step changes it by -lr (G P_row(V) + P_col(U) G), projections onto V's row
    space and U's column space, which every factorisation shares: same dW, same first-order update."""
    g = torch.Generator().manual_seed(0)
    U, V = torch.randn(12, 4, generator=g, dtype=torch.float64), torch.randn(4, 10, generator=g, dtype=torch.float64)
    G = torch.randn(12, 10, generator=g, dtype=torch.float64)  # dL/d(dW)
    M = torch.randn(4, 4, generator=g, dtype=torch.float64) + 3 * torch.eye(4, dtype=torch.float64)

    def first_order_change(U, V, precondition):
        gU, gV = G @ V.T, U.T @ G  # chain rule through dW = U V
        if precondition:
            gU, gV = b4m.riemannian_precondition(U, V, gU, gV, delta=0.0)
        return gU @ V + U @ gV

    U2, V2 = U @ M, torch.linalg.solve(M, V)
    assert torch.allclose(U @ V, U2 @ V2, atol=1e-12)
    assert torch.allclose(first_order_change(U, V, True), first_order_change(U2, V2, True), atol=1e-9)
    assert not torch.allclose(first_order_change(U, V, False), first_order_change(U2, V2, False), atol=1e-1)


@pytest.mark.parametrize("stage", ["content", "style"])
def test_break_routes_each_loss_into_its_own_half_exactly(stage):
    """MCP: the target loss's gradient reaches only the stage's own half (D for content, B for
    style), the auxiliary loss's only the other half; each equals the gradient of its loss alone."""
    denoiser = toy_denoiser()
    layers = b4m.add_plp(denoiser, 3, seed=0)
    with torch.no_grad():
        for layer in layers.values():
            layer.B.normal_()  # B = 0 at init would hide the style half's gradient
    B, D = [t.B for t in layers.values()], [t.D for t in layers.values()]
    own, other = (D, B) if stage == "content" else (B, D)
    target, *aux = toy_sets()
    loss = toy_loss(denoiser)
    expect_own = torch.autograd.grad(loss([target]).mean(), own)
    expect_other = torch.autograd.grad(loss(aux).mean(), other)  # mean over the auxiliary sets
    opt = Recorder([{"params": own}, {"params": other}])
    scaler = b4m.loss_scaler(denoiser)
    b4m.break_step(loss, target, aux, own, other, opt, generator=None, scaler=scaler, max_grad_norm=0)
    got = opt.seen[0]
    assert all(torch.allclose(a, b, atol=1e-12, rtol=0) for a, b in zip(got[:len(own)], expect_own))
    assert all(torch.allclose(a, b, atol=1e-12, rtol=0) for a, b in zip(got[len(own):], expect_other))
    assert all(t.A.grad is None and t.C.grad is None for t in layers.values())


def test_make_gradient_is_the_gradient_of_L_content_plus_L_style():
    denoiser = toy_denoiser()
    layers = b4m.add_plp(denoiser, 3, seed=0)
    B, D = [t.B for t in layers.values()], [t.D for t in layers.values()]
    content, style = toy_sets(n=2)
    loss = toy_loss(denoiser)
    L = loss([content])[0] + loss([style])[0]
    expect = torch.autograd.grad(L, B + D)
    opt = Recorder([{"params": B}, {"params": D}])
    b4m.make_step(loss, content, style, opt, generator=None, scaler=b4m.loss_scaler(denoiser), max_grad_norm=0)
    assert all(torch.allclose(a, b, atol=1e-12, rtol=0) for a, b in zip(opt.seen[0], expect))


def test_reassembly_is_exact_U_is_A_B_style_and_V_is_C_D_content():
    content_layers = b4m.add_plp(toy_denoiser(), 3, seed=0)
    style_layers = b4m.add_plp(toy_denoiser(), 3, seed=0)  # same seed: the same A and C
    with torch.no_grad():
        for c, s in zip(content_layers.values(), style_layers.values()):
            c.B.normal_(), c.D.normal_(), s.B.normal_(), s.D.normal_()
    made = b4m.reassemble(b4m.lora_state_dict(content_layers), b4m.lora_state_dict(style_layers))
    for name, c in content_layers.items():
        s = style_layers[name]
        U, V = made[f"unet.{name}.lora_B.weight"], made[f"unet.{name}.lora_A.weight"]
        assert torch.equal(U, torch.cat([s.A, s.B]).float()) and torch.equal(V, torch.cat([c.C, c.D], 1).float())


# 1-3 in detail: the PLP layer, the prior, the preconditioner ------------------------------


def test_halves_are_the_blocks_of_the_layer():
    layer = plp(m=13, n=9, r=4)  # odd sizes: m_f = 6 of 13 rows, n_f = 4 of 9 columns frozen
    for mine, theirs in zip(b4m.halves(layer.U, layer.V), (layer.A, layer.B, layer.C, layer.D)):
        assert torch.equal(mine, theirs)
    assert layer.A.shape == (6, 4) and layer.C.shape == (4, 4)


def test_plp_keeps_dtype_and_adapter_stays_fp32_under_bf16():
    g = torch.Generator().manual_seed(0)
    layer = b4m.PLPLinear(nn.Linear(8, 8).to(torch.bfloat16), *b4m.orthogonal_prior(8, 8, 2, g), g)
    assert layer.B.dtype == layer.A.dtype == torch.float32
    assert layer(torch.randn(3, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


# 2. Orthogonal prior -----------------------------------------------------------------------------

def test_random_prior_breaks_the_identity_at_the_same_scale():
    A, C = b4m.random_prior(64, 64, 8, torch.Generator().manual_seed(1))
    G = A.T @ A + C @ C.T
    assert not torch.allclose(G, torch.eye(8, dtype=torch.float64), atol=0.1)
    assert G.diagonal().mean().item() == pytest.approx(1.0, abs=0.25)  # same scale, not orthonormal


def test_prior_scale_multiplies_A_C_and_D_and_the_identity_by_its_square():
    plain, scaled, one = b4m.add_plp(tiny_unet(), 4, 0), b4m.add_plp(tiny_unet(), 4, 0, scale=0.5), \
        b4m.add_plp(tiny_unet(), 4, 0, scale=1.0)
    for name, layer in scaled.items():
        ref = plain[name]
        for block in ("A", "C", "D"):  # x 0.5 is exact in binary floating point
            assert torch.equal(getattr(layer, block), 0.5 * getattr(ref, block)), (name, block)
            assert torch.equal(getattr(one[name], block), getattr(ref, block))  # 1.0: the same bits
        assert not layer.B.any()
        A, C = layer.A.double(), layer.C.double()
        assert torch.allclose(A.T @ A + C @ C.T, 0.25 * torch.eye(4, dtype=torch.float64), atol=1e-6)
        assert torch.allclose(layer.delta_weight(), 0.25 * ref.delta_weight(), atol=1e-7)


@pytest.mark.parametrize("rank", [0, -1, 12])
def test_bad_rank_raises(rank):
    with pytest.raises(ValueError, match="rank must be between 1 and"):
        b4m.orthogonal_prior(12, 10, rank)  # 6 + 5 = 11 is the most a 12x10 layer allows
    with pytest.raises(ValueError, match="rank must be between 1 and"):
        b4m.random_prior(12, 10, rank)
    A, C = b4m.orthogonal_prior(12, 10, 4)
    with pytest.raises(ValueError, match="do not fit a 12x12 layer"):  # a 12x10 layer's scaffold
        b4m.PLPLinear(nn.Linear(12, 12), A, C)


def tiny_unet():
    return b4m.tiny_pipeline("sd").unet


def test_add_plp_is_reproducible_per_seed_and_name():
    a, b, c = (b4m.add_plp(tiny_unet(), 4, seed) for seed in (0, 0, 1))
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name].A, b[name].A) and torch.equal(a[name].C, b[name].C)
        assert torch.equal(a[name].D, b[name].D)
        assert not torch.equal(a[name].A, c[name].A)
    first, second = list(a.values())[:2]
    assert not torch.equal(first.A[:2], second.A[:2])  # each layer its own draw


def test_add_plp_replaces_exactly_the_attention_projections():
    unet = tiny_unet()
    expected = [n for n, m in unet.named_modules() if isinstance(m, nn.Linear)
                and n.split(".")[-1] in ("to_q", "to_k", "to_v") or n.endswith(".to_out.0")]
    linears = sum(isinstance(m, nn.Linear) for m in unet.modules())
    x = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    before = unet(*x).sample
    layers = b4m.add_plp(unet, 4, 0)
    # 4 transformer blocks (down 1, mid 1, up 2) x 2 attentions (self, cross) x 4 projections
    assert sorted(layers) == sorted(expected) and len(layers) == 32
    assert {n for n, m in unet.named_modules() if isinstance(m, b4m.PLPLinear)} == set(expected)
    assert sum(isinstance(m, nn.Linear) for m in unet.modules()) == linears  # bases kept inside
    after = unet(*x).sample
    assert after.shape == before.shape and not torch.equal(after, before)  # A C, A D != 0 at init
    b4m.remove_plp(unet)
    assert torch.equal(unet(*x).sample, before)


# 3. Riemannian preconditioned step ---------------------------------------------------------------

def test_riemannian_adamw_equals_adamw_on_preconditioned_gradients():
    layers = [plp(m=12, n=10, seed=1), plp(m=12, n=10, seed=2), plp(m=8, n=6, r=3, seed=3)]
    twins = [plp(m=12, n=10, seed=1), plp(m=12, n=10, seed=2), plp(m=8, n=6, r=3, seed=3)]
    ours = b4m.RiemannianAdamW(layers, lr=1e-2, weight_decay=0.1, delta=1e-6)
    ref = torch.optim.AdamW([p for t in twins for p in (t.B, t.D)], lr=1e-2, weight_decay=0.1)
    for step in range(5):
        for group in (layers, twins):
            torch.manual_seed(step)
            sum(t(torch.randn(3, t.base.in_features, dtype=torch.float64)).sin().sum() for t in group).backward()
        for t in twins:  # preconditioned one layer at a time, unbatched
            with torch.no_grad():
                t.B.grad, t.D.grad = b4m.riemannian_precondition(t.U, t.V, t.B.grad, t.D.grad, delta=1e-6)
        ours.step(), ref.step()
        ours.zero_grad(), ref.zero_grad()
        for a, b in zip(layers, twins):
            assert torch.allclose(a.B, b.B, atol=1e-12) and torch.allclose(a.D, b.D, atol=1e-12)


def test_riemannian_adamw_batches_layers_of_any_widths():
    """Layers of 10 and 11 outputs have A of one shape and B of two: grouped apart, not stacked."""
    layers = [plp(m=10, n=9, r=3, seed=1), plp(m=11, n=9, r=3, seed=2), plp(m=10, n=9, r=3, seed=3),
              plp(m=7, n=12, r=2, seed=4)]
    opt = b4m.RiemannianAdamW(layers, lr=1e-2)
    assert sorted(len(group) for group in opt.same_shape.values()) == [1, 1, 2]
    sum(t(torch.randn(3, t.base.in_features, dtype=torch.float64)).sin().sum() for t in layers).backward()
    expect = [b4m.riemannian_precondition(t.U, t.V, t.B.grad, t.D.grad) for t in layers]
    opt.step()
    for t, (P_B, P_D) in zip(layers, expect):
        assert torch.allclose(t.B.grad, P_B, atol=1e-12) and torch.allclose(t.D.grad, P_D, atol=1e-12)


COPY_OUT = """
import sys
for name in ("PIL", "safetensors", "tqdm", "diffusers", "transformers", "peft"):
    sys.modules[name] = None  # any import of these now fails
import torch, torch.nn as nn
from b4m import PLPLinear, orthogonal_prior, add_plp, riemannian_precondition, RiemannianAdamW, reassemble
from b4m import lora_state_dict
torch.manual_seed(0)
net = nn.ModuleDict({"a": nn.ModuleDict({"to_q": nn.Linear(9, 10), "to_k": nn.Linear(9, 11),
                                         "to_v": nn.Linear(13, 7)})}).double()
layers = add_plp(net, 3, seed=0)
extra = PLPLinear(nn.Linear(5, 6).double(), *orthogonal_prior(6, 5, 2))
opt = RiemannianAdamW([*layers.values(), extra], lr=1e-2)
for _ in range(2):
    loss = sum(t(torch.randn(2, t.base.in_features, dtype=torch.float64)).pow(2).sum()
               for t in [*layers.values(), extra])
    loss.backward()
    expect = [riemannian_precondition(t.U, t.V, t.B.grad, t.D.grad) for t in [*layers.values(), extra]]
    opt.step()
    for t, (P_B, P_D) in zip([*layers.values(), extra], expect):
        assert torch.allclose(t.B.grad, P_B, atol=1e-12) and torch.allclose(t.D.grad, P_D, atol=1e-12)
    opt.zero_grad()
sd = lora_state_dict(layers)
assert reassemble(sd, sd).keys() == sd.keys()
print("ok", sorted(m for m in ("PIL", "safetensors", "tqdm", "diffusers", "transformers", "peft")
                   if sys.modules.get(m) is not None))
"""


def test_the_method_copies_out_with_torch_alone():
    r = subprocess.run([sys.executable, "-c", COPY_OUT], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok []"


def test_b4m_py_reads_as_a_reference():
    """No line over 100 characters, and at least a third of sections 1-6 (banners aside) explains:
    comment lines and docstrings."""
    import io
    import tokenize

    source = (ROOT / "b4m.py").read_text()
    lines = source.splitlines()
    assert [i + 1 for i, line in enumerate(lines) if len(line) > 100] == []
    docstrings = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.STRING and tok.string.startswith('"""'):
            docstrings.update(range(tok.start[0], tok.end[0] + 1))
    first = next(i for i, line in enumerate(lines) if line.startswith("# 1. Partly learnable"))
    last = next(i for i, line in enumerate(lines) if line.startswith("# 7. "))
    explained = total = 0
    banner = False
    for number in range(first - 1, last - 1):
        line = lines[number].strip()
        if line.startswith("# ----"):
            banner = not banner
        elif line and not banner:
            total += 1
            explained += line.startswith("#") or number + 1 in docstrings
    assert total > 300 and explained / total >= 1 / 3, (explained, total)


def test_riemannian_adamw_reads_the_halves_as_they_are_at_each_step():
    """Nothing cached: A and C changed in place after the optimizer was built are what the next step uses."""
    layer, twin = plp(seed=1), plp(seed=1)
    ours = b4m.RiemannianAdamW([layer], lr=1e-2)
    ref = torch.optim.AdamW([twin.B, twin.D], lr=1e-2)
    for t in (layer, twin):
        with torch.no_grad():
            t.A.mul_(3.0)
            t.C.add_(0.5)
        torch.manual_seed(0)
        t(torch.randn(3, 10, dtype=torch.float64)).sin().sum().backward()
    with torch.no_grad():
        twin.B.grad, twin.D.grad = b4m.riemannian_precondition(twin.U, twin.V, twin.B.grad, twin.D.grad)
    ours.step(), ref.step()
    assert torch.allclose(layer.B, twin.B, atol=1e-12) and torch.allclose(layer.D, twin.D, atol=1e-12)


@pytest.fixture
def tiny_sets():
    """A fresh tiny pipeline, its DDPM training scheduler, and the example content and style sets encoded."""
    from diffusers import DDPMScheduler

    pipe = b4m.load_pipeline("tiny", "cpu", torch.float32)
    content, style = (b4m.encode_set(pipe, *b4m.load_image_set(EXAMPLES / d, 64)) for d in ("content", "style"))
    return pipe, DDPMScheduler.from_config(pipe.scheduler.config), content, style


def test_gradient_clipping_bounds_each_half_and_zero_turns_it_off(tiny_sets):
    pipe, sched, data, _ = tiny_sets
    layers = b4m.add_plp(pipe.unet, 4, 0)
    B, D = [t.B for t in layers.values()], [t.D for t in layers.values()]

    class Seen(torch.optim.SGD):  # lr 0: records the norm of each group's gradient it is handed
        def step(self, closure=None):
            self.norms.append([torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in g["params"]])).item()
                               for g in self.param_groups])

    def norms(limit):
        opt = Seen([{"params": D}, {"params": B}], lr=0.0)
        opt.norms = []

        def huge(sets, generator):
            return 1e6 * b4m.denoising_loss(pipe.unet, sched, 1, sets, generator)
        g, scaler = torch.Generator().manual_seed(0), b4m.loss_scaler(pipe.unet)
        for _ in range(2):
            b4m.break_step(huge, data, [data], D, B, opt, generator=g, scaler=scaler, max_grad_norm=limit)
        return opt.norms

    raw = norms(0)
    assert all(n > 1e3 for step in raw for n in step)
    assert raw == norms(1e30)  # 0 leaves the gradients exactly as a limit that never bites
    assert all(n == pytest.approx(1.0, rel=1e-5) for step in norms(1.0) for n in step)


# 4.-6. Break, make, sample on the tiny pipelines -------------------------------------------------

def run_b4m(argv, capsys=None):
    code = b4m.main([str(a) for a in argv])
    err = capsys.readouterr().err if capsys else ""
    return code, err


@pytest.fixture(scope="session")
def sd_run(tmp_path_factory):
    """One finished tiny SD run, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("runs") / "sd"
    assert b4m.main(["--content", str(EXAMPLES / "content"), "--style", str(EXAMPLES / "style"), "--model", "tiny",
                     "--out", str(out), *FAST, "--steps", "3", "--num-samples", "2"]) == 0
    return out


def load(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_run_writes_every_output(sd_run):
    for stage in ("content", "style", "b4m"):
        assert sorted(p.name for p in (sd_run / stage).iterdir()) == sorted([b4m.WEIGHTS, f"{stage}_kohya.safetensors"])
    names = sorted(p.name for p in (sd_run / "samples").iterdir())
    assert names == ["b4m_0.png", "b4m_1.png", "content_0.png", "content_1.png", "grid.png", "style_0.png", "style_1.png"]
    from PIL import Image

    assert Image.open(sd_run / "samples" / "grid.png").size == (2 * 64, 3 * 64)
    config = json.loads((sd_run / "config.json").read_text())
    assert config["settings"]["rank"] == 4 and config["settings"]["content_prompt"] == "a photo of snq teddybear"
    assert set(config["versions"]) == {"b4m", "torch", "diffusers", "transformers"}
    rows = (sd_run / "losses.csv").read_text().splitlines()
    assert rows[0] == "stage,step,loss,aux_loss"
    assert [r.split(",")[:2] for r in rows[1:]] == [["content", "1"], ["content", "2"], ["content", "3"],
                                                   ["style", "1"], ["style", "2"], ["style", "3"], ["b4m", "1"], ["b4m", "2"]]
    assert all(r.split(",")[3] for r in rows[1:7]) and rows[-1].endswith(",")  # aux loss in break stages only
    from safetensors import safe_open

    with safe_open(str(sd_run / "b4m" / b4m.WEIGHTS), "pt") as f:
        meta = json.loads(f.metadata()["b4m"])
    assert meta == {"stage": "b4m", "method": "b4m", "rank": 4, "seed": 0, "prior": "orthogonal",
                    "base_model": "tiny", "version": b4m.__version__}


def split(sd, key):  # (A, B, C, D) of the layer whose lora_B key this is
    return b4m.halves(sd[key], sd[key.replace("lora_B", "lora_A")])


def test_A_and_C_identical_across_the_three_files_and_make_starts_from_the_halves(sd_run):
    content, style, made = (load(sd_run / s / b4m.WEIGHTS) for s in ("content", "style", "b4m"))
    keys = [k for k in made if k.endswith("lora_B.weight")]
    assert len(keys) == 32 and set(made) == set(content) == set(style)
    for k in keys:
        (Ac, _, Cc, _), (As, _, Cs, _), (Am, _, Cm, _) = split(content, k), split(style, k), split(made, k)
        assert torch.equal(Ac, As) and torch.equal(Ac, Am) and torch.equal(Cc, Cs) and torch.equal(Cc, Cm)
    reassembled = b4m.reassemble(content, style)
    for k in keys:
        assert torch.equal(reassembled[k], style[k])  # U = [A; B_style]
        assert torch.equal(reassembled[k.replace("lora_B", "lora_A")], content[k.replace("lora_B", "lora_A")])


def test_make_refuses_mismatched_scaffolds(sd_run):
    content = load(sd_run / "content" / b4m.WEIGHTS)
    unet = tiny_unet()
    other = b4m.lora_state_dict(b4m.add_plp(unet, 4, seed=1))  # another seed: another A, C
    with pytest.raises(ValueError, match="frozen A/C of .* differ"):
        b4m.reassemble(content, other)


def unet_inputs(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = b4m.encode_prompts(pipe, ["a snq object in w@z style"] * 2, 64)
    hidden = cond.pop("encoder_hidden_states")
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])), dict(encoder_hidden_states=hidden,
                                                                                 added_cond_kwargs=cond or None)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_exported_lora_in_diffusers_equals_the_plp_model(sd_run, tmp_path, kind):
    if kind == "sd":
        folder = sd_run / "b4m"
    else:  # an SDXL-shaped adapter, written the same way
        pipe = b4m.tiny_pipeline("sdxl")
        layers = b4m.add_plp(pipe.unet, 4, 0)
        with torch.no_grad():
            for layer in layers.values():
                layer.B.normal_(0, 0.1)
        folder = tmp_path
        b4m.save_lora(folder, b4m.lora_state_dict(layers), {"stage": "b4m"})
    pipe = b4m.tiny_pipeline(kind)
    layers = b4m.add_plp(pipe.unet, 4, 0)
    b4m.load_plp_state(layers, load(folder / b4m.WEIGHTS))
    args, kwargs = unet_inputs(pipe)
    with torch.no_grad():
        ours = pipe.unet(*args, **kwargs).sample
        b4m.remove_plp(pipe.unet)
        base = pipe.unet(*args, **kwargs).sample
        pipe.load_lora_weights(str(folder))  # the path any diffusers user takes
        theirs = pipe.unet(*args, **kwargs).sample
        pipe.unload_lora_weights()
        pipe.load_lora_weights(str(folder), weight_name="b4m_kohya.safetensors")  # the ComfyUI/A1111 file
        kohya = pipe.unet(*args, **kwargs).sample
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0) and not torch.allclose(ours, base, atol=1e-3)
    assert torch.allclose(kohya, theirs, atol=1e-6, rtol=0)
    names = {k.split(".")[0] for k in load(folder / "b4m_kohya.safetensors")}
    kohya_sd = load(folder / "b4m_kohya.safetensors")
    assert len(names) == 32 and all(re.fullmatch(r"lora_unet_[a-z0-9_]+_to_(q|k|v|out_0)", n) for n in names)
    assert set(kohya_sd) == {f"{n}.{x}" for n in names for x in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert all(kohya_sd[f"{n}.alpha"].item() == 4 for n in names)  # alpha = rank: scale 1


@pytest.mark.parametrize("stage", ["content", "style"])
def test_gradient_routing_in_both_break_stages_on_the_tiny_pipeline(tiny_sets, stage):
    """After a content step, D has seen only the content loss: it is the same whatever the
    auxiliary style images are; B has seen only the auxiliary loss, so it is not. The style
    stage is the mirror image: B the same whatever the auxiliary content, D not."""
    pipe, sched, content, style = tiny_sets
    aux1, aux2 = (style, content) if stage == "content" else (content, style)
    kw = dict(rank=4, seed=0, steps=1, lr=1e-3, aux_lr=1e-3, grad_accum=2, max_grad_norm=1.0)
    loss = functools.partial(b4m.denoising_loss, pipe.unet, sched, 1)
    first, _ = b4m.break_stage(stage, pipe.unet, loss, content, style, [aux1], **kw)
    second, _ = b4m.break_stage(stage, pipe.unet, loss, content, style, [aux2], **kw)
    own, other = (3, 1) if stage == "content" else (1, 3)  # indices of D and B in (A, B, C, D)
    keys = [k for k in first if k.endswith("lora_B.weight")]
    for k in keys:
        assert torch.equal(split(first, k)[own], split(second, k)[own])
    assert any(not torch.equal(split(first, k)[other], split(second, k)[other]) for k in keys)


def test_break_and_make_as_plain_functions(tiny_sets):
    """The method without the command line: plain values in, state dicts and loss logs out, no files."""
    pipe, sched, content, style = tiny_sets
    kw = dict(rank=4, seed=0, grad_accum=1, max_grad_norm=1.0)
    loss = functools.partial(b4m.denoising_loss, pipe.unet, sched, 1)
    c, c_log = b4m.break_stage("content", pipe.unet, loss, content, style, steps=2, lr=1e-3, aux_lr=1e-4, **kw)
    s, _ = b4m.break_stage("style", pipe.unet, loss, content, style, steps=2, lr=1e-3, aux_lr=1e-4, **kw)
    made, m_log = b4m.make_stage(pipe.unet, loss, content, style, c, s, steps=3, lr=1e-3, **kw)
    assert [row[0] for row in c_log] == [1, 2] and len(c_log[0]) == 3 and [row[0] for row in m_log] == [1, 2, 3]
    assert not any(isinstance(m, b4m.PLPLinear) for m in pipe.unet.modules())  # the UNet is given back as it was
    start = b4m.reassemble(c, s)
    for k in (k for k in made if k.endswith("lora_B.weight")):
        A, B, C, D = split(made, k)
        A0, B0, C0, D0 = split(start, k)
        assert torch.equal(A, A0) and torch.equal(C, C0) and not torch.equal(B, B0) and not torch.equal(D, D0)


def test_sdxl_end_to_end_and_sample_again(tmp_path, capsys):
    out = tmp_path / "xl"
    code, err = run_b4m(["--content", EXAMPLES / "content", "--style", EXAMPLES / "style", "--model", "tiny-sdxl",
                         "--out", out, *FAST], capsys)
    assert code == 0, err
    first = (out / "samples" / "b4m_0.png").read_bytes()
    (out / "samples" / "b4m_0.png").unlink()
    code, err = run_b4m(["sample", "--run", out], capsys)
    assert code == 0, err
    assert (out / "samples" / "b4m_0.png").read_bytes() == first  # same seed, same image
    code, err = run_b4m(["sample", "--run", out, "--seed", "5"], capsys)
    assert code == 0 and (out / "samples" / "b4m_0.png").read_bytes() != first


def test_real_loading_path_with_a_saved_v_prediction_pipeline(tmp_path, capsys):
    """--model FOLDER goes through DiffusionPipeline.from_pretrained, the same code as a hub id."""
    pipe = b4m.tiny_pipeline("sd")
    pipe.scheduler.register_to_config(prediction_type="v_prediction")  # as SD 2.x
    pipe.save_pretrained(tmp_path / "model")
    code, err = run_b4m(["--content", EXAMPLES / "content", "--style", EXAMPLES / "style",
                         "--model", tmp_path / "model", "--rank", "4", "--resolution", "64", "--out", tmp_path / "run",
                         *FAST], capsys)
    assert code == 0, err
    made = load(tmp_path / "run" / "b4m" / b4m.WEIGHTS)
    assert made.keys() == b4m.lora_state_dict(b4m.add_plp(pipe.unet, 4, 0)).keys()


def test_v_prediction_target(tiny_sets):
    from diffusers import DDPMScheduler

    pipe, _, data, _ = tiny_sets
    losses = {}
    for kind in ("epsilon", "v_prediction"):
        sched = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type=kind)
        losses[kind] = b4m.denoising_loss(pipe.unet, sched, 2, [data], torch.Generator().manual_seed(0))
    assert not torch.equal(losses["epsilon"], losses["v_prediction"])  # same draws, other target


def test_cli_as_a_subprocess(tmp_path):
    """The quick start, as a user types it (shortened)."""
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "b4m.py", "--content", "examples/content", "--style", "examples/style",
                        "--model", "tiny", "--out", str(out), *FAST], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (out / "b4m" / b4m.WEIGHTS).is_file() and "wrote" in r.stderr


# Bad input: one line naming the flag/file, exit code 2, before any model loads ------------------

@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the input was validated")
    monkeypatch.setattr(b4m, "load_pipeline", refuse)


def bad_inputs(tmp):
    """(extra argv, content folder or None for examples, expected words in the message)"""
    (tmp / "empty").mkdir()
    (tmp / "afile").write_text("x")
    corrupt = tmp / "corrupt"
    corrupt.mkdir()
    (corrupt / "zero.png").write_bytes(b"")
    (corrupt / "text.jpg").write_text("not an image")
    (corrupt / "half.png").write_bytes((EXAMPLES / "content" / "bear_0.png").read_bytes()[:200])
    noprompt = tmp / "noprompt"
    shutil.copytree(EXAMPLES / "style", noprompt)
    (noprompt / "prompt.txt").unlink()
    emptyprompt = tmp / "emptyprompt"
    shutil.copytree(EXAMPLES / "content", emptyprompt)
    (emptyprompt / "prompt.txt").write_text("  \n")
    (tmp / "notapipeline").mkdir()
    latin1 = tmp / "latin1"
    shutil.copytree(EXAMPLES / "content", latin1)
    (latin1 / "prompt.txt").write_bytes("une photo de snq poupée".encode("latin-1"))
    return [
        ([], tmp / "missing", ["--content", "no such folder"]),
        ([], tmp / "afile", ["--content", "not a folder"]),
        ([], tmp / "empty", ["--content", "no readable image"]),
        ([], corrupt, ["--content", "no readable image"]),
        ([], emptyprompt, ["--content", "prompt.txt: empty"]),
        (["--content-prompt", " "], None, ["--content-prompt", "empty"]),
        (["--aux-style", noprompt], None, ["--aux-style", "noprompt", "prompt.txt"]),
        (["--aux-content", tmp / "missing"], None, ["--aux-content", "no such folder"]),
        (["--rank", "0"], None, ["--rank", "must be > 0"]),
        (["--steps", "-1"], None, ["--steps", "must be >= 0"]),
        (["--make-steps", "-5"], None, ["--make-steps", "must be >= 0"]),
        (["--resolution", "60"], None, ["--resolution", "multiple of 8"]),
        (["--resolution", "0"], None, ["--resolution", "multiple of 8"]),
        (["--lr", "0"], None, ["--lr", "must be > 0"]),
        (["--aux-lr=-1e-5"], None, ["--aux-lr", "must be > 0"]),
        (["--make-lr", "nan"], None, ["--make-lr", "must be > 0"]),
        (["--batch-size", "0"], None, ["--batch-size", "must be > 0"]),
        (["--grad-accum", "0"], None, ["--grad-accum", "must be > 0"]),
        (["--device", "tpu"], None, ["--device", "invalid choice"]),
        (["--dtype", "fp8"], None, ["--dtype", "invalid choice"]),
        (["--device", "cuda"], None, ["--device cuda", "not available"]),
        (["--dtype", "fp16"], None, ["--dtype fp16", "CPU"]),
        (["--model", tmp / "missing" / "model"], None, ["--model", "not a hub id"]),
        (["--model", tmp / "notapipeline"], None, ["--model", "model_index.json"]),
        (["--model", "nobody/no-such-model"], None, ["--model nobody/no-such-model", "not in the local", "cache"]),
        (["--out", tmp / "afile"], None, ["--out", "is a file"]),
        (["--baseline", "lora-merge", "--style-scale", "0.5"], None, ["--style-scale", "only for B4M", "lora-merge"]),
        (["--baseline", "lora-merge", "--no-mcp"], None, ["--no-mcp", "only for B4M", "lora-merge"]),
        (["--baseline", "lora-merge", "--prior-scale", "0.5"], None, ["--prior-scale", "only for B4M"]),
        (["--prior-scale", "0"], None, ["--prior-scale", "must be > 0, got 0"]),
        (["--style-lr", "-1"], None, ["--style-lr", "must be > 0, got -1"]),
        (["--bogus"], None, ["unrecognized arguments: --bogus"]),
        ([], latin1, ["--content", "prompt.txt: not UTF-8 text"]),
        (["--max-grad-norm", "-1"], None, ["--max-grad-norm", "must be >= 0"]),
        (["--checkpoint-every", "-1"], None, ["--checkpoint-every", "must be >= 0"]),
        (["--sample-resolution", "30"], None, ["--sample-resolution", "multiple of 8"]),
    ]


def test_bad_inputs_one_line_exit_2_before_any_model_loads(tmp_path, capsys, no_model_load, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cases = bad_inputs(tmp_path)
    for extra, content, words in cases:
        argv = ["--content", content or EXAMPLES / "content", "--style", EXAMPLES / "style", "--model", "tiny",
                "--out", tmp_path / "out", *extra]
        code, err = run_b4m(argv, capsys)
        last = err.strip().splitlines()[-1]
        assert code == 2 and last.startswith("b4m: error: "), (extra, err)
        assert all(w in last for w in map(str, words)), (words, last)
        assert not (tmp_path / "out").exists()
    assert len(cases) == 36


def test_corrupt_images_are_named_and_skipped(tmp_path, capsys):
    folder = tmp_path / "content"
    shutil.copytree(EXAMPLES / "content", folder)
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.JPG").write_text("not an image")
    (folder / "half.png").write_bytes((EXAMPLES / "content" / "bear_0.png").read_bytes()[:200])
    pixels, prompt = b4m.load_image_set(folder, 64)
    assert pixels.shape == (4, 3, 64, 64) and prompt == "a photo of snq teddybear"
    err = capsys.readouterr().err
    for name in ("zero.png", "text.JPG", "half.png"):
        assert f"warning: skipping {folder / name}" in err


def test_a_prompt_file_with_a_byte_order_mark_is_read_without_it(tmp_path):
    folder = tmp_path / "content"
    shutil.copytree(EXAMPLES / "content", folder)
    (folder / "prompt.txt").write_bytes("a photo of snq poupée\r\n".encode("utf-8-sig"))  # as Notepad saves it
    assert b4m.load_image_set(folder, 64)[1] == "a photo of snq poupée"


def test_rank_too_large_for_the_model_is_refused_before_loading(tmp_path, capsys, no_model_load):
    b4m.tiny_pipeline("sd").save_pretrained(tmp_path / "model")
    code, err = run_b4m(["--content", EXAMPLES / "content", "--style", EXAMPLES / "style", "--model",
                         tmp_path / "model", "--rank", "49", "--out", tmp_path / "out"], capsys)
    assert code == 2 and "--rank 49: this model's smallest attention projection allows at most 48" in err


def test_bad_input_as_a_subprocess_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "b4m.py", "--content", str(tmp_path / "nope"), "--style", "examples/style",
                        "--model", "tiny"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"b4m: error: --content {tmp_path / 'nope'}: no such folder; pass a folder of images"


def unusual_images(folder):
    """Every odd-but-valid image a hand-collected folder holds."""
    from PIL import Image

    folder.mkdir()
    rgb = Image.open(EXAMPLES / "content" / "bear_0.png").convert("RGB")
    rgb.convert("RGBA").save(folder / "rgba.png")
    rgb.convert("LA").save(folder / "la.png")
    rgb.convert("P").save(folder / "palette.gif")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    rgb.convert("L").save(folder / "gray.bmp")
    Image.new("I;16", (40, 30), 30000).save(folder / "gray16.png")
    rgb.save(folder / "upper.PNG")
    rgb.save(folder / "photo.webp")
    rgb.resize((1000, 100)).save(folder / "very wide.png")
    rgb.resize((4000, 3000)).save(folder / "large.jpg", quality=80)
    rgb.save(folder / "ünïcødé 名前.jpeg")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 clockwise to display
    half = Image.new("RGB", (80, 40), "red")
    half.paste(Image.new("RGB", (40, 40), "blue"), (40, 0))
    half.save(folder / "rotated.jpg", exif=exif.tobytes())
    (folder / "prompt.txt").write_text("a photo of snq teddybear\n")


def test_unusual_images_load_correctly(tmp_path):
    unusual_images(tmp_path / "odd")
    for path in sorted((tmp_path / "odd").iterdir()):
        if path.suffix.lower() != ".txt":
            img = b4m.open_image(path, 32)
            assert img.mode == "RGB" and img.size == (32, 32), path
    assert b4m.open_image(tmp_path / "odd" / "gray16.png", 8).getpixel((4, 4)) == (117, 117, 117)  # 30000 / 256
    from PIL import Image

    transparent = tmp_path / "clear.png"
    Image.new("RGBA", (16, 16), (255, 0, 0, 0)).save(transparent)
    assert b4m.open_image(transparent, 8).getpixel((4, 4)) == (255, 255, 255)
    rotated = b4m.open_image(tmp_path / "odd" / "rotated.jpg", 40)  # upright: red on top, blue below
    top, bottom = rotated.getpixel((20, 5)), rotated.getpixel((20, 35))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]


def test_unusual_images_train_end_to_end(tmp_path, capsys):
    unusual_images(tmp_path / "odd")
    code, err = run_b4m(["--content", tmp_path / "odd", "--style", EXAMPLES / "style", "--model", "tiny",
                         "--out", tmp_path / "run", *FAST, "--steps", "1", "--make-steps", "0"], capsys)
    assert code == 0 and "warning" not in err, err
    assert (tmp_path / "run" / "b4m" / b4m.WEIGHTS).is_file()


# Never lose work -----------------------------------------------------------------------------------

def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_second_run_is_refused_and_leaves_the_first_intact(sd_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(sd_run, out)
    before = snapshot(out)
    code, err = run_b4m(["--content", EXAMPLES / "content", "--style", EXAMPLES / "style", "--model", "tiny",
                         "--out", out, *FAST], capsys)
    assert code == 2 and "already holds a run; pass --resume to continue it, --overwrite to replace it" in err
    assert snapshot(out) == before


def test_resume_keeps_finished_stages_and_refuses_other_settings(sd_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(sd_run, out)
    kept = {s: (out / s / b4m.WEIGHTS).read_bytes() for s in ("content", "style")}
    made = (out / "b4m" / b4m.WEIGHTS).read_bytes()
    (out / "b4m" / b4m.WEIGHTS).unlink()
    argv = ["--content", EXAMPLES / "content", "--style", EXAMPLES / "style", "--model", "tiny", "--out", out,
            *FAST, "--steps", "3", "--num-samples", "2", "--resume"]
    code, err = run_b4m([*argv, "--rank", "2"], capsys)
    assert code == 2 and "--resume: settings differ from the run" in err and "rank (was 4, now 2)" in err
    code, err = run_b4m([*argv, "--max-grad-norm", "0"], capsys)
    assert code == 2 and "max_grad_norm (was 1.0, now 0.0)" in err
    code, err = run_b4m(argv, capsys)
    assert code == 0, err
    assert "content: kept" in err and "style: kept" in err and "make:" in err
    assert {s: (out / s / b4m.WEIGHTS).read_bytes() for s in ("content", "style")} == kept
    assert (out / "b4m" / b4m.WEIGHTS).read_bytes() == made  # the same make, redone
    assert (out / "losses.csv").read_text() == (sd_run / "losses.csv").read_text()
    assert set(json.loads((out / "report.json").read_text())["seconds"]) == {"content", "style", "b4m"}


def test_style_lr_is_the_style_stages_and_resume_redoes_only_what_it_changes(sd_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(sd_run, out)
    content = (out / "content" / b4m.WEIGHTS).read_bytes()
    style = load(out / "style" / b4m.WEIGHTS)
    argv = ["--content", EXAMPLES / "content", "--style", EXAMPLES / "style", "--model", "tiny", "--out", out,
            *FAST, "--steps", "3", "--num-samples", "2", "--resume", "--style-lr", "1e-2"]
    code, err = run_b4m(argv, capsys)
    assert code == 0, err
    # the content stage does not depend on the style stage's lr; the style stage and make do
    assert "content: kept" in err and "style: kept" not in err
    assert (out / "content" / b4m.WEIGHTS).read_bytes() == content
    new = load(out / "style" / b4m.WEIGHTS)
    assert any(not torch.equal(new[k], style[k]) for k in style)
    settings = json.loads((out / "config.json").read_text())["settings"]
    assert (settings["lr"], settings["style_lr"]) == (1e-4, 1e-2)
    assert json.loads((sd_run / "config.json").read_text())["settings"]["style_lr"] == 1e-4  # default: --lr


def test_prior_scale_in_a_run_scales_the_saved_scaffold(sd_run, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_b4m(["--content", EXAMPLES / "content", "--style", EXAMPLES / "style", "--model", "tiny",
                         "--out", out, *FAST, "--steps", "3", "--num-samples", "2", "--prior-scale", "0.5"], capsys)
    assert code == 0, err
    for stage in ("content", "style", "b4m"):
        ours, ref = load(out / stage / b4m.WEIGHTS), load(sd_run / stage / b4m.WEIGHTS)
        for key in (k for k in ours if k.endswith("lora_B.weight")):  # U = [A; B]
            m_f = ours[key].shape[0] // 2
            assert torch.equal(ours[key][:m_f], 0.5 * ref[key][:m_f]), (stage, key)  # A, frozen
    code, err = run_b4m(["--content", EXAMPLES / "content", "--style", EXAMPLES / "style", "--model", "tiny",
                         "--out", out, *FAST, "--steps", "3", "--num-samples", "2", "--resume"], capsys)
    assert code == 2 and "prior_scale (was 0.5, now 1.0)" in err


def test_overwrite_replaces_a_run(sd_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(sd_run, out)
    code, err = run_b4m(["--content", EXAMPLES / "content", "--style", EXAMPLES / "style", "--model", "tiny",
                         "--out", out, *FAST, "--seed", "1", "--overwrite"], capsys)
    assert code == 0, err
    assert (out / "b4m" / b4m.WEIGHTS).read_bytes() != (sd_run / "b4m" / b4m.WEIGHTS).read_bytes()
    # An overwriting run that stops early leaves none of the old run's adapters for --resume to keep.
    shutil.rmtree(out)
    shutil.copytree(sd_run, out)
    code, err = run_b4m(["--content", EXAMPLES / "content", "--style", EXAMPLES / "style", "--model", "tiny",
                         "--out", out, *FAST, "--lr", "1e30", "--overwrite"], capsys)
    assert code == 2 and "content stage, step 2: the loss is not finite" in err
    assert sorted(p.name for p in out.rglob("*.safetensors")) == []


def test_a_failed_write_names_the_path_and_leaves_nothing_half_written(tmp_path, capsys, monkeypatch):
    """No space left while the style adapter is written: one line naming the file and the cause;
    the content stage's files intact, no temporary file anywhere, no style adapter."""
    import errno
    import os

    fsync = os.fsync

    def full_disk(fd):
        if "/style/" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)
    monkeypatch.setattr(os, "fsync", full_disk)
    out = tmp_path / "run"
    code, err = run_b4m(["--content", EXAMPLES / "content", "--style", EXAMPLES / "style", "--model", "tiny",
                         "--out", out, *FAST], capsys)
    assert code == 2
    assert err.strip().splitlines()[-1] == (f"b4m: error: {out / 'style' / 'style_kohya.safetensors'}: cannot write (No space left "
                                            f"on device); free some space or write elsewhere")
    assert sorted(p.name for p in (out / "content").iterdir()) == ["content_kohya.safetensors", b4m.WEIGHTS]
    b4m.load_lora(out / "content" / b4m.WEIGHTS, tiny_unet(), "unet", {"stage": "content"})
    assert [p.name for p in out.rglob("*") if ".tmp" in p.name] == [] and not (out / "style" / b4m.WEIGHTS).exists()


def test_outputs_get_the_umask_permissions(tmp_path, capsys):
    import os
    import stat

    old = os.umask(0o027)
    try:
        code, err = run_b4m(["--content", EXAMPLES / "content", "--style", EXAMPLES / "style", "--model", "tiny",
                             "--out", tmp_path / "run", *FAST], capsys)
    finally:
        os.umask(old)
    assert code == 0, err
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert len(files) == 13 and {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o640}


# Checkpoints: a run killed anywhere and resumed ends byte-identical to one never stopped ----------

RESUMABLE = ["--steps", "24", "--make-steps", "12", "--checkpoint-every", "4", "--grad-accum", "4",
             "--sample-steps", "2", "--num-samples", "1"]
KILLER = """
import os, signal, sys
import b4m
stage, at, where = sys.argv[1], int(sys.argv[2]), sys.argv[3]
after_step, fsync, now = b4m.CheckpointedLoop.after_step, os.fsync, []

def killing_after_step(loop, step, *a):
    now[:] = [loop.stage, step]
    if where == "step" and now == [stage, at]:
        os.kill(os.getpid(), signal.SIGKILL)
    after_step(loop, step, *a)

def killing_fsync(fd):  # half of the checkpoint written, then killed before the rename
    if where == "write" and now == [stage, at] and ".checkpoint.pt.tmp" in os.readlink(f"/proc/self/fd/{fd}"):
        os.ftruncate(fd, os.fstat(fd).st_size // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    fsync(fd)

b4m.CheckpointedLoop.after_step, os.fsync = killing_after_step, killing_fsync
sys.exit(b4m.main(sys.argv[4:]))
"""


@pytest.fixture(scope="module")
def never_stopped(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert b4m.main(["--content", str(EXAMPLES / "content"), "--style", str(EXAMPLES / "style"), "--model", "tiny",
                     "--out", str(out), *RESUMABLE]) == 0
    return out


def outputs(out):
    names = [f"{s}/{n}" for s in ("content", "style", "b4m") for n in (b4m.WEIGHTS, f"{s}_kohya.safetensors")]
    return {n: (out / n).read_bytes() for n in names + ["losses.csv", "samples/grid.png"]}


def test_killed_in_every_stage_and_mid_checkpoint_write_resumes_byte_identical(never_stopped, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--content", EXAMPLES / "content", "--style", EXAMPLES / "style", "--model", "tiny", "--out", out, *RESUMABLE]
    for stage, at, where, checkpoint_step in [("content", 11, "step", 8), ("style", 3, "step", None),
                                              ("style", 9, "step", 8), ("make", 8, "write", 4)]:
        r = subprocess.run([sys.executable, "-c", KILLER, stage, str(at), where, *map(str, argv), "--resume"],
                           cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == -9, r.stderr
        path = out / b4m.NAMES[stage] / b4m.CHECKPOINT
        assert (torch.load(path, weights_only=True)["step"] if path.exists() else None) == checkpoint_step
    assert [p.name for p in (out / "b4m").iterdir() if ".tmp" in p.name]  # the half-written checkpoint
    code, err = run_b4m([*argv, "--resume"], capsys)
    assert code == 0, err
    assert "content: kept" in err and "style: kept" in err and "make: continuing from step 4" in err
    assert outputs(out) == outputs(never_stopped)
    assert [p for p in out.rglob("*") if ".tmp" in p.name or p.name == b4m.CHECKPOINT] == []


def start_and_signal(argv, sig, stage):
    p = subprocess.Popen([sys.executable, "b4m.py", *map(str, argv)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    seen = ""
    while f"{stage}:" not in seen or "loss=" not in seen.split(f"{stage}:")[-1]:  # the stage is training
        seen += p.stderr.read(1)
        assert p.poll() is None, seen
    p.send_signal(sig)
    return p.wait(timeout=60), seen + p.stderr.read()


def test_sigterm_and_ctrl_c_stop_in_a_checkpoint_and_resume_byte_identical(never_stopped, tmp_path, capsys):
    import signal

    out = tmp_path / "run"
    argv = ["--content", EXAMPLES / "content", "--style", EXAMPLES / "style", "--model", "tiny", "--out", out, *RESUMABLE]
    for stage, sig, code in [("content", signal.SIGTERM, 143), ("style", signal.SIGINT, 130)]:
        returncode, err = start_and_signal(argv + ["--resume"], sig, stage)
        path = out / stage / b4m.CHECKPOINT
        step = torch.load(path, weights_only=True)["step"]
        assert returncode == code and "Traceback" not in err, err
        assert err.strip().splitlines()[-1] == (f"b4m: stopped in the {stage} stage after step {step}, saved in "
                                                f"{path}; run the same command with --resume to continue from there")
        assert 0 < step < 24
    code, err = run_b4m([*argv, "--resume"], capsys)
    assert code == 0, err
    assert outputs(out) == outputs(never_stopped)


def test_non_finite_loss_stops_and_keeps_saved_stages(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_b4m(["--content", EXAMPLES / "content", "--style", EXAMPLES / "style", "--model", "tiny",
                         "--out", out, *FAST, "--make-steps", "5", "--make-lr", "1e30"], capsys)
    assert code == 2
    assert "make stage, step 2: the loss is not finite" in err.strip().splitlines()[-1]
    assert (out / "content" / b4m.WEIGHTS).is_file() and (out / "style" / b4m.WEIGHTS).is_file()
    assert not (out / "b4m" / b4m.WEIGHTS).exists()


def test_adapters_for_another_model_rank_or_method_are_refused(sd_run, tmp_path, capsys):
    made = load(sd_run / "b4m" / b4m.WEIGHTS)
    first = sorted(made)[0]
    for name, sd, meta, words in [
        ("rank", b4m.lora_state_dict(b4m.add_plp(tiny_unet(), 2, 0)), {"rank": 2}, ["made with rank=2", "rank=4"]),
        ("method", made, {"method": "lora-merge"}, ["made with method=lora-merge"]),
        ("extra", {**made, "unet.up_blocks.9.to_q.lora_A.weight": torch.zeros(4, 64)}, {},
         ["has an unknown key unet.up_blocks.9.to_q.lora_A.weight", "another model"]),
        ("missing", {k: v for k, v in made.items() if k != first}, {}, [f"has no key {first}", "another model"]),
        ("shape", {k: torch.zeros(4, 7) if "lora_A" in k else v for k, v in made.items()},
         {}, ["V (4, 7)", "another model"]),
    ]:
        out = tmp_path / name
        shutil.copytree(sd_run, out)
        stored = b4m.adapter_metadata(argparse.Namespace(**json.loads((out / "config.json").read_text())["settings"]), "make")
        b4m.save_lora(out / "b4m", sd, {**stored, **meta})
        code, err = run_b4m(["sample", "--run", out], capsys)
        assert code == 2 and all(w in err.splitlines()[-1] for w in words), (name, err)


def test_same_seed_same_machine_gives_bit_identical_files(sd_run, tmp_path, capsys):
    out = tmp_path / "again"
    code, err = run_b4m(["--content", EXAMPLES / "content", "--style", EXAMPLES / "style", "--model", "tiny",
                         "--out", out, *FAST, "--steps", "3", "--num-samples", "2"], capsys)
    assert code == 0, err
    for stage in ("content", "style", "b4m"):
        assert (out / stage / b4m.WEIGHTS).read_bytes() == (sd_run / stage / b4m.WEIGHTS).read_bytes()


# Beyond the paper: strengths, instant make, drift report, ablations -----------------------------

def test_strengths_scale_the_learned_halves_only(sd_run):
    made = load(sd_run / "b4m" / b4m.WEIGHTS)
    zero = b4m.scale_made(made, 0.0, 0.0)
    for k in (k for k in made if k.endswith("lora_B.weight")):
        A, B, C, D = split(made, k)
        A0, B0, C0, D0 = split(zero, k)
        assert torch.equal(A0, A) and torch.equal(C0, C) and not B0.any() and not D0.any()
        dW = zero[k] @ zero[k.replace("lora_B", "lora_A")]  # dW = [[A C, 0], [0, 0]]
        m_f, n_f = A.shape[0], C.shape[1]
        assert torch.equal(dW[:m_f, :n_f], A @ C) and not dW[m_f:].any() and not dW[:, n_f:].any()
        A2, B2, C2, D2 = split(b4m.scale_made(made, 0.5, 1.5), k)
        assert torch.equal(B2, 1.5 * B) and torch.equal(D2, 0.5 * D)


def test_sample_exports_the_scaled_adapter_and_renders_the_scale_grid(sd_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(sd_run, run)
    report = (run / "report.json").read_bytes()
    code, err = run_b4m(["sample", "--run", run, "--content-scale", "0.5", "--style-scale", "1.5", "--export",
                         tmp_path / "export", "--scale-grid", "--num-samples", "1"], capsys)
    assert code == 0, err
    exported, meta = b4m.load_lora(tmp_path / "export" / b4m.WEIGHTS, tiny_unet(), "unet", {"stage": "b4m"})
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["b4m_kohya.safetensors", b4m.WEIGHTS]
    code, err = run_b4m(["sample", "--run", run, "--export", run / "b4m", "--content-scale", "0.5"], capsys)
    assert code == 2 and "a stage folder of the run, which it would overwrite" in err
    expected = b4m.scale_made(load(run / "b4m" / b4m.WEIGHTS), 0.5, 1.5)
    assert exported.keys() == expected.keys() and all(torch.equal(exported[k], expected[k]) for k in expected)
    assert meta["content_scale"] == 0.5 and meta["style_scale"] == 1.5
    from PIL import Image

    grid = Image.open(run / "samples" / "scale_grid.png")
    assert grid.size == (4 * 64, 4 * 64)
    cell = grid.crop((1 * 64, 3 * 64, 2 * 64, 4 * 64))  # column s_c = 0.5, row s_s = 1.5: this sample's scales
    assert cell.tobytes() == Image.open(run / "samples" / "b4m_0.png").convert("RGB").tobytes()
    assert (run / "report.json").read_bytes() == report  # only `sample --report` recomputes it
    code, err = run_b4m(["sample", "--run", run, "--report", "--num-samples", "1"], capsys)
    assert code == 0 and "drift" in err
    assert json.loads((run / "report.json").read_text())["drift"] == json.loads(report)["drift"]


def test_instant_make_is_exact_reassembly(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_b4m(["--content", EXAMPLES / "content", "--style", EXAMPLES / "style", "--model", "tiny",
                         "--out", out, *FAST, "--make-steps", "0"], capsys)
    assert code == 0, err
    content, style, made = (load(out / s / b4m.WEIGHTS) for s in ("content", "style", "b4m"))
    expected = b4m.reassemble(content, style)
    assert made.keys() == expected.keys() and all(torch.equal(made[k], expected[k]) for k in made)
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"drift", "effect", "seconds"} and set(report["seconds"]) == {"content", "style", "b4m"}
    assert all(set(report[k]) == {"content", "style", "b4m"} for k in ("drift", "effect"))


def test_drift_of_the_base_model_against_itself_is_zero(sd_run):
    pipe = b4m.load_pipeline("tiny", "cpu", torch.float32)
    made = load(sd_run / "b4m" / b4m.WEIGHTS)
    nothing = {k: torch.zeros_like(v) for k, v in made.items()}
    report = b4m.drift_report(pipe, {"base": nothing, "b4m": made}, {"base": "x", "b4m": "a snq object"}, 64, 0)
    assert report["drift"]["base"] == 0.0 and report["effect"]["base"] == 0.0
    assert report["drift"]["b4m"] > 0 and report["effect"]["b4m"] > 0
    again = b4m.drift_report(pipe, {"b4m": made}, {"b4m": "a snq object"}, 64, 0)
    assert again["drift"]["b4m"] == report["drift"]["b4m"]  # same latents, noise and timesteps


def ablation(tmp_path, capsys, *flags):
    out = tmp_path / "-".join(f.strip("-") for f in flags)
    code, err = run_b4m(["--content", EXAMPLES / "content", "--style", EXAMPLES / "style", "--model", "tiny",
                         "--out", out, *FAST, *flags], capsys)
    assert code == 0, err
    return [load(out / s / b4m.WEIGHTS) for s in ("content", "style", "b4m")]


def test_no_orth_prior_breaks_the_identity(tmp_path, capsys):
    made = ablation(tmp_path, capsys, "--no-orth-prior")[2]
    for k in (k for k in made if k.endswith("lora_B.weight")):
        A, _, C, _ = (t.double() for t in split(made, k))
        assert not torch.allclose(A.T @ A + C @ C.T, torch.eye(4, dtype=torch.float64), atol=1e-2)


def test_orth_prior_holds_in_the_saved_files(sd_run):
    made = load(sd_run / "b4m" / b4m.WEIGHTS)
    for k in (k for k in made if k.endswith("lora_B.weight")):
        A, _, C, _ = (t.double() for t in split(made, k))
        assert torch.allclose(A.T @ A + C @ C.T, torch.eye(4, dtype=torch.float64), atol=1e-6)


def test_no_mcp_leaves_the_other_half_at_its_initial_value(tmp_path, capsys):
    content, style, _ = ablation(tmp_path, capsys, "--no-mcp")
    init = b4m.lora_state_dict(b4m.add_plp(tiny_unet(), 4, 0))
    for k in (k for k in content if k.endswith("lora_B.weight")):
        assert not split(content, k)[1].any()  # content stage: B stays 0
        assert torch.equal(split(style, k)[3], split(init, k)[3])  # style stage: D stays at its draw
        assert not torch.equal(split(content, k)[3], split(init, k)[3])


def test_no_precondition_changes_only_make(sd_run, tmp_path, capsys):
    flags = ["--steps", "3", "--num-samples", "2"]
    content, style, made = ablation(tmp_path, capsys, "--no-precondition", *flags)
    for s, sd in (("content", content), ("style", style)):
        assert all(torch.equal(sd[k], v) for k, v in load(sd_run / s / b4m.WEIGHTS).items())
    ours = load(sd_run / "b4m" / b4m.WEIGHTS)
    assert any(not torch.equal(made[k], ours[k]) for k in made)


def test_lora_merge_baseline_is_the_sum_of_two_loras(tmp_path, capsys):
    content, style, made = ablation(tmp_path, capsys, "--baseline", "lora-merge")
    pipe = b4m.tiny_pipeline("sd")
    args, kwargs = unet_inputs(pipe)
    with torch.no_grad():
        for k in (k for k in made if k.endswith("lora_B.weight")):
            down = k.replace("lora_B", "lora_A")
            assert made[k].shape[1] == 8 and content[k].shape[1] == 4
            assert torch.allclose(made[k] @ made[down], content[k] @ content[down] + style[k] @ style[down], atol=1e-6)
        base = pipe.unet(*args, **kwargs).sample
        pipe.load_lora_weights(str(tmp_path / "baseline-lora-merge" / "b4m"))  # loads as a rank-8 LoRA
        assert not torch.allclose(pipe.unet(*args, **kwargs).sample, base, atol=1e-6)


# examples/evaluate.py: CLIP metrics of a run, on a tiny random CLIP saved to a folder (offline) ---

def tiny_clip(folder):
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    tokenizer = b4m.tiny_pipeline("sd").tokenizer
    layers = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2)
    config = CLIPConfig(
        text_config=dict(**layers, vocab_size=len(tokenizer), max_position_embeddings=77,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(**layers, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def fake_run(folder, samples=2, resolution=64):
    """A run folder as far as evaluate.py reads it, without training."""
    from PIL import Image

    settings = dict(content=str(EXAMPLES / "content"), style=str(EXAMPLES / "style"),
                    prompt="a snq object in w@z style", resolution=resolution)
    (folder / "samples").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"settings": settings, "versions": {}}))
    g = torch.Generator().manual_seed(1)
    for i in range(samples):
        pixels = torch.randint(0, 256, (resolution * resolution * 3,), generator=g, dtype=torch.uint8)
        Image.frombytes("RGB", (resolution, resolution), bytes(pixels.tolist())).save(folder / "samples" / f"b4m_{i}.png")
    return folder


def test_evaluate_metrics_equal_a_computation_by_hand(tmp_path):
    from PIL import Image
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    clip, run = tiny_clip(tmp_path / "clip"), fake_run(tmp_path / "run")
    done = subprocess.run([sys.executable, "examples/evaluate.py", str(run), "--clip", str(clip)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert sorted(metrics) == ["clip_i", "clip_t", "style_sim"]
    assert str(run) in done.stdout and f"{metrics['clip_t']:.4f}" in done.stdout
    # By hand, through CLIPModel.forward (unit image_embeds/text_embeds), not get_*_features.
    model = CLIPModel.from_pretrained(clip).eval()
    processor, tokenizer = CLIPImageProcessorPil.from_pretrained(clip), CLIPTokenizer.from_pretrained(clip)
    samples = [Image.open(p).convert("RGB") for p in sorted((run / "samples").glob("b4m_*.png"))]
    refs = {k: [b4m.open_image(p, 64) for p in sorted((EXAMPLES / k).glob("*.png"))] for k in ("content", "style")}
    with torch.no_grad():
        def embeds(images, text="x"):
            return model(**tokenizer([text], return_tensors="pt"), **processor(images=images, return_tensors="pt"))

        out = embeds(samples, "a snq object in w@z style")
        s = out.image_embeds
        expect = {"clip_t": (s @ out.text_embeds.T).mean().item(),
                  "clip_i": (s @ embeds(refs["content"]).image_embeds.T).mean().item(),
                  "style_sim": (s @ embeds(refs["style"]).image_embeds.T).mean().item()}
    assert len(samples) == 2 and len(refs["content"]) == len(refs["style"]) == 4
    for key, value in expect.items():
        assert abs(metrics[key] - value) < 1e-5, (key, metrics[key], value)


def test_evaluate_bad_input(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate", EXAMPLES / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    clip = tiny_clip(tmp_path / "clip")
    no_samples = fake_run(tmp_path / "no_samples", samples=0)
    no_config = fake_run(tmp_path / "no_config")
    (no_config / "config.json").unlink()
    for argv, words in [([no_samples, "--clip", clip], ["no_samples", "b4m_*.png"]),
                        ([no_config, "--clip", clip], ["no_config", "config.json"]),
                        ([fake_run(tmp_path / "good"), "--clip", tmp_path / "no_clip"], ["--clip", "no_clip"])]:
        assert evaluate.main([str(a) for a in argv]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("evaluate.py: error: ") and all(w in last for w in words), last
    assert not any(tmp_path.glob("*/metrics.json"))


def test_load_in_diffusers_example(sd_run, tmp_path):
    from PIL import Image

    r = subprocess.run([sys.executable, "examples/load_in_diffusers.py", "--lora", str(sd_run / "b4m"), "--model",
                        "tiny", "--steps", "2", "--out", str(tmp_path / "x.png")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "x.png").size == (64, 64)


def test_gradient_checkpointing_and_bf16(tmp_path, capsys):
    plain = ablation(tmp_path, capsys, "--steps", "1", "--make-steps", "1")
    checkpointed = ablation(tmp_path, capsys, "--steps", "1", "--make-steps", "1", "--gradient-checkpointing")
    for a, b in zip(plain, checkpointed):  # recomputation, not approximation
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    half = ablation(tmp_path, capsys, "--steps", "1", "--make-steps", "1", "--dtype", "bf16")
    assert all(v.dtype == torch.float32 for sd in half for v in sd.values())  # adapters stay fp32


# SD3 and FLUX: the flow-matching transformers, saved and loaded back as folders ---------------

FLOW = ["--steps", "4", "--make-steps", "2", "--checkpoint-every", "2", "--grad-accum", "1", "--sample-steps", "2",
        "--num-samples", "1", "--resolution", "64", "--rank", "4"]
# Every attention projection of the tiny transformers: SD3's 2 joint blocks (the last one is
# context_pre_only: no to_add_out), FLUX's joint block and its single block (to_q/k/v only).
FLOW_LAYERS = {
    "sd3": [f"transformer_blocks.{b}.attn.{m}" for b in (0, 1) for m in
            ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")][:-1],
    "flux": [f"transformer_blocks.0.attn.{m}" for m in
             ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")]
            + [f"single_transformer_blocks.0.attn.{m}" for m in ("to_q", "to_k", "to_v")]}


@pytest.fixture(scope="session", params=["sd3", "flux"])
def flow_run(request, tmp_path_factory):
    """(family, a tiny pipeline saved with save_pretrained, a finished run on it via --model FOLDER)."""
    kind, tmp = request.param, tmp_path_factory.mktemp(request.param)
    b4m.tiny_pipeline(kind).save_pretrained(tmp / "model")
    out = tmp / "run"
    argv = ["--content", EXAMPLES / "content", "--style", EXAMPLES / "style", "--model", tmp / "model",
            "--out", out, *FLOW, "--sample-resolution", "64"]
    assert b4m.main([str(a) for a in argv]) == 0
    return kind, tmp / "model", out, argv


def test_flow_models_adapt_every_attention_projection_in_the_transformer_layout(flow_run):
    kind, model, out, _ = flow_run
    for stage in ("content", "style", "b4m"):
        assert sorted(p.name for p in (out / stage).iterdir()) == [b4m.WEIGHTS]  # no kohya file
        sd = load(out / stage / b4m.WEIGHTS)
        assert sorted(sd) == sorted(f"transformer.{m}.lora_{x}.weight" for m in FLOW_LAYERS[kind] for x in "AB")
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model)
    linears = [n for n, m in pipe.transformer.named_modules() if isinstance(m, nn.Linear)]
    assert sorted(n for n in linears if b4m.is_target(n, pipe.transformer.get_submodule(n))) == sorted(FLOW_LAYERS[kind])
    from safetensors import safe_open

    with safe_open(str(out / "b4m" / b4m.WEIGHTS), "pt") as f:
        assert json.loads(f.metadata()["b4m"])["base_model"] == str(model)


def test_flow_models_load_in_diffusers_and_fuse_to_W0_plus_U_V(flow_run):
    kind, model, out, _ = flow_run
    from diffusers import DiffusionPipeline

    made = load(out / "b4m" / b4m.WEIGHTS)
    pipe = DiffusionPipeline.from_pretrained(model)
    W0 = {n: pipe.transformer.get_submodule(n).weight.detach().clone() for n in FLOW_LAYERS[kind]}
    pipe.load_lora_weights(str(out / "b4m"))  # the path any diffusers user takes
    pipe.fuse_lora()
    for n in FLOW_LAYERS[kind]:
        U, V = made[f"transformer.{n}.lora_B.weight"], made[f"transformer.{n}.lora_A.weight"]
        fused = pipe.transformer.get_submodule(n).base_layer.weight
        assert torch.allclose(fused, W0[n] + U @ V, atol=1e-6, rtol=0), n


def test_flow_models_make_starts_from_the_halves_and_a_layer_without_gradient_keeps_its_values(flow_run, capsys):
    kind, model, out, argv = flow_run
    content, style, made = (load(out / s / b4m.WEIGHTS) for s in ("content", "style", "b4m"))
    init = b4m.lora_state_dict(b4m.add_plp(b4m.load_pipeline(str(model), "cpu", torch.float32).transformer, 4, 0),
                               "transformer")
    for k in (k for k in made if k.endswith("lora_B.weight")):
        for sd in (content, style, made):
            assert torch.equal(split(sd, k)[0], split(init, k)[0]) and torch.equal(split(sd, k)[2], split(init, k)[2])
    if kind == "sd3":  # the last block is context_pre_only: its text queries do not reach the loss
        k = "transformer.transformer_blocks.1.attn.add_q_proj.lora_B.weight"
        for sd in (content, style, made):
            assert all(torch.equal(a, b) for a, b in zip(split(sd, k), split(init, k)))
    code, err = run_b4m([*argv[:-2], "--sample-resolution", "64", "--out", out.parent / "instant", "--make-steps", "0"],
                        capsys)
    assert code == 0, err
    c, s_, m = (load(out.parent / "instant" / s / b4m.WEIGHTS) for s in ("content", "style", "b4m"))
    expected = b4m.reassemble(c, s_)
    assert m.keys() == expected.keys() and all(torch.equal(m[k], expected[k]) for k in m)


def test_flow_models_no_mcp_leaves_B_exactly_zero_and_the_baseline_merges_peft_loras(flow_run, capsys):
    kind, model, out, argv = flow_run
    code, err = run_b4m([*argv, "--out", out.parent / "no-mcp", "--no-mcp", "--make-steps", "0"], capsys)
    assert code == 0, err
    content = load(out.parent / "no-mcp" / "content" / b4m.WEIGHTS)
    for k in (k for k in content if k.endswith("lora_B.weight")):
        assert not split(content, k)[1].any()
    code, err = run_b4m([*argv, "--out", out.parent / "merge", "--baseline", "lora-merge"], capsys)
    assert code == 0, err
    c, s_, merged = (load(out.parent / "merge" / s / b4m.WEIGHTS) for s in ("content", "style", "b4m"))
    assert sorted(merged) == sorted(f"transformer.{m}.lora_{x}.weight" for m in FLOW_LAYERS[kind] for x in "AB")
    for k in (k for k in merged if k.endswith("lora_B.weight")):  # peft on the same modules, summed: rank 8
        v = k.replace("lora_B", "lora_A")
        assert merged[k].shape[1] == 8 and torch.allclose(merged[k] @ merged[v], c[k] @ c[v] + s_[k] @ s_[v], atol=1e-6)
    report = json.loads((out / "report.json").read_text())  # the drift report of the B4M run
    assert all(report[key][name] > 0 for key in ("drift", "effect") for name in ("content", "style", "b4m"))


def test_flow_models_killed_mid_stage_resume_byte_identical_and_sample_and_export(flow_run, tmp_path, capsys):
    kind, model, out, argv = flow_run
    again = [*argv, "--out", tmp_path / "run", "--resume"]
    r = subprocess.run([sys.executable, "-c", KILLER, "style", "3", "step", *map(str, again)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == -9, r.stderr
    assert torch.load(tmp_path / "run" / "style" / b4m.CHECKPOINT, weights_only=True)["step"] == 2
    code, err = run_b4m(again, capsys)
    assert code == 0 and "style: continuing from step 2" in err, err
    names = [f"{s}/{b4m.WEIGHTS}" for s in ("content", "style", "b4m")] + ["losses.csv", "samples/grid.png"]
    assert all((tmp_path / "run" / n).read_bytes() == (out / n).read_bytes() for n in names)
    code, err = run_b4m(["sample", "--run", tmp_path / "run", "--export", tmp_path / "export", "--style-scale", "0.5"],
                        capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == [b4m.WEIGHTS]
    exported = load(tmp_path / "export" / b4m.WEIGHTS)
    expected = b4m.scale_made(load(out / "b4m" / b4m.WEIGHTS), 1.0, 0.5)
    assert all(torch.equal(exported[k], expected[k]) for k in expected)
    assert (tmp_path / "run" / "samples" / "b4m_0.png").is_file()


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_flow_matching_loss_equals_a_hand_computation(kind):
    """One batch: u from the density, sigma and t from the training scheduler at u T,
    x_t = (1 - sigma) x0 + sigma eps, target eps - x0, the transformer called as the diffusers
    scripts call it (FLUX: packed latents, ids, t / 1000, guidance 3.5)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    pipe = b4m.tiny_pipeline(kind)
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    data = b4m.encode_set(pipe, *b4m.load_image_set(EXAMPLES / "content", 64))
    loss = b4m.training_loss(pipe, 2, 3.5)
    assert loss.keywords == {"density": "uniform" if kind == "flux" else "logit_normal",
                             "flux": kind == "flux", "guidance": 3.5 if kind == "flux" else None}
    got = loss([data], torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    i = torch.randint(4, (2,), generator=g)
    x0 = data["mean"][i] + data["std"][i] * torch.randn(data["mean"][i].shape, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    u = torch.rand(2, generator=g) if kind == "flux" else torch.sigmoid(torch.normal(0.0, 1.0, (2,), generator=g))
    index = (u * 1000).long()
    sigma, t = sched.sigmas[index].view(-1, 1, 1, 1), sched.timesteps[index]
    x_t = (1 - sigma) * x0 + sigma * eps
    text = {"encoder_hidden_states": data["cond"]["encoder_hidden_states"].expand(2, -1, -1),
            "pooled_projections": data["cond"]["pooled_projections"].expand(2, -1)}
    with torch.no_grad():
        if kind == "sd3":
            v = pipe.transformer(hidden_states=x_t, timestep=t, **text).sample
        else:
            packed = FluxPipeline._pack_latents(x_t, 2, 4, 8, 8)
            ids = FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32)
            v = pipe.transformer(hidden_states=packed, timestep=t / 1000, guidance=torch.full((2,), 3.5),
                                 txt_ids=torch.zeros(text["encoder_hidden_states"].shape[1], 3), img_ids=ids,
                                 **text).sample
            v = FluxPipeline._unpack_latents(v, 64, 64, 8)
    expected = ((v - (eps - x0)) ** 2).mean()
    assert data["mean"].shape == (4, 4, 8, 8) and got.shape == (1,)
    assert torch.allclose(got[0], expected, atol=1e-6, rtol=1e-5), (got, expected)
    # latents are (z - shift) * scale: the VAE's own factors
    with torch.no_grad():
        dist = pipe.vae.encode(b4m.load_image_set(EXAMPLES / "content", 64)[0]).latent_dist
    assert torch.equal(data["mean"], (dist.mean - 0.0609) * 1.5035)
    assert torch.equal(data["std"], dist.std * 1.5035)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_flow_models_refuse_an_impossible_rank_before_loading_and_a_size_they_cannot_patch(tmp_path, capsys,
                                                                                          monkeypatch, kind):
    b4m.tiny_pipeline(kind).save_pretrained(tmp_path / "model")
    argv = ["--content", EXAMPLES / "content", "--style", EXAMPLES / "style", "--model", tmp_path / "model",
            "--out", tmp_path / "out"]
    load_pipeline = b4m.load_pipeline
    monkeypatch.setattr(b4m, "load_pipeline", lambda *a: pytest.fail("a model was loaded before the rank check"))
    code, err = run_b4m([*argv, "--rank", "33"], capsys)
    assert code == 2 and err.strip().splitlines()[-1] == (
        "b4m: error: --rank 33: this model's smallest attention projection allows at most 32")
    monkeypatch.setattr(b4m, "load_pipeline", load_pipeline)
    for flag in ("--resolution", "--sample-resolution"):  # the VAE's 8 x 2 x 2 patches: multiples of 16
        code, err = run_b4m([*argv, "--rank", "4", flag, "72"], capsys)
        assert code == 2 and err.strip().splitlines()[-1] == f"b4m: error: {flag} 72: this model needs a multiple of 16"
    assert not (tmp_path / "out").exists()


# Cost: what runs inside the training loop ----------------------------------------------------------

@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_training_loop_runs_only_the_unet_two_forwards_per_break_step(tmp_path, capsys, monkeypatch, model):
    calls, in_loop = [], [False]
    load_pipeline, real_loop = b4m.load_pipeline, b4m.CheckpointedLoop.__call__

    def counting_pipeline(*a, **k):
        pipe = load_pipeline(*a, **k)
        parts = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": getattr(pipe, "text_encoder_2", None),
                 "vae_encoder": pipe.vae.encoder}
        for name, module in parts.items():
            if module is not None:
                module.register_forward_pre_hook(lambda m, a, name=name: calls.append((name, in_loop[0], len(a[0]))))
        return pipe

    def marked_loop(*a, **k):
        in_loop[0] = True
        try:
            return real_loop(*a, **k)
        finally:
            in_loop[0] = False

    monkeypatch.setattr(b4m, "load_pipeline", counting_pipeline)
    monkeypatch.setattr(b4m.CheckpointedLoop, "__call__", marked_loop)
    code, err = run_b4m(["--content", EXAMPLES / "content", "--style", EXAMPLES / "style", "--model", model,
                         "--out", tmp_path / "run", *FAST, "--steps", "3", "--grad-accum", "2", "--batch-size", "2",
                         "--aux-style", EXAMPLES / "style", EXAMPLES / "content", "--make-steps", "2"], capsys)
    assert code == 0, err
    loop = [c for c in calls if c[1]]
    assert {name for name, _, _ in loop} == {"unet"}  # no VAE or text encoder work in the loop
    # content: 3 steps x 2 micro-steps x (1 main forward of 2 + 1 forward of both aux sets, 2 x 2);
    # style: the same with its single default aux set; make: 2 x 2 forwards of content + style (2 + 2).
    sizes = [n for _, _, n in loop]
    assert sizes == [2, 4] * 6 + [2, 2] * 6 + [4] * 4
    outside = [c for c in calls if not c[1] and c[0] == "vae_encoder"]
    assert len(outside) == 4  # content, style and 2 aux sets of 4 images: one encode each, before the loop


def test_sampling_again_replaces_the_samples(sd_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(sd_run, run)
    code, err = run_b4m(["sample", "--run", run, "--num-samples", "1"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["b4m_0.png", "content_0.png", "grid.png", "style_0.png"]


def test_a_pipeline_that_is_not_text_to_image_is_refused(tmp_path, capsys, no_model_load):
    from diffusers import StableDiffusionImg2ImgPipeline

    StableDiffusionImg2ImgPipeline(**b4m.tiny_pipeline("sd").components).save_pretrained(tmp_path / "img2img")
    code, err = run_b4m(["--content", EXAMPLES / "content", "--style", EXAMPLES / "style", "--model",
                         tmp_path / "img2img", "--rank", "4", "--out", tmp_path / "out"], capsys)
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"b4m: error: --model {tmp_path / 'img2img'}: a StableDiffusionImg2ImgPipeline; b4m needs an SD 1.x/2.x, "
        f"SDXL, SD3/SD3.5 or FLUX.1 text-to-image pipeline")


# One source for every default -------------------------------------------------------------------

def test_every_compared_setting_is_a_flag_and_every_default_is_in_the_help(capsys):
    args = vars(b4m.parse_args(["--content", "c", "--style", "s"]))
    compared = set(b4m.RUN) | {k for keys in b4m.STAGES.values() for k in keys}
    assert compared <= set(args) and set(b4m.DEFAULTS) <= set(args)
    assert all(args[k] == v for k, v in b4m.DEFAULTS.items())
    tiny = vars(b4m.parse_args(["--content", "c", "--style", "s", "--model", "tiny"]))
    assert all(tiny[k] == v for k, v in b4m.TINY.items()) and args["prompt"] == b4m.PROMPTS["make"]
    with pytest.raises(SystemExit):
        b4m.parse_args(["-h"])
    text = " ".join(capsys.readouterr().out.split())
    for k, v in b4m.DEFAULTS.items():
        tiny_part = f"; tiny: {b4m.TINY[k]}" if k in b4m.TINY else ""
        assert f"(default {v}{tiny_part})" in text, k
    assert all(f"'{p}'" in text for p in b4m.PROMPTS.values())


def test_sample_resolution_is_the_model_size_unless_given(sd_run, tmp_path, capsys):
    from PIL import Image

    assert json.loads((sd_run / "config.json").read_text())["settings"]["sample_resolution"] == 64  # 8 latents x 8
    run = tmp_path / "run"
    shutil.copytree(sd_run, run)
    report = json.loads((run / "report.json").read_text())
    code, err = run_b4m(["sample", "--run", run, "--sample-resolution", "32", "--num-samples", "1", "--report"], capsys)
    assert code == 0, err
    assert Image.open(run / "samples" / "grid.png").size == (32, 3 * 32)
    assert json.loads((run / "report.json").read_text())["drift"] == report["drift"]  # at the training size


def test_the_readme_notebook_block_runs_as_written():
    text = (ROOT / "README.md").read_text()
    block = text.split("In a notebook", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    code = block + "\nprint(len(made), [row[0] for row in log])\n"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "64 [1, 2, 3, 4, 5]", r.stdout  # 32 layers, 2 keys each; 5 make steps


def test_the_readme_states_the_defaults_the_code_has():
    text = " ".join((ROOT / "README.md").read_text().split())
    d = b4m.DEFAULTS
    sci = lambda v: f"{v:.0e}".replace("e-0", "e-")  # noqa: E731  1e-4, as the README writes it
    for claim in [f"rank {d['rank']}", f"{d['resolution']} px training", f"batch {d['batch_size']} with gradient "
                  f"accumulation {d['grad_accum']}", f"lr {sci(d['lr'])} for a stage's own half", f"{sci(d['aux_lr'])} for the "
                  f"auxiliary half", f"make lr {sci(d['make_lr'])}", f"clipping at norm {d['max_grad_norm']}",
                  f"{d['sample_steps']} sampling steps", f"pass {d['steps']} steps", f"seed {d['seed']} for training",
                  f"{d['num_samples']} samples per prompt", f"a checkpoint every {d['checkpoint_every']} steps"]:
        assert claim in text, claim


# examples/toyworld.py: the world, the evaluator, the shipped model, and a content stage that teaches
# it a shape it has never seen. Real models, no mocks.

spec = importlib.util.spec_from_file_location("toyworld", EXAMPLES / "toyworld.py")
toyworld = importlib.util.module_from_spec(spec)
sys.modules["toyworld"] = toyworld
spec.loader.exec_module(toyworld)


@pytest.fixture(scope="module")
def toy_pipe():
    return toyworld.load_model()


@pytest.fixture(scope="module")
def evaluator():
    return toyworld.load_evaluator()


def test_world_is_deterministic_for_a_seed():
    a, b = toyworld.draw("star", "zebra", 7), toyworld.draw("star", "zebra", 7)
    assert a.size == (32, 32) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes()
    assert toyworld.draw("star", "zebra", 8).tobytes() != a.tobytes()  # position, size and phase come from the seed


def test_held_out_concepts_never_reach_base_training():
    known_shapes = ["circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "crescent"]
    known_styles = ["red", "blue", "stripes", "dots", "outline", "gradient", "night", "zebra"]
    every = {(a, b) for a in known_shapes for b in known_styles}  # heart, arrow, checker, neon: none
    assert len(toyworld.HELD_OUT_PAIRS) == 4 and set(toyworld.HELD_OUT_PAIRS) < every
    assert sorted(toyworld.TRAIN_PAIRS) == sorted(every - set(toyworld.HELD_OUT_PAIRS))  # 60, each once


def test_the_v2_world_holds_out_three_shapes_and_three_styles():
    try:
        toyworld.use_world("v2")
        known_shapes = ["circle", "square", "triangle", "star", "cross", "diamond", "hexagon"]
        known_styles = ["red", "blue", "stripes", "dots", "outline", "gradient", "night"]
        every = {(a, b) for a in known_shapes for b in known_styles}  # heart, arrow, crescent; checker, neon, zebra
        assert sorted(toyworld.TRAIN_PAIRS) == sorted(every - set(toyworld.HELD_OUT_PAIRS))  # 45, each once
        assert len(toyworld.TRAIN_PAIRS) == 45 and toyworld.MODEL == EXAMPLES / "toyworld" / "model-v2"
        unet = toyworld.make_unet()  # every adapted layer at least 64 wide: rank 8 gives r / m_f <= 0.25
        widths = {min(m.out_features, m.in_features) for n, m in unet.named_modules() if b4m.is_target(n, m)}
        assert widths == {64, 128}
    finally:
        toyworld.use_world("v1")
    assert toyworld.MODEL == EXAMPLES / "toyworld" / "model" and len(toyworld.TRAIN_PAIRS) == 60


def test_the_shipped_v2_model_loads_and_has_the_v2_shape():
    pipe = toyworld.load_model(EXAMPLES / "toyworld" / "model-v2")
    assert tuple(pipe.unet.config.block_out_channels) == (64, 128) and pipe.unet.config.cross_attention_dim == 128
    assert pipe.text_encoder.config.hidden_size == 128 and pipe.vae.config.latent_channels == 4
    assert b4m.check_rank(8, pipe.unet) is None  # rank 8 fits; the smallest layer allows 64
    with pytest.raises(b4m.UsageError, match="at most 64"):
        b4m.check_rank(65, pipe.unet)


def test_word_level_tokenizer_gives_every_word_one_token(toy_pipe):
    ids = toy_pipe.tokenizer("a snq object in w@z style").input_ids
    vocab = toy_pipe.tokenizer.get_vocab()
    assert ids == [vocab[w] for w in ["<bos>", "a", "snq", "object", "in", "w@z", "style", "<eos>"]]


def test_a_word_means_the_same_in_every_prompt(toy_pipe):
    emb = b4m.encode_prompts(toy_pipe, ["a photo of snq object", "a snq object in w@z style"], 32)["encoder_hidden_states"]
    assert torch.equal(emb[0, 4], emb[1, 2])  # "snq" at positions 4 and 2
    assert torch.equal(emb[0, 5], emb[1, 3])  # "object"


def test_evaluator_is_right_on_fresh_images_of_every_class(evaluator):
    accuracy = toyworld.evaluator_accuracy(n=20, seed0=2 * 10**6)  # seeds never used in training
    assert len(accuracy) == 20
    assert min(accuracy.values()) == 1.0, {k: v for k, v in accuracy.items() if v < 1}


def test_shipped_model_loads_with_from_pretrained_and_passes_gate_a(toy_pipe, evaluator):
    from diffusers import StableDiffusionPipeline

    assert isinstance(toy_pipe, StableDiffusionPipeline)
    assert toy_pipe.unet.config.sample_size * toy_pipe.vae_scale_factor == 32
    pairs = toyworld.TRAIN_PAIRS[::3]  # 20 held-in prompts, 2 samples each
    result = toyworld.gate(toy_pipe, pairs, 2, 0, evaluator)
    assert result["n"] == 40
    assert result["both"] >= 0.8, result


def test_short_content_stage_teaches_the_new_shape(toy_pipe, evaluator, tmp_path):
    """100 steps of b4m's content stage: hearts, never seen by the
    base model, appear in `a photo of snq object` more often than before."""
    from diffusers import DDPMScheduler

    content, style = toyworld.image_sets(tmp_path, "heart", "blue", "checker")
    target = b4m.encode_set(toy_pipe, *b4m.load_image_set(content, 32))
    aux = b4m.encode_set(toy_pipe, *b4m.load_image_set(style, 32))
    hearts = lambda images: sum(s == "heart" for s, _ in toyworld.classify(images, evaluator))
    base = hearts(toyworld.sample(toy_pipe, "a photo of snq object", 16, 0))
    # The quick start's rank and batch; 100 steps at 3e-3 (a content stage alone learns faster at a higher lr)
    loss = functools.partial(b4m.denoising_loss, toy_pipe.unet, DDPMScheduler.from_config(toy_pipe.scheduler.config), 8)
    sd, _ = b4m.break_stage("content", toy_pipe.unet, loss, target, aux, rank=16, seed=0, steps=100, lr=3e-3,
                            aux_lr=3e-4, grad_accum=1, max_grad_norm=1.0)
    learned = hearts(b4m.generate(toy_pipe, sd, "a photo of snq object", num_samples=16, steps=25, resolution=32, seed=0))
    assert base == 0 and learned >= 8, (base, learned)  # measured here: 0, then 10 of 16


def test_compare_scores_the_combined_prompt_and_the_leaks(evaluator, tmp_path):
    """score_run's definitions, on drawn images standing in for a run's samples: the new shape in the
    new style is `both`; the content set's own style is a style leak; a known shape is a shape leak."""
    samples = tmp_path / "samples"
    samples.mkdir()
    combined = [("heart", "checker"), ("heart", "blue"), ("star", "checker"), ("star", "zebra")]
    singles = {"content": [("heart", "blue")] * 3 + [("circle", "blue")], "style": [("star", "checker")] * 4}
    for kind, pairs in [("b4m", combined), *singles.items()]:
        for i, (shape, style) in enumerate(pairs):
            toyworld.draw(shape, style, 40 + i).save(samples / f"{kind}_{i}.png")
    assert toyworld.classify([toyworld.draw(*p, 40 + i) for i, p in enumerate(combined)], evaluator) == combined
    assert toyworld.score_run(tmp_path, "heart", "blue", "checker", 4, evaluator) == {
        "content": 0.5, "style": 0.5, "both": 0.25, "style_leak": 0.25, "shape_leak": 0.5,
        "content_stage_shape": 0.75, "style_stage_style": 1.0}


def test_regime_numbers_of_the_shipped_model_and_of_sdxl(toy_pipe):
    """toyworld.regime, the source of the README's regime table, against add_plp's own layers."""
    import copy

    rows = {(r["type"], r["shape"]): r for r in toyworld.regime(toy_pipe.unet, 16)}
    unet = copy.deepcopy(toy_pipe.unet)
    layers = b4m.add_plp(unet, 16, 0)
    for (kind, shape), row in rows.items():
        names = [n for n in layers if n.endswith("." + kind.split()[1]) and ((".attn2." in n) == kind.startswith("cross"))
                 and f"{layers[n].base.out_features}x{layers[n].base.in_features}" == shape]
        assert len(names) == row["layers"] > 0
        m, n = map(int, shape.split("x"))
        assert (row["r/m_f"], row["r/n_f"], row["B rows"], row["D columns"]) == (16 / (m // 2), 16 / (n // 2), m - m // 2,
                                                                              n - n // 2)
        ratio = sum((layers[k].delta_weight().norm() / layers[k].base.weight.norm()).item() for k in names) / len(names)
        assert row["|dW_init|/|W0|"] == round(ratio, 3), (kind, shape)
    assert sum(r["layers"] for r in rows.values()) == len(layers) == 56
    sdxl = toyworld.regime(toyworld.sdxl_unet_on_meta(), 64)
    assert sum(r["layers"] for r in sdxl) == 560  # 140 attention modules x 4 projections
    assert {r["shape"]: r["r/m_f"] for r in sdxl} == {"640x640": 0.2, "640x2048": 0.2, "1280x1280": 0.1, "1280x2048": 0.1}
    assert all(r["|dW_init|/|W0|"] is None for r in sdxl)  # no weights here


def test_validation_and_test_pairs_never_overlap_and_are_all_new_in_v2():
    test, validation = set(toyworld.TEST_PAIRS), set(toyworld.VALIDATION_PAIRS)
    assert not test & validation and len(test) >= 3 and len(test | validation) == 9
    new = {(a, c) for a in ("heart", "arrow", "crescent") for c in ("checker", "neon", "zebra")}
    assert {(a, c) for a, _, c in test | validation} == new  # every one of v2's nine new pairs, once
    assert all(own not in ("checker", "neon", "zebra") for _, own, _ in test | validation)  # a known style


def test_regime_with_a_prior_scale_shrinks_the_init_by_its_square(toy_pipe):
    plain, scaled = toyworld.regime(toy_pipe.unet, 16), toyworld.regime(toy_pipe.unet, 16, scale=0.5)
    for a, b in zip(plain, scaled):
        assert (a["type"], a["r/m_f"], a["B rows"]) == (b["type"], b["r/m_f"], b["B rows"])
        for key in ("|dW_init|", "|dW_init|/|W0|", "|AC|/|W0_AC|"):
            assert b[key] == pytest.approx(a[key] / 4, abs=1e-3), key


def search_record(both):
    """A record whose search runs all scored, both-right taken from both[method][setting][pair]."""
    runs = {}
    for method, settings in toyworld.SEARCH.items():
        for i in range(len(settings)):
            for j, (a, _, c) in enumerate(toyworld.SEARCH_PAIRS):
                scores = dict.fromkeys(toyworld.SCORES, 0.5)
                runs[f"search/{method}/{i}/{a}-{c}/seed0"] = {**scores, "both": both[method][i][j]}
    return {"runs": runs}


def test_compare_searches_validation_pairs_only_and_chooses_by_mean_both_right():
    assert all(p in toyworld.VALIDATION_PAIRS for p in toyworld.SEARCH_PAIRS)
    assert len({len(s) for s in toyworld.SEARCH.values()}) == 1  # the same budget for every method
    record = search_record({"b4m": [[0.125, 0.125], [0.0, 0.5], [0.25, 0.25], [0.25, 0.0]],
                            "lora-merge": [[0.5, 0.5], [0.5, 0.5], [0.0, 0.0], [0.75, 0.0]]})
    chosen, rows = toyworld.choose(record)
    assert chosen == {"b4m": toyworld.SEARCH["b4m"][1], "lora-merge": toyworld.SEARCH["lora-merge"][0]}  # first on a tie
    assert [r["both"] for r in rows if r["method"] == "b4m"] == [0.125, 0.25, 0.25, 0.125]
    del record["runs"]["search/lora-merge/3/arrow-zebra/seed0"]
    assert toyworld.choose(record)[0]["lora-merge"] is None  # unfinished: nothing chosen
    for phase in ("test", "ablations"):
        with pytest.raises(SystemExit, match="run --phase search first"):
            toyworld.plan(phase, record, [0])
    searched = {tuple(run[3]) for group in toyworld.plan("search", record, [0]) for run in group}
    assert searched == set(toyworld.SEARCH_PAIRS) and not searched & set(toyworld.TEST_PAIRS)
    record["chosen"] = chosen
    test = [run for group in toyworld.plan("test", record, [0, 1, 2, 3, 4]) for run in group]
    assert len(test) == 5 * len(toyworld.TEST_PAIRS) * 2 and {tuple(r[3]) for r in test} == set(toyworld.TEST_PAIRS)
    for key, method, flags, *_ in test:  # every run's flags are b4m.py's, at the chosen setting
        args = b4m.parse_args(["--content", "c", "--style", "s", *flags, *toyworld.METHODS[method]])
        setting = chosen["lora-merge" if method == "lora-merge" else "b4m"]
        assert (args.lr, args.style_lr, args.rank, args.steps) == (setting["lr"], setting["style_lr"], 8, 150), key
        assert args.prior_scale == setting.get("prior_scale", 1.0)


def test_compare_skips_the_runs_its_record_holds(tmp_path, monkeypatch, capsys, evaluator):
    """A search whose every run is in the record runs nothing and writes the choice (no b4m.py
    call: one would fail on the missing image sets)."""
    record = search_record({m: [[0.1 * i, 0.0] for i in range(4)] for m in toyworld.SEARCH})
    monkeypatch.setattr(toyworld, "RECORD", tmp_path / "compare.json")
    monkeypatch.setattr(toyworld, "ROOT", tmp_path)  # compare.md goes here
    toyworld.RECORD.write_text(json.dumps(record))
    monkeypatch.setattr(toyworld, "b4m", lambda *a, **k: pytest.fail("ran b4m.py"))
    try:
        toyworld.main(["compare", "--phase", "search", "--out", str(tmp_path / "runs")])
    finally:
        toyworld.use_world("v1")
    saved = json.loads(toyworld.RECORD.read_text())
    assert saved["runs"] == record["runs"] and saved["chosen"] == {m: s[3] for m, s in toyworld.SEARCH.items()}
    assert "| b4m | " in (tmp_path / "compare.md").read_text()


def test_ablation_table_pairs_each_ablation_with_b4m_on_the_cells_it_ran():
    score = lambda v: {k: v for k in toyworld.SCORES}
    record = {"runs": {"test/b4m/heart-checker/seed0": score(0.5), "test/b4m/heart-checker/seed1": score(1.0),
                       "test/b4m/arrow-neon/seed0": score(0.25), "test/no-mcp/heart-checker/seed0": score(0.75),
                       "test/no-mcp/arrow-neon/seed0": score(0.0), "test/lora-merge/heart-checker/seed1": score(0.0)}}
    only = {("heart-checker", "seed0"), ("arrow-neon", "seed0")}
    rows, cells = toyworld.table(record, "test", ["b4m", *toyworld.ABLATIONS], against=None, only=only)
    assert set(cells) == {"b4m", "no-mcp"} and set(cells["b4m"]) == only  # seed 1: not an ablation cell
    assert rows[2].startswith("| b4m | 2 | 0.38 [0.25, 0.50] |")
    assert rows[3].startswith("| no-mcp | 2 | 0.38 [0.00, 0.75] |")
    assert rows[4].startswith("| no-mcp − b4m (paired) | 2 | 0.00 [-0.25, 0.25] |") and len(rows) == 5
    record["runs"]["test/no-mcp/arrow-neon/seed0"] = score(0.249)
    rows, _ = toyworld.table(record, "test", ["b4m", "no-mcp"], against=None, only=only)
    assert rows[-1].startswith("| no-mcp − b4m (paired) | 2 | 0.12 [0.00, 0.25] |")  # not -0.00
    rows, _ = toyworld.table(record, "test", ["b4m", "lora-merge"])  # B4M − merge over seed 1 only
    assert rows[-1].startswith("| B4M − merge (paired) | 1 | 1.00 [1.00, 1.00] |")


def test_compare_picture_needs_the_cells_b4m_and_merge_runs(tmp_path, monkeypatch):
    from PIL import Image
    monkeypatch.setattr(toyworld, "ROOT", tmp_path)
    cell = tmp_path / "cell"
    for method, colour in [("no-mcp", "red"), ("b4m", "blue"), ("lora-merge", "green")]:
        (cell / method / "samples").mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (toyworld.SIZE, toyworld.SIZE), colour).save(cell / method / "samples" / f"b4m_{i}.png")
        toyworld.picture(cell, k=2)
        assert (tmp_path / "compare.png").exists() == (method == "lora-merge")  # only with both
    grid = Image.open(tmp_path / "compare.png")
    assert grid.size == (6 * toyworld.SIZE, 3 * toyworld.SIZE)  # a row per method, b4m first
    rows = [grid.getpixel((5 * toyworld.SIZE, j * toyworld.SIZE + 1)) for j in range(3)]
    assert rows == [(0, 0, 255), (0, 128, 0), (255, 0, 0)]


def test_make_only_ablations_reuse_a_finished_b4m_run_and_train_their_own_otherwise(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(toyworld, "b4m", lambda *argv, threads=None: calls.append(argv))

    def finished(run):  # the files a finished b4m.py run leaves, each holding its own path
        for folder in ("content", "style", "samples"):
            (run / folder).mkdir(parents=True)
        for name in ("config.json", "losses.csv", "report.json", "samples/b4m_1.png", "style/x.safetensors"):
            (run / name).write_text(f"{run.name}/{name}")

    toyworld.run_method("no-precondition", tmp_path, "c", "s", 0, 2)
    assert "--overwrite" in calls[-1] and "--resume" not in calls[-1]  # no B4M run to reuse
    finished(tmp_path / "no-precondition")  # B4M's folder gone (recorded elsewhere): this one's
    toyworld.run_method("make-steps-0", tmp_path, "c", "s", 0, 2)
    assert "--resume" in calls[-1] and calls[-1][-2:] == ("--make-steps", "0")
    assert (tmp_path / "make-steps-0" / "style" / "x.safetensors").read_text() == "no-precondition/style/x.safetensors"
    toyworld.run_method("no-mcp", tmp_path, "c", "s", 0, 2)  # changes the break stages: its own
    assert "--overwrite" in calls[-1] and len(calls) == 3
    cell = tmp_path / "cell2"
    finished(cell / "b4m")
    toyworld.run_method("no-precondition", cell, "c", "s", 0, 2)  # B4M's break stages first
    assert "--resume" in calls[-1] and calls[-1][-1] == "--no-precondition" and len(calls) == 4
    assert (cell / "no-precondition" / "config.json").read_text() == "b4m/config.json"


def test_bootstrap_interval_on_a_hand_made_example():
    assert toyworld.bootstrap([0.5] * 6) == (0.5, 0.5, 0.5)  # no spread, no interval
    # 4 cells: a resample's mean is k/4, k ~ Binomial(4, 1/2): P(k = 0) = P(k = 4) = 1/16 > 2.5 %,
    # so the 95 % interval reaches both extremes
    assert toyworld.bootstrap([0.0, 0.0, 1.0, 1.0], resamples=20000) == (0.5, 0.0, 1.0)
    mean, low, high = toyworld.bootstrap([0.0] * 10 + [1.0] * 10)  # 20 cells: P(k <= 5) ~ 2 %
    assert mean == 0.5 and 0.25 <= low < 0.35 and 0.65 < high <= 0.75
    diff = toyworld.paired_difference([0.3, 0.5, 0.7], [0.1, 0.3, 0.5])
    assert all(abs(v - 0.2) < 1e-12 for v in diff)  # the same difference in every cell


def test_toyworld_info_draw_and_score_commands(capsys, tmp_path):
    toyworld.main(["info"])
    assert json.loads(capsys.readouterr().out) == {
        "world": "v1", "shapes": toyworld.SHAPES, "styles": toyworld.STYLES, "held_out_shapes": ["heart", "arrow"],
        "held_out_styles": ["checker", "neon"], "held_out_pairs": [list(p) for p in toyworld.HELD_OUT_PAIRS],
        "model": str(EXAMPLES / "toyworld" / "model")}
    toyworld.main(["draw", "--shape", "arrow", "--style", "neon", "--n", "3", "--seed", "9", "--out", str(tmp_path),
                   "--prompt", "an image in w@z style"])
    assert (tmp_path / "prompt.txt").read_text() == "an image in w@z style\n"
    capsys.readouterr()
    toyworld.main(["score", str(tmp_path)])
    assert json.loads(capsys.readouterr().out) == {f"arrow_neon_{k}.png": {"shape": "arrow", "style": "neon"}
                                                    for k in (9, 10, 11)}


@pytest.mark.parametrize("argv, message", [
    (["score", "no/such/folder"], "score: no/such/folder is not a folder; give a folder of PNG images"),
    (["compare", "--jobs", "0"], "argument --jobs: must be a whole number >= 1, got 0"),
    (["compare", "--phase", "all"], "argument --phase: invalid choice: 'all' (choose from 'search', 'test', "
                                     "'ablations', 'old', 'report')"),
    (["draw", "--shape", "heart", "--style", "red", "--n", "x", "--out", "x"], "argument --n: must be a whole number >= 1, got x")])
def test_toyworld_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        toyworld.main(argv)
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith("error: " + message)
