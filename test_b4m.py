"""Tests for b4m.py, in the order of its sections. Math is checked in float64 against the paper's
identities; the pipeline is checked end to end on the tiny random SD/SDXL pipelines (offline)."""
import argparse
import json
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
    layer = b4m.PLPLinear(base, r, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        layer.B.normal_()  # B = 0 at init hides half of the identities below
    return layer


# 1. PLP layer ------------------------------------------------------------------------------------

def test_plp_shapes_and_what_is_trainable():
    layer = plp(m=12, n=9, r=4)
    assert layer.A.shape == (6, 4) and layer.B.shape == (6, 4)
    assert layer.C.shape == (4, 4) and layer.D.shape == (4, 5)
    assert layer.up.shape == (12, 4) and layer.down.shape == (4, 9)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["B", "D"]
    assert set(layer.state_dict()) == {"A", "C", "B", "D", "base.weight", "base.bias"}
    fresh = b4m.PLPLinear(nn.Linear(9, 12), 4, torch.Generator().manual_seed(0))
    assert torch.equal(fresh.B, torch.zeros(6, 4))
    assert fresh.D.std().item() == pytest.approx(1 / 4, rel=0.5)


def test_plp_reconstruction_identity_and_forward():
    layer = plp()
    A, B, C, D = layer.A, layer.B, layer.C, layer.D
    blocks = torch.cat([torch.cat([A @ C, A @ D], 1), torch.cat([B @ C, B @ D], 1)], 0)
    assert torch.allclose(layer.delta_weight(), blocks, atol=1e-12)
    x = torch.randn(2, 3, 10, dtype=torch.float64)  # any leading batch shape
    W = layer.base.weight + layer.delta_weight()
    assert torch.allclose(layer(x), x @ W.T + layer.base.bias, atol=1e-12)


def test_plp_keeps_dtype_and_adapter_stays_fp32_under_bf16():
    layer = b4m.PLPLinear(nn.Linear(8, 8).to(torch.bfloat16), 2, torch.Generator().manual_seed(0))
    assert layer.B.dtype == layer.A.dtype == torch.float32
    assert layer(torch.randn(3, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


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


# 2. Orthogonal prior -----------------------------------------------------------------------------

@pytest.mark.parametrize("m,n,r", [(12, 10, 4), (64, 32, 48), (7, 9, 3), (1280, 2048, 64)])
def test_orthogonal_prior_identity(m, n, r):
    A, C = b4m.orthogonal_prior(m, n, r, torch.Generator().manual_seed(1), dtype=torch.float64)
    assert A.shape == (m // 2, r) and C.shape == (r, n // 2)
    assert torch.allclose(A.T @ A + C @ C.T, torch.eye(r, dtype=torch.float64), atol=1e-12)


def test_random_prior_breaks_the_identity_at_the_same_scale():
    A, C = b4m.random_prior(64, 64, 8, torch.Generator().manual_seed(1), dtype=torch.float64)
    G = A.T @ A + C @ C.T
    assert not torch.allclose(G, torch.eye(8, dtype=torch.float64), atol=0.1)
    assert G.diagonal().mean().item() == pytest.approx(1.0, abs=0.25)  # same scale, not orthonormal


@pytest.mark.parametrize("rank", [0, -1, 12])
def test_bad_rank_raises(rank):
    with pytest.raises(ValueError, match="rank must be between 1 and"):
        b4m.orthogonal_prior(12, 10, rank)  # 6 + 5 = 11 is the most a 12x10 layer allows
    with pytest.raises(ValueError):
        b4m.PLPLinear(nn.Linear(10, 12), rank)


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
                t.B.grad, t.D.grad = b4m.riemannian_precondition(t.up, t.down, t.B.grad, t.D.grad, delta=1e-6)
        ours.step(), ref.step()
        ours.zero_grad(), ref.zero_grad()
        for a, b in zip(layers, twins):
            assert torch.allclose(a.B, b.B, atol=1e-12) and torch.allclose(a.D, b.D, atol=1e-12)


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
        assert (sd_run / stage / b4m.WEIGHTS).is_file()
        assert not (sd_run / stage / "partial.safetensors").exists()
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


def split(sd, key):
    U, V = sd[key], sd[key.replace("lora_B", "lora_A")]
    return U[: U.shape[0] // 2], U[U.shape[0] // 2:], V[:, : V.shape[1] // 2], V[:, V.shape[1] // 2:]


def test_A_and_C_identical_across_the_three_files_and_make_starts_from_the_halves(sd_run):
    content, style, made = (load(sd_run / s / b4m.WEIGHTS) for s in ("content", "style", "b4m"))
    keys = [k for k in made if k.endswith("lora_B.weight")]
    assert len(keys) == 32 and set(made) == set(content) == set(style)
    for k in keys:
        (Ac, Bc, Cc, Dc), (As, Bs, Cs, Ds), (Am, Bm, Cm, Dm) = split(content, k), split(style, k), split(made, k)
        assert torch.equal(Ac, As) and torch.equal(Ac, Am) and torch.equal(Cc, Cs) and torch.equal(Cc, Cm)
    reassembled = b4m.reassemble(content, style)
    for k in keys:
        assert torch.equal(reassembled[k], style[k])  # U = [A; B_style]
        assert torch.equal(reassembled[k.replace("lora_B", "lora_A")], content[k.replace("lora_B", "lora_A")])


def test_make_refuses_mismatched_scaffolds(sd_run):
    content = load(sd_run / "content" / b4m.WEIGHTS)
    unet = tiny_unet()
    other = b4m.lora_state_dict(b4m.add_plp(unet, 4, seed=1))  # another seed: another A, C
    with pytest.raises(b4m.UsageError, match="frozen A/C of .* differ"):
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
        b4m.save_lora(folder / b4m.WEIGHTS, b4m.lora_state_dict(layers), {"stage": "b4m"})
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
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0) and not torch.allclose(ours, base, atol=1e-3)


def test_gradient_routing_in_the_content_stage(tmp_path):
    """After a content step, D has seen only the content loss: it is the same whatever the
    auxiliary style images are. B has seen only the auxiliary loss, so it is not."""
    pipe = b4m.load_pipeline("tiny", "cpu", torch.float32)
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    enc = lambda d: b4m.encode_set(pipe, *b4m.load_image_set(d, "--x", 64), 64)  # noqa: E731
    content, aux1, aux2 = enc(EXAMPLES / "content"), enc(EXAMPLES / "style"), enc(EXAMPLES / "content")
    args = argparse.Namespace(rank=4, seed=0, no_orth_prior=False, no_mcp=False, lr=1e-3, aux_lr=1e-3, steps=1,
                              grad_accum=2, batch_size=1, out=str(tmp_path))
    first = b4m.break_stage("content", pipe, sched, content, [aux1], args, [])
    second = b4m.break_stage("content", pipe, sched, content, [aux2], args, [])
    keys = [k for k in first if k.endswith("lora_B.weight")]
    for k in keys:
        assert torch.equal(split(first, k)[3], split(second, k)[3])  # D
    assert any(not torch.equal(split(first, k)[1], split(second, k)[1]) for k in keys)  # B


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


def test_v_prediction_target(tmp_path):
    from diffusers import DDPMScheduler

    pipe = b4m.load_pipeline("tiny", "cpu", torch.float32)
    data = b4m.encode_set(pipe, *b4m.load_image_set(EXAMPLES / "content", "--c", 64), 64)
    losses = {}
    for kind in ("epsilon", "v_prediction"):
        sched = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type=kind)
        losses[kind] = b4m.set_losses(pipe.unet, sched, [data], 2, torch.Generator().manual_seed(0))
    assert not torch.equal(losses["epsilon"], losses["v_prediction"])  # same draws, other target


def test_cli_as_a_subprocess(tmp_path):
    """The quick start, as a user types it (shortened)."""
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "b4m.py", "--content", "examples/content", "--style", "examples/style",
                        "--model", "tiny", "--out", str(out), *FAST], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (out / "b4m" / b4m.WEIGHTS).is_file() and "wrote" in r.stderr
