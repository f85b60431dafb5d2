"""b4m.py: the paper's identities on float64 tensors; sections 1-3 in detail; the product end to end
on the tiny SD, SDXL, SD3 and FLUX pipelines of examples/tiny.py, saved once, loaded by --model DIR.
"""
import argparse, contextlib, errno, fcntl, importlib.util, json, os, re, shutil  # noqa: E401
import signal, stat, struct, subprocess, sys  # noqa: E401
from pathlib import Path
import pytest, torch, torch.nn as nn  # noqa: E401
import b4m

ROOT = Path(__file__).resolve().parent
EXAMPLES = ROOT / "examples"
_spec = importlib.util.spec_from_file_location("tiny", EXAMPLES / "tiny.py")
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)
F64 = torch.float64
def randn(*shape, g):
    return torch.randn(*shape, generator=g, dtype=F64)
def plp(m=12, n=10, r=4, seed=0, dtype=F64):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    layer = b4m.PLPLinear(nn.Linear(n, m).to(dtype), *b4m.orthogonal_prior(m, n, r, g), g)
    with torch.no_grad():
        layer.B.normal_()  # B = 0 at init hides half of the identities below
    return layer
def toy_denoiser():  # two attention-named layers of odd, mixed widths: what add_plp adapts
    torch.manual_seed(0)
    layers = {"to_q": nn.Linear(7, 9), "to_k": nn.Linear(9, 5)}
    return nn.ModuleDict({"attn": nn.ModuleDict(layers)}).double()
def toy_sets(n=4):
    g = torch.Generator().manual_seed(0)
    return [{"x": randn(4, 7, g=g), "y": randn(4, 5, g=g)} for _ in range(n)]
def toy_loss(net):  # loss(sets, generator): one squared error per set, as the stages expect
    f = lambda x: net.attn.to_k(torch.tanh(net.attn.to_q(x)))  # noqa: E731
    return lambda sets, g=None: torch.stack([(f(s["x"]) - s["y"]).pow(2).mean() for s in sets])
def record_gradients(monkeypatch):  # what each step hands its optimizer, before clipping
    seen, real = [], b4m.clip_and_step
    def recording(optimizer, scaler, max_grad_norm):
        seen.append([p.grad.clone() for group in optimizer.param_groups for p in group["params"]])
        real(optimizer, scaler, max_grad_norm)
    monkeypatch.setattr(b4m, "clip_and_step", recording)
    return seen
def close(got, expected, atol=1e-12):
    return len(got) == len(expected) and all(torch.allclose(a, b, atol=atol, rtol=0)
                                             for a, b in zip(got, expected))

# The paper's identities, in the method's order ---------------------------------------------------
def test_plp_blocks_shapes_forward_and_what_is_trainable():
    layer = plp(m=13, n=9, r=4)  # odd sizes: m_f = 6 of 13 rows, n_f = 4 of 9 columns frozen
    A, B, C, D = layer.A, layer.B, layer.C, layer.D
    assert (A.shape, B.shape, C.shape, D.shape) == ((6, 4), (7, 4), (4, 4), (4, 5))
    assert all(torch.equal(a, b) for a, b in zip(b4m.halves(layer.U, layer.V), (A, B, C, D)))
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["B", "D"]
    assert set(layer.state_dict()) == {"A", "C", "B", "D", "base.weight", "base.bias"}
    blocks = torch.cat([torch.cat([A @ C, A @ D], 1), torch.cat([B @ C, B @ D], 1)], 0)
    assert torch.allclose(layer.U @ layer.V, blocks, atol=1e-12)  # dW = U V
    x, W = torch.randn(2, 3, 9, dtype=F64), layer.base.weight + layer.U @ layer.V
    assert torch.allclose(layer(x), x @ W.T + layer.base.bias, atol=1e-12)  # any batch shape
    g = torch.Generator().manual_seed(0)
    fresh = b4m.PLPLinear(nn.Linear(9, 12), *b4m.orthogonal_prior(12, 9, 4, g), g)
    assert not fresh.B.any() and fresh.D.std().item() == pytest.approx(1 / 4, rel=0.5)
    bf16 = b4m.PLPLinear(nn.Linear(8, 8).to(torch.bfloat16), *b4m.orthogonal_prior(8, 8, 2))
    assert bf16.B.dtype == bf16.A.dtype == torch.float32  # Adam's steps need fp32 halves
    assert bf16(torch.randn(3, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16
    adapter, donor = b4m.adapter_of({"x": layer}), b4m.adapter_of({"x": plp(12, 9, 4, seed=3)})
    assert torch.equal(adapter["x"][0], layer.U.float()) and adapter["x"][1].dtype == torch.float32
    b4m.load_blocks({"x": fresh}, donor)  # every block, the scaffold too
    assert torch.equal(fresh.U, donor["x"][0]) and torch.equal(fresh.V, donor["x"][1])
    assert b4m.diffusers_keys(adapter, "unet") == {"unet.x.lora_A.weight": adapter["x"][1],
                                                   "unet.x.lora_B.weight": adapter["x"][0]}
    with pytest.raises(ValueError, match="do not fit a 12x12 layer"):  # a 12x10 layer's scaffold
        b4m.PLPLinear(nn.Linear(12, 12), *b4m.orthogonal_prior(12, 10, 4))
def test_only_B_and_D_move_even_with_weight_decay():
    layer = plp(dtype=torch.float32)
    frozen = {k: v.clone() for k, v in layer.state_dict().items() if k not in ("B", "D")}
    B0, D0 = layer.B.detach().clone(), layer.D.detach().clone()
    opt = b4m.RiemannianAdamW([layer], lr=1e-2, weight_decay=0.5)
    for _ in range(25):
        layer(torch.randn(4, 10)).pow(2).sum().backward()
        assert layer.base.weight.grad is None and layer.A.grad is None
        opt.step(), opt.zero_grad()
    assert all(torch.equal(v, frozen[k]) for k, v in layer.state_dict().items() if k in frozen)
    assert not torch.equal(layer.B, B0) and not torch.equal(layer.D, D0)
    assert set(map(id, opt.state)) == {id(layer.B), id(layer.D)}
@pytest.mark.parametrize("m,n,r", [(12, 10, 4), (64, 32, 48), (7, 9, 3), (1280, 2048, 64)])
def test_orthogonal_prior_identity_and_the_ranks_it_refuses(m, n, r):
    A, C = b4m.orthogonal_prior(m, n, r, torch.Generator().manual_seed(1))
    assert A.shape == (m // 2, r) and C.shape == (r, n // 2)
    assert torch.allclose(A.T @ A + C @ C.T, torch.eye(r, dtype=F64), atol=1e-12)
    for prior, rank in ((b4m.orthogonal_prior, 0), (b4m.random_prior, m // 2 + n // 2 + 1)):
        with pytest.raises(ValueError, match=f"rank must be between 1 and m_f \\+ n_f = "
                                             f"{m // 2 + n // 2} for a {m}x{n} layer"):
            prior(m, n, rank)
def test_preconditioner_formula_and_its_reparametrisation_invariance():
    # dW = U V = (U M)(M^-1 V): a plain step changes dW by -lr (G V^T V + U U^T G), which depends
    # on the factorisation; a preconditioned one by -lr (G P_row(V) + P_col(U) G), which does not
    g = torch.Generator().manual_seed(0)
    U, V, gU, gV = randn(12, 4, g=g), randn(4, 10, g=g), randn(12, 4, g=g), randn(4, 10, g=g)
    pU, pV, eye = *b4m.riemannian_precondition(U, V, gU, gV, delta=1e-3), 1e-3 * torch.eye(4)
    assert torch.allclose(pU, gU @ torch.linalg.inv(V @ V.T + eye), atol=1e-12)
    assert torch.allclose(pV, torch.linalg.inv(U.T @ U + eye) @ gV, atol=1e-12)
    pB, pD = b4m.riemannian_precondition(U, V, gU[6:], gV[:, 5:], delta=1e-3)  # rows, columns
    assert torch.allclose(pB, pU[6:], atol=1e-12) and torch.allclose(pD, pV[:, 5:], atol=1e-12)
    G, M = randn(12, 10, g=g), randn(4, 4, g=g) + 3 * torch.eye(4, dtype=F64)  # G = dL/d(dW)
    def change(U, V, precondition):  # to first order
        gU, gV = G @ V.T, U.T @ G  # chain rule through dW = U V
        if precondition:
            gU, gV = b4m.riemannian_precondition(U, V, gU, gV, delta=0.0)
        return gU @ V + U @ gV
    U2, V2 = U @ M, torch.linalg.solve(M, V)
    assert torch.allclose(U @ V, U2 @ V2, atol=1e-12)
    assert torch.allclose(change(U, V, True), change(U2, V2, True), atol=1e-9)
    assert not torch.allclose(change(U, V, False), change(U2, V2, False), atol=1e-1)
@pytest.mark.parametrize("stage", ["content", "style"])
def test_break_routes_each_loss_into_its_own_half_exactly(stage, monkeypatch):
    # MCP: the target loss reaches only the stage's own half (content: D, style: B), the mean
    # auxiliary loss only the other half; each half's gradient is exactly its loss's gradient
    seen, (content, style, *aux) = record_gradients(monkeypatch), toy_sets()
    layers = b4m.add_plp(reference := toy_denoiser(), 3, 0).values()  # as break_stage draws
    B, D, loss = [t.B for t in layers], [t.D for t in layers], toy_loss(reference)
    own, other = (D, B) if stage == "content" else (B, D)
    expected = (torch.autograd.grad(loss([content if stage == "content" else style]).mean(), own)
                + torch.autograd.grad(loss(aux).mean(), other))
    net = toy_denoiser()
    _, log = b4m.break_stage(stage, net, toy_loss(net), content, style, aux, rank=3, seed=0,
                             steps=1, lr=1e-3, aux_lr=1e-4, max_grad_norm=0)
    assert close(seen[0], expected) and [len(row) for row in log] == [3]  # step, loss, aux
    assert not any(isinstance(m, b4m.PLPLinear) for m in net.modules())  # given back as it was
def test_make_gradient_is_the_gradient_of_L_content_plus_L_style(monkeypatch):
    seen, halves = record_gradients(monkeypatch), []
    for seed in (1, 2):  # a content and a style adapter on the same scaffold
        layers = b4m.add_plp(toy_denoiser(), 3, seed=0)
        torch.manual_seed(seed)
        with torch.no_grad():
            [(t.B.normal_(), t.D.normal_()) for t in layers.values()]
        halves.append(b4m.adapter_of(layers))
    (content, style), reference, net = toy_sets(2), toy_denoiser(), toy_denoiser()
    b4m.load_blocks(layers := b4m.add_plp(reference, 3, seed=0), b4m.reassemble(*halves))
    expected = torch.autograd.grad(toy_loss(reference)([content, style]).sum(),
                                   [t.B for t in layers.values()] + [t.D for t in layers.values()])
    _, log = b4m.make_stage(net, toy_loss(net), content, style, *halves, rank=3, seed=0, steps=1,
                            lr=1e-3, max_grad_norm=0)
    assert close(seen[0], expected) and [len(row) for row in log] == [2]  # step, loss
def test_reassembly_is_exact_U_is_A_B_style_and_V_is_C_D_content():
    g = torch.Generator().manual_seed(0)
    content, style = ({n: (randn(9, 3, g=g), randn(3, 7, g=g)) for n in "ab"} for _ in "cs")
    for name, (U, V) in content.items():  # the same scaffold: A (4 x 3) and C (3 x 3)
        style[name][0][:4], style[name][1][:, :3] = U[:4], V[:, :3]
    made = b4m.reassemble(content, style)
    assert all(torch.equal(made[n][0], style[n][0]) and torch.equal(made[n][1], content[n][1])
               for n in "ab")
    A, B, C, D = b4m.halves(*made["a"])
    scaled = b4m.reassemble(content, style, 0.5, 1.5)["a"]  # strengths: s_c D and s_s B
    assert torch.equal(scaled[0], torch.cat([A, 1.5 * B]))
    assert torch.equal(scaled[1], torch.cat([C, 0.5 * D], 1))
    style["a"][0][0, 0] += 1e-12  # a scaffold that differs in one entry
    with pytest.raises(ValueError, match="frozen A/C of a differ"):
        b4m.reassemble(content, style)

# 1-3 in detail: the PLP layer, the prior, the preconditioner -------------------------------------
def tiny_unet():
    return tiny.tiny_pipeline("sd").unet
def test_add_plp_wraps_exactly_the_attention_projections_each_with_its_own_draw():
    unet = tiny_unet()
    expected = [n for n, m in unet.named_modules() if isinstance(m, nn.Linear)
                and n.split(".")[-1] in ("to_q", "to_k", "to_v") or n.endswith(".to_out.0")]
    linears = sum(isinstance(m, nn.Linear) for m in unet.modules())
    x = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    before, layers = unet(*x).sample, b4m.add_plp(unet, 4, 0)
    # 4 transformer blocks (down 1, mid 1, up 2) x 2 attentions (self, cross) x 4 projections
    assert sorted(layers) == sorted(expected) and len(layers) == 32
    assert {n for n, m in unet.named_modules() if isinstance(m, b4m.PLPLinear)} == set(expected)
    assert sum(isinstance(m, nn.Linear) for m in unet.modules()) == linears  # bases kept inside
    after = unet(*x).sample
    assert after.shape == before.shape and not torch.equal(after, before)  # A C, A D != 0
    b4m.remove_plp(unet)
    assert torch.equal(unet(*x).sample, before)
    same, other = b4m.add_plp(tiny_unet(), 4, 0), b4m.add_plp(tiny_unet(), 4, 1)
    first, second = list(layers.values())[:2]  # per (seed, layer name): each layer its own draw
    assert all(torch.equal(getattr(t, k), getattr(same[n], k)) and not torch.equal(
        t.A, other[n].A) for n, t in layers.items() for k in "ACD") and list(same) == list(layers)
    assert not torch.equal(first.A[:2], second.A[:2])
def test_riemannian_adamw_is_adamw_on_preconditioned_gradients_batched_over_any_widths():
    shapes = [(12, 10, 4, 1), (11, 10, 4, 2), (12, 10, 4, 3), (8, 6, 3, 4)]
    layers, twins = ([plp(m, n, r, seed) for m, n, r, seed in shapes] for _ in range(2))
    ours = b4m.RiemannianAdamW(layers, lr=1e-2, weight_decay=0.1, delta=1e-6)
    assert sorted(len(group) for group in ours.same_shape.values()) == [1, 1, 2]
    ref = torch.optim.AdamW([p for t in twins for p in (t.B, t.D)], lr=1e-2, weight_decay=0.1)
    for step in range(5):
        for group in (layers, twins):
            with torch.no_grad():  # nothing cached: A and C as they are at each step
                group[0].A.mul_(1.1), group[0].C.add_(0.1)
            torch.manual_seed(step)
            sum(t(torch.randn(3, t.base.in_features, dtype=F64)).sin().sum()
                for t in group).backward()
        for t in twins:  # preconditioned one layer at a time, unbatched
            with torch.no_grad():
                t.B.grad, t.D.grad = b4m.riemannian_precondition(t.U, t.V, t.B.grad, t.D.grad)
        ours.step(), ref.step()
        assert close([g for t in layers for g in (t.B.grad, t.D.grad, t.B, t.D)],
                     [g for t in twins for g in (t.B.grad, t.D.grad, t.B, t.D)])
        ours.zero_grad(), ref.zero_grad()
    with pytest.raises(ValueError, match="needs the gradients before the step"):
        ours.step(lambda: 0.0)
def test_gradient_clipping_bounds_each_half_and_zero_turns_it_off(monkeypatch):
    def norms(limit):  # each half's gradient norm as the optimizer (lr 0) is asked to step
        layers, seen = b4m.add_plp(net := toy_denoiser(), 3, 0).values(), []
        halves = [[t.D for t in layers], [t.B for t in layers]]
        opt = torch.optim.SGD([{"params": h} for h in halves], lr=0.0)
        monkeypatch.setattr(opt, "step", lambda: seen.extend(
            torch.stack([p.grad.norm() for p in h]).norm().item() for h in halves))
        (1e6 * toy_loss(net)(toy_sets()).sum()).backward()
        b4m.clip_and_step(opt, b4m.loss_scaler(net), limit)
        assert all(p.grad is None for h in halves for p in h)  # None, not zero, afterwards
        return seen
    assert all(n > 1e3 for n in norms(0)) and norms(0) == norms(1e30)  # 0: off
    assert norms(1.0) == pytest.approx([1.0, 1.0], rel=1e-5)
def test_the_method_needs_torch_alone_and_b4m_py_refuses_a_bad_flag_first(monkeypatch, capsys):
    for name in ("PIL", "safetensors", "tqdm", "diffusers", "transformers", "peft"):
        monkeypatch.setitem(sys.modules, name, None)  # any import of these now fails
    spec = importlib.util.spec_from_file_location("b4m_alone", ROOT / "b4m.py")
    spec.loader.exec_module(alone := importlib.util.module_from_spec(spec))
    net, (content, style, *aux) = toy_denoiser(), toy_sets()
    kw = dict(rank=3, seed=0, steps=2, lr=1e-2)
    halves = [alone.break_stage(stage, net, toy_loss(net), content, style, aux, aux_lr=1e-3,
                                **kw)[0] for stage in ("content", "style")]
    made, log = alone.make_stage(net, toy_loss(net), content, style, *halves, **kw)
    assert [row[0] for row in log] == [1, 2] and sorted(made) == ["attn.to_k", "attn.to_q"]
    assert alone.main(["--content", "c", "--style", "s", "--seed", "-1"]) == 2
    assert capsys.readouterr().err == ("b4m: error: argument --seed: must be a whole number from "
                                       "0 to 2^64 - 1, got '-1'\n")
    lines = (ROOT / "b4m.py").read_text().splitlines()  # and it reads in 100 columns
    assert [i + 1 for i, line in enumerate(lines) if len(line) > 100] == []

# 4.-6. Break, make, sample, end to end on the tiny pipelines, saved and loaded back as folders ---

SD = ["--rank", "4", "--resolution", "64", "--grad-accum", "1", "--sample-steps", "2"]
FAST = [*SD, "--steps", "2", "--make-steps", "1", "--num-samples", "1"]
RESUMABLE = [*SD, "--steps", "4", "--make-steps", "4", "--checkpoint-every", "2", "--num-samples=2"]
FLOW = [*FAST, "--steps", "4", "--make-steps", "2", "--checkpoint-every", "2",
        "--sample-resolution", "64"]  # FLUX's own sample size is not saved with the pipeline
KINDS, STAGES = ("sd", "sdxl", "sd3", "flux"), ("content", "style", "b4m")
ADAPTERS = [f"{s}/{n}" for s in STAGES for n in (b4m.WEIGHTS, f"{s}_kohya.safetensors")]
@pytest.fixture(scope="session")
def models(tmp_path_factory):
    root, pipe = tmp_path_factory.mktemp("models"), tiny.tiny_pipeline("sd")
    for kind in KINDS:
        tiny.tiny_pipeline(kind).save_pretrained(root / kind)
    pipe.scheduler.register_to_config(prediction_type="v_prediction")  # as SD 2.x
    pipe.save_pretrained(root / "vpred")
    return {kind: root / kind for kind in (*KINDS, "vpred")}
def cli(out, model, *flags, content=EXAMPLES / "content", style=EXAMPLES / "style"):
    return ["--content", content, "--style", style, "--model", model, "--out", out, *flags]
def run(capsys, argv, code):  # b4m.main's stderr, once it returned `code`
    got = b4m.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert got == code, err
    return err
def ok(capsys, argv):
    return run(capsys, argv, 0)
def error(capsys, argv):  # the last line of a refusal
    return run(capsys, argv, 2).strip().splitlines()[-1]
def adapter(path):  # {layer: (U, V)} of an adapter file, as stored
    from safetensors.torch import load_file
    sd = load_file(str(path))
    return {k.split(".", 1)[1][:-len(".lora_B.weight")]: (v, sd[k.replace("lora_B", "lora_A")])
            for k, v in sd.items() if k.endswith(".lora_B.weight")}
def adapters(out):
    return [adapter(Path(out) / s / b4m.WEIGHTS) for s in STAGES]
def meta(path):
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["b4m"])
def strict_json(path):
    def refuse(constant):
        raise ValueError(f"{path}: {constant} is not JSON")
    return json.loads(Path(path).read_text(), parse_constant=refuse)
def same(a, b):  # {name: tensor or (U, V)}, bit for bit
    def flat(d):
        return [t for k in sorted(d) for t in (d[k] if isinstance(d[k], tuple) else (d[k],))]
    return a.keys() == b.keys() and all(torch.equal(x, y) for x, y in zip(flat(a), flat(b)))
def halves(adapter, i):  # block i of (A, B, C, D) of every layer
    return {name: b4m.halves(U, V)[i] for name, (U, V) in adapter.items()}
def files(out, names=None):  # the bytes of a run's outputs: adapters, losses, samples
    names = names or [*ADAPTERS, "losses.csv", *(
        f"samples/{p.name}" for p in (Path(out) / "samples").glob("*.png"))]
    return {n: (Path(out) / n).read_bytes() for n in sorted(names)}
def snapshot(folder):
    return {p: p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}
def finished(models, tmp_path_factory, flags, umask=0o022):
    out, old = tmp_path_factory.mktemp("run") / "run", os.umask(umask)
    try:
        assert b4m.main(list(map(str, cli(out, models["sd"], *flags)))) == 0
    finally:
        os.umask(old)
    return out
@pytest.fixture(scope="session")
def ref(models, tmp_path_factory):  # a run with checkpoints, the never-stopped reference
    return finished(models, tmp_path_factory, RESUMABLE, umask=0o027)
@pytest.fixture(scope="session")
def fast(models, tmp_path_factory):  # a short run, the base of the runs that change one thing
    return finished(models, tmp_path_factory, FAST)
def test_a_run_writes_every_output_in_valid_files_with_one_scaffold(ref, models):
    listing = {p.relative_to(ref).as_posix() for p in ref.rglob("*") if p.is_file()}
    assert listing == {*ADAPTERS, ".b4m.lock", "config.json", "losses.csv", "report.json",
                       "samples/grid.png", *(f"samples/{s}_{i}.png" for s in STAGES for i in "01")}
    assert {stat.S_IMODE((ref / p).stat().st_mode) for p in listing} == {0o640}  # umask 027
    config, report = strict_json(ref / "config.json"), strict_json(ref / "report.json")
    s = config["settings"]  # paths absolute, dtype auto resolved (fp32 on the CPU)
    assert (s["rank"], s["content"], s["model"], s["dtype"], s["sample_resolution"]) == (
        4, str((EXAMPLES / "content").resolve()), str(models["sd"]), "fp32", 64)
    assert s["content_prompt"] == (EXAMPLES / "content" / "prompt.txt").read_text().strip()
    assert set(config["versions"]) == {"b4m", "torch", "diffusers", "transformers"} and list(
        report) == ["seconds"] and list(report["seconds"]) == list(STAGES)
    rows = [r.split(",") for r in (ref / "losses.csv").read_text().splitlines()]
    assert rows[0] == ["stage", "step", "loss", "aux_loss"]
    assert [r[:2] for r in rows[1:]] == [[s, str(i)] for s in STAGES for i in range(1, 5)]
    assert all(r[3] for r in rows[1:9]) and not any(r[3] for r in rows[9:])  # aux: break only
    assert meta(ref / "b4m" / b4m.WEIGHTS) == {
        "stage": "b4m", "method": "b4m", "rank": 4, "seed": 0, "prior": "orthogonal",
        "base_model": str(models["sd"]), "version": b4m.__version__}
    content, style, made = adapters(ref)
    assert len(made) == 32 and made.keys() == content.keys() == style.keys()
    assert all(same(halves(a, i), halves(style, i)) for a in (content, made) for i in (0, 2))
    start = b4m.reassemble(content, style)  # U = [A; B_style], V = [C, D_content]
    assert same(start, {n: (style[n][0], content[n][1]) for n in made})
    for i in (1, 3):  # make moved both halves of every layer
        assert not any(torch.equal(halves(made, i)[n], halves(start, i)[n]) for n in made)
    for U, V in made.values():
        A, B, C, D = (t.double() for t in b4m.halves(U, V))  # the orthogonal prior
        assert torch.allclose(A.T @ A + C @ C.T, torch.eye(4, dtype=F64), atol=1e-6)
def unet_with(pipe, *folders, **kw):  # the UNet's output, as it is and with each LoRA folder
    g, cond = torch.Generator().manual_seed(0), b4m.encode_prompts(pipe, ["a snq object"] * 2, 64)
    args = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    kwargs = dict(encoder_hidden_states=cond.pop("encoder_hidden_states"),
                  added_cond_kwargs=cond or None)
    with torch.no_grad():
        yield pipe.unet(*args, **kwargs).sample
        for folder in folders:
            pipe.load_lora_weights(str(folder), **kw)  # the path any diffusers user takes
            yield pipe.unet(*args, **kwargs).sample
            pipe.unload_lora_weights()
def test_sdxl_aux_sets_and_adapters_in_diffusers_equal_the_plp_model(ref, models, tmp_path, capsys):
    from safetensors.torch import load_file
    ok(capsys, cli(tmp_path / "xl", models["sdxl"], *FAST, "--batch-size", "2", "--grad-accum",
                   "2", "--aux-style", EXAMPLES / "style", EXAMPLES / "content", "--aux-content",
                   EXAMPLES / "toy_content"))
    for kind, folder in (("sd", ref / "b4m"), ("sdxl", tmp_path / "xl" / "b4m")):
        pipe = b4m.load_pipeline(str(models[kind]), "cpu", torch.float32)
        (base, theirs), (_, kohya) = (list(unet_with(pipe, folder, weight_name=name)) for name
                                      in (b4m.WEIGHTS, "b4m_kohya.safetensors"))  # ComfyUI, A1111
        b4m.load_blocks(layers := b4m.add_plp(pipe.unet, 4, 0), adapter(folder / b4m.WEIGHTS))
        (ours,) = unet_with(pipe)
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)
        assert torch.allclose(kohya, theirs, atol=1e-6, rtol=0)
        assert not torch.allclose(ours, base, atol=1e-3)
        sd = load_file(str(folder / "b4m_kohya.safetensors"))
        names = {k.split(".")[0] for k in sd}  # alpha = rank: scale 1
        assert len(names) == len(layers) and {sd[f"{n}.alpha"].item() for n in names} == {4}
        assert all(re.fullmatch(r"lora_unet_[a-z0-9_]+_to_(q|k|v|out_0)", n) for n in names)

# Bad input: one line naming the flag or file, exit 2, before any model loads -------------------
RULES = {"I": "a whole number > 0", "S": "a whole number >= 0", "P": "a number > 0",
         "N": "a number >= 0", "F": "a finite number", "8": "a positive multiple of 8",
         "R": "a whole number from 0 to 2^64 - 1"}
NUMBERS = ("--rank 0 I, --batch-size 0 I, --grad-accum 0 I, --num-samples 0 I, --sample-steps 0 I,"
           " --steps -1 S, --make-steps -5 S, --checkpoint-every -1 S, --resolution 60 8,"
           " --sample-resolution 0 8, --lr 0 P, --lr inf P, --aux-lr -1e-5 P, --make-lr nan P,"
           " --style-lr -1 P, --prior-scale inf P, --prior-scale 0 P, --content-scale nan F,"
           " --style-scale -inf F, --guidance inf N, --sample-guidance nan N,"
           " --max-grad-norm -1 N, --seed -1 R, --seed 18446744073709551616 R")
FOLDERS = ("content missing: cannot read it (No such file or directory); content a_file: cannot"
           " read it (Not a directory); content empty: no readable image (.png; content corrupt:"
           " no readable image; content empty_prompt/prompt.txt: empty; content"
           " latin1/prompt.txt: not UTF-8 text; aux-content missing: cannot read it; model"
           " missing: no diffusers pipeline there; model not_a_pipeline: no diffusers pipeline")
def bad_input(tmp, models):  # (argv, the words of its one line): numbers, folders, models, --out
    from diffusers import StableDiffusionImg2ImgPipeline
    for name in ("empty", "not_a_pipeline", "corrupt", "user"):
        (tmp / name).mkdir()
    (tmp / "a_file").write_text("x")
    (tmp / "user" / "notes.txt").write_text("mine")  # a folder of the user's, no b4m run
    (tmp / "corrupt" / "zero.png").write_bytes(b"")
    for name, text in (("no_prompt", None), ("empty_prompt", "  \n"), ("latin1", "poupée")):
        shutil.copytree(EXAMPLES / "content", tmp / name)
        (tmp / name / "prompt.txt").unlink() if text is None else (
            tmp / name / "prompt.txt").write_bytes(text.encode("latin-1"))
    content, style = (shutil.copytree(EXAMPLES / k, tmp / k) for k in ("content", "style"))
    img2img, most = tmp / "img2img", "this model's smallest attention layer allows"
    StableDiffusionImg2ImgPipeline(**tiny.tiny_pipeline("sd").components).save_pretrained(img2img)
    merge, home = ["--baseline", "lora-merge"], Path.home().resolve()
    return [([f"{f}={v}"], [f"argument {f}: must be {RULES[r]}, got '{v}'"])
            for f, v, r in (c.split() for c in NUMBERS.split(", "))] + [
        ([f"--{flag}", tmp / name.split("/")[0]], [f"--{flag} {tmp / name}: {words}"])
        for flag, name, words in (re.fullmatch(r"(\S+) ([^:]+): (.*)", c).groups()
                                  for c in FOLDERS.split("; "))] + [
        (["--content-prompt", " "], ["--content-prompt: empty"]),
        (["--aux-style", tmp / "no_prompt"], ["--aux-style", "no_prompt: no prompt.txt"]),
        (["--model", "nobody/no-such-model"], ["--model nobody/no-such-model: no diffusers"]),
        (["--model", img2img], [f"--model {img2img}: a StableDiffusionImg2ImgPipeline; b4m needs"
                                " an SD 1.x/2.x, SDXL, SD3/SD3.5 or FLUX.1 text-to-image"]),
        (["--rank", "49"], [f"--rank 49: {most} 48"]),
        (["--model", models["sd3"], "--rank", "33"], [f"--rank 33: {most} 32"]),
        (["--model", models["flux"], "--rank", "33"], [f"--rank 33: {most} 32"]),
        (["--device", "cpu", "--dtype", "fp16"], ["--dtype fp16: not supported on the CPU"]),
        (["--out", tmp / "a_file"], [f"--out {tmp / 'a_file'}: is a file"]),
        (["--out", "/"], ["--out /: a filesystem root or the home folder"]),
        (["--out", home], [f"--out {home}: a filesystem root or the home folder"]),
        (["--out", tmp / "user"], [f"--out {tmp / 'user'}: holds files and no b4m run"]),
        (["--content", content, "--out", content], [f"overlaps the --content folder {content}"]),
        (["--content", content, "--out", content / "run"], ["pick a folder outside every input"]),
        (["--style", style, "--out", tmp], [f"--out {tmp}: overlaps the --style folder {style}"]),
        (["--aux-style", style, "--out", style / "x"], ["overlaps the --aux-style folder"]),
        (["--out", models["sd"] / "run"], [f"overlaps the --model folder {models['sd']}"]),
        ([*merge, "--style-scale", "0.5"], ["--style-scale: only for B4M runs, not --baseline"]),
        ([*merge, "--prior-scale", "2"], ["--prior-scale: only for B4M runs"]),
        ([*merge, "--aux-style", style], ["--aux-style: only for B4M runs"])] + [
        (["--device", "cuda"], ["--device cuda: not available"])] * (not torch.cuda.is_available())
@pytest.fixture
def no_model_load(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(b4m, "load_pipeline", lambda *a: pytest.fail("a model was loaded"))
def test_bad_input_is_one_line_exit_2_before_any_model_loads(models, tmp_path, capsys,
                                                            no_model_load, monkeypatch):
    cases, unreadable = bad_input(tmp_path, models), tmp_path / "unreadable"
    shutil.copytree(EXAMPLES / "content", unreadable).chmod(0)
    if os.access(unreadable, os.R_OK):  # root reads anything: refuse as the system would
        iterdir = Path.iterdir
        monkeypatch.setattr(Path, "iterdir", lambda self: iterdir(self) if self != unreadable
                            else (_ for _ in ()).throw(PermissionError(errno.EACCES, "x")))
    cases = [(cli(tmp_path / "out", models["sd"], "--rank", "4", *argv), words) for argv, words
             in [*cases, (["--content", unreadable], [f"--content {unreadable}: cannot read it"])]]
    user, _ = snapshot(tmp_path / "user"), capsys.readouterr()
    sample = [(["sample", "--run", tmp_path / "user"], ["no b4m config.json"]),
              (["sample", "--run", tmp_path, "--seed", "-1"], ["argument --seed: must be a"]),
              (["sample", "--run", tmp_path, "--sample-guidance=inf"], ["--sample-guidance"])]
    try:
        for argv, words in cases + sample:
            err = run(capsys, argv, 2)
            lines = [line for line in err.splitlines() if not line.startswith("warning: ")]
            assert len(lines) == 1 and lines[0].startswith("b4m: error: "), err
            assert all(str(w) in lines[0] for w in words), (words, lines[0])
            assert not (tmp_path / "out").exists()
    finally:
        unreadable.chmod(0o755)
    assert snapshot(tmp_path / "user") == user and len(cases) == 55
@pytest.mark.parametrize("flag", ["--no-mcp", "--no-orth-prior", "--no-precondition"])
def test_the_baseline_refuses_the_ablation_switches(models, tmp_path, capsys, no_model_load, flag):
    assert error(capsys, cli(tmp_path, models["sd"], "--baseline", "lora-merge", flag)) == (
        f"b4m: error: {flag}: only for B4M runs, not --baseline lora-merge")

# Never lose or silently change the user's work -------------------------------------------------
def test_only_resume_or_overwrite_touch_a_run_one_process_at_a_time(fast, models, tmp_path, capsys):
    out = Path(shutil.copytree(fast, tmp_path / "run"))
    argv, before, settings = cli(out, models["sd"], *FAST), snapshot(out), argparse.Namespace(
        **strict_json(out / "config.json")["settings"])
    for flags, line in (
            ([], f"--out {out}: already holds a run; pass --resume to continue it, --overwrite "
                 "to replace it, or another --out"),
            (["--resume", "--rank", "2", "--max-grad-norm", "0"], f"settings differ from the run "
             f"in {out}: rank (was 4, now 2), max_grad_norm (was 1.0, now 0.0)")):
        assert error(capsys, [*argv, *flags]).endswith(line)
    with open(out / b4m.LOCK) as held:  # as a second b4m process holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        for command in ([*argv, "--resume"], ["sample", "--run", out]):
            assert error(capsys, command) == (f"b4m: error: --out {out}: another b4m process is "
                                              "using this run; wait for it to finish, or pick "
                                              "another --out")
    assert snapshot(out) == before
    made = adapters(out)[2]
    for bad, changed, words in [  # adapters for another model, rank or method
            (b4m.adapter_of(b4m.add_plp(tiny_unet(), 2, 0)), {"rank": 2}, "made with rank=2, "
             "this run has rank=4"), (made, {"method": "lora-merge"}, "method=lora-merge"),
            ({**made, "x.to_q": [t.clone() for t in made[min(made)]]}, {}, "has an unknown key "
             "unet.x.to_q.lora_A.weight; the adapter was made for another model"),
            ({k: (U, torch.zeros(4, 7)) for k, (U, V) in made.items()}, {}, "V (4, 7)")]:
        b4m.save_lora(out / "b4m", bad, "unet", {**b4m.adapter_metadata(settings, "make"),
                                                **changed})
        assert words in error(capsys, ["sample", "--run", out])
    (out / "b4m" / b4m.WEIGHTS).unlink()
    err = ok(capsys, [*argv, "--resume"])
    assert "content: kept" in err and "style: kept" in err
    assert files(out) == files(fast)  # the same make, redone; the same losses and samples
    assert list(strict_json(out / "report.json")["seconds"]) == list(STAGES)
    content, style, _ = adapters(out)
    ok(capsys, [*argv, "--resume", "--make-steps", "0"])  # instant make: exact reassembly
    assert same(adapters(out)[2], b4m.reassemble(content, style))
    assert "style: kept" in ok(capsys, [*argv, "--resume", "--no-precondition"])  # make alone
    assert files(out, ADAPTERS[:4]) == files(fast, ADAPTERS[:4])
    assert not same(adapters(out)[2], adapters(fast)[2])
    argv += ["--style-lr", "1e-2"]  # the style stage's own: content is kept
    err = ok(capsys, [*argv, "--resume"])
    assert "content: kept" in err and "style: kept" not in err
    assert files(out, ADAPTERS[:2]) == files(fast, ADAPTERS[:2])
    assert not same(adapters(out)[1], adapters(fast)[1])
    assert [settings.style_lr, *(strict_json(out / "config.json")["settings"][k] for k in (
        "lr", "style_lr"))] == [1e-4, 1e-4, 1e-2]  # --style-lr's default: --lr
    (out / "b4m" / b4m.WEIGHTS).unlink()
    torch.save([1, 2], out / "b4m" / b4m.CHECKPOINT)  # loads, but is no b4m checkpoint
    assert error(capsys, [*argv, "--resume"]).startswith(
        f"b4m: error: {out / 'b4m' / b4m.CHECKPOINT}: not a readable b4m checkpoint")
    (out / "losses.csv").unlink()
    assert error(capsys, [*argv, "--resume"]) == (
        f"b4m: error: --resume: {out / 'losses.csv'} is missing, and with it the finished "
        "stages' losses; use --overwrite to train again")
def test_overwrite_keeps_user_files_nan_and_full_disk_stop(fast, models, tmp_path, capsys,
                                                           monkeypatch):
    out, fsync = Path(shutil.copytree(fast, tmp_path / "run")), os.fsync
    argv, mine = cli(out, models["sd"], *FAST), {out / "notes.txt": b"mine",
                                                 out / "samples" / "mine.png": b"png"}
    [path.write_bytes(data) for path, data in mine.items()]
    assert error(capsys, [*argv, "--overwrite", "--lr", "1e30"]).startswith(
        "b4m: error: content stage, step 2: the loss is not finite")
    assert list(out.rglob("*.safetensors")) == [] and list(out.rglob("*.png")) == [
        out / "samples" / "mine.png"]
    assert error(capsys, [*argv, "--resume", "--make-lr", "1e30", "--make-steps", "2"]).startswith(
        "b4m: error: make stage, step 2: the loss is not finite")
    assert [p.parent.name for p in sorted(out.rglob(b4m.WEIGHTS))] == ["content", "style"]
    assert "style: kept" in ok(capsys, [*argv, "--resume"])
    assert files(out, files(fast)) == files(fast)  # same seed, same bytes
    assert all(path.read_bytes() == data for path, data in mine.items())
    def full_disk(fd):  # no space left while the style adapter is written
        if "/style/" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)
    monkeypatch.setattr(os, "fsync", full_disk)
    assert error(capsys, [*argv, "--overwrite", "--steps", "1"]) == (
        f"b4m: error: {out / 'style' / 'style_kohya.safetensors'}: cannot write (No space left on "
        "device); free some space or write elsewhere")
    assert {p.relative_to(out).as_posix() for p in out.rglob("*.safetensors")} == {*ADAPTERS[:2]}
    assert not [p for p in out.rglob("*") if ".tmp" in p.name or p.parent.name == "style"]
class Killed(BaseException):  # kill -9 in this process: nothing catches it, nothing more written
    pass
def at_step(mp, stage, step, action):  # action() after `stage`'s step `step`, before on_step
    def wrap(real, make):
        def stage_fn(*a, on_step, **kw):
            def hooked(n, *rest):
                if ("make" if make else a[0], n) == (stage, step):
                    action()
                on_step(n, *rest)
            return real(*a, on_step=hooked, **kw)
        return stage_fn
    for name in ("break_stage", "make_stage"):
        mp.setattr(b4m, name, wrap(getattr(b4m, name), name == "make_stage"))
def kill():
    raise Killed
KILLER = r"""
import os, sys, time, b4m
real, fsync, now = b4m.make_stage, os.fsync, []
def make_stage(*a, on_step, **kw):
    return real(*a, on_step=lambda step, *r: (now.append(step), on_step(step, *r)), **kw)
def half_then_wait(fd):  # make's checkpoint of step 2 half written: wait there for kill -9
    if now[-1:] == [2] and ".checkpoint.pt.tmp" in os.readlink(f"/proc/self/fd/{fd}"):
        os.ftruncate(fd, os.fstat(fd).st_size // 2)
        print("half written", file=sys.stderr, flush=True)
        time.sleep(300)
    fsync(fd)
b4m.make_stage, os.fsync = make_stage, half_then_wait
sys.exit(b4m.main(sys.argv[1:]))
"""

def test_killed_or_stopped_anywhere_a_run_resumes_byte_identical(ref, models, tmp_path, capsys):
    out, again = tmp_path / "run", "run the same command with --resume"
    argv = list(map(str, [*cli(out, models["sd"], *RESUMABLE), "--resume"]))
    path = {s: out / b4m.NAMES[s] / b4m.CHECKPOINT for s in b4m.STAGES}
    signals = lambda *signums: lambda: [os.kill(os.getpid(), s) for s in signums]  # noqa: E731
    for stage, step, action, code, saved, line in [
            ("content", 3, kill, None, {"content": 2}, None), ("style", 1, kill, None, {}, None),
            ("style", 3, signals(signal.SIGTERM), 143, {"style": 3},
             f"stopped in the style stage after step 3, saved in {path['style']}; {again}"),
            ("make", 1, signals(signal.SIGINT, signal.SIGINT), 130, {},  # Ctrl-C twice: at once
             f"stopped at once; what was saved is kept: {again}"),
            ("make", 1, signals(signal.SIGINT), 130, {"make": 1},
             f"stopped in the make stage after step 1, saved in {path['make']}; {again}")]:
        killed = pytest.raises(Killed) if code is None else contextlib.nullcontext()
        with pytest.MonkeyPatch.context() as mp, killed:
            at_step(mp, stage, step, action)
            assert b4m.main(argv) == code
        assert line is None or capsys.readouterr().err.strip().splitlines()[-1] == f"b4m: {line}"
        assert {s: torch.load(p, weights_only=True)["step"] for s, p in path.items()
                if p.exists()} == saved
    p = subprocess.Popen(  # kill -9 from outside, in mid-write of make's checkpoint, lock held
        [sys.executable, "-c", KILLER, *argv], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        seen = ""
        while "half written" not in seen:
            seen += p.stderr.readline()
            assert p.poll() is None, seen
        with open(out / b4m.LOCK) as lock, pytest.raises(BlockingIOError):
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        p.kill()
    assert p.wait() == -signal.SIGKILL and "make: continuing from step 1" in seen
    assert torch.load(path["make"], weights_only=True)["step"] == 1
    assert [t.name for t in (out / "b4m").iterdir() if ".tmp" in t.name]  # the half file
    with open(out / b4m.LOCK) as lock:  # the dead process's lock is gone; now this one holds it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert "another b4m process is using this run" in error(capsys, argv)
    err = ok(capsys, argv)
    assert "content: kept" in err and "style: kept" in err and "make: continuing from step 1" in err
    assert files(out) == files(ref)
    assert [p for p in out.rglob("*") if ".tmp" in p.name or p.name == b4m.CHECKPOINT] == []
def test_sampling_again_swaps_in_new_samples_once_all_are_made(ref, tmp_path, capsys, monkeypatch):
    from diffusers import StableDiffusionPipeline as Pipe
    run, calls, call = Path(shutil.copytree(ref, tmp_path / "run")), [], Pipe.__call__
    monkeypatch.setattr(Pipe, "__call__", lambda p, *a, **kw: calls.append(kw) or call(p, *a, **kw))
    (run / "samples" / "mine.png").write_bytes(b"mine")
    (run / "samples" / "b4m_0.png").unlink()
    ok(capsys, ["sample", "--run", run])  # the run's own settings: its samples again, bit for bit
    assert files(run, files(ref)) == files(ref) and calls[0]["num_inference_steps"] == 2
    assert "guidance_scale" not in calls[0]  # the pipeline's own default
    write, calls[:] = b4m.write_file, []
    def write_file(path, data):  # the old samples are all there while the new ones are written
        assert (run / "samples" / "b4m_1.png").exists()
        write(path, data)
    monkeypatch.setattr(b4m, "write_file", write_file)
    ok(capsys, ["sample", "--run", run, "--num-samples", "1", "--seed", "5", "--sample-steps", "3",
                "--sample-guidance", "0", "--sample-resolution", "32"])
    assert [(c["num_inference_steps"], c["guidance_scale"], c["height"], c["num_images_per_prompt"])
            for c in calls] == [(3, 0.0, 32, 1)] * 3
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "b4m_0.png", "content_0.png", "grid.png", "mine.png", "style_0.png"]
    assert struct.unpack(">II", (run / "samples" / "grid.png").read_bytes()[16:24]) == (32, 96)
    assert files(run, ["samples/b4m_0.png"]) != files(ref, ["samples/b4m_0.png"])  # seed 5
    monkeypatch.setattr(b4m, "write_file", write)
    before, generate, calls[:] = snapshot(run / "samples"), b4m.generate, []
    def failing(*a, **kw):  # the second row fails (out of memory, say)
        if len(calls) == 1:
            raise b4m.UsageError("out of memory")
        return generate(*a, **kw)
    monkeypatch.setattr(b4m, "generate", failing)
    assert error(capsys, ["sample", "--run", run]) == "b4m: error: out of memory"
    assert snapshot(run / "samples") == before  # the previous samples, untouched
    monkeypatch.setattr(b4m, "generate", generate)
    x = tmp_path / "export"
    ok(capsys, ["sample", "--run", run, "--content-scale", "0.5", "--style-scale", "1.5",
                "--export", x, "--num-samples", "1"])
    assert sorted(p.name for p in x.iterdir()) == sorted([b4m.WEIGHTS, "b4m_kohya.safetensors"])
    assert same(adapter(x / b4m.WEIGHTS), b4m.reassemble(*adapters(ref)[2:] * 2, 0.5, 1.5))
    assert [meta(x / b4m.WEIGHTS)[k] for k in ("content_scale", "style_scale")] == [0.5, 1.5]
    assert "a stage folder of the run" in error(capsys, ["sample", "--run", run, "--export",
                                                         run / "b4m"])

# Beyond the paper: ablations, the baseline, precision ------------------------------------------
def merged_is_the_sum(out, rank=4):  # a lora-merge run's made adapter: U_c V_c + U_s V_s
    content, style, made = adapters(out)
    for name, (U, V) in made.items():
        (Uc, Vc), (Us, Vs) = content[name], style[name]
        assert U.shape[1] == 2 * rank and Uc.shape[1] == rank
        assert torch.allclose(U @ V, Uc @ Vc + Us @ Vs, atol=1e-6)
    assert meta(out / "b4m" / b4m.WEIGHTS)["method"] == "lora-merge"
    return made
def test_ablations_the_baseline_and_precision_change_what_they_name(fast, models, tmp_path, capsys):
    init, plain = b4m.adapter_of(b4m.add_plp(tiny_unet(), 4, 0)), adapters(fast)
    odd = Path(shutil.copytree(EXAMPLES / "content", tmp_path / "odd"))  # a hand-made folder:
    broken = {odd / "zero.png": b"", odd / "text.JPG": b"not an image", odd / "half.png": (
        odd / "bear_0.png").read_bytes()[:200], odd / "prompt.txt": "a snq\r\n".encode("utf-8-sig")}
    [path.write_bytes(data) for path, data in broken.items()]  # a prompt.txt as Notepad saves
    err = {flags[-1]: ok(capsys, cli(tmp_path / flags[-1], models["sd"], *FAST, *flags,
                                     content=odd if "--no-mcp" in flags else EXAMPLES / "content"))
           for flags in (["--no-orth-prior"], ["--no-mcp"], ["--prior-scale", "0.5"], ["--baseline",
                         "lora-merge"], ["--gradient-checkpointing"], ["--dtype", "bf16"],
                         ["--save-dtype", "fp16"])}["--no-mcp"]
    assert sorted(re.findall(r"warning: skipping (.*): not a readable image", err)) == sorted(
        str(p) for p in list(broken)[:3]) and strict_json(tmp_path / "--no-mcp" / "config.json")[
        "settings"]["content_prompt"] == "a snq"  # named and skipped; no BOM, no CR
    ok(capsys, cli(tmp_path / "v", models["vpred"], *FAST))  # the same weights, v-prediction
    run = {p.name: adapters(p) for p in tmp_path.iterdir() if p.name != "odd"}
    assert same(halves(run["v"][0], 0), halves(plain[0], 0)) and not same(run["v"][0], plain[0])
    for U, V in run["--no-orth-prior"][2].values():
        A, _, C, _ = (t.double() for t in b4m.halves(U, V))
        assert not torch.allclose(A.T @ A + C @ C.T, torch.eye(4, dtype=F64), atol=1e-2)
    content, style, _ = run["--no-mcp"]  # no auxiliary loss: the other half stays as drawn
    assert not any(B.any() for B in halves(content, 1).values())  # content stage: B = 0
    assert same(halves(style, 3), halves(init, 3)) and not same(halves(content, 3), halves(init, 3))
    for scaled, ref in zip(run["0.5"], plain):  # A and C, frozen: half the official ones
        assert all(torch.equal(x, 0.5 * halves(ref, i)[n]) for i in (0, 2)
                   for n, x in halves(scaled, i).items())
    merged_is_the_sum(tmp_path / "lora-merge")
    for a, b in zip(plain, run["--gradient-checkpointing"]):  # recomputation, not approximation
        assert close([t for k in a for t in a[k]], [t for k in b for t in b[k]], atol=1e-6)
    assert not same(run["bf16"][0], plain[0]) and {t.dtype for uv in run["bf16"][0].values()
                                                   for t in uv} == {torch.float32}  # fp32 halves
    for a, b in zip(plain[:2], run["fp16"][:2]):  # break's files: fp16 copies of fp32's
        assert same(b, {k: (U.half(), V.half()) for k, (U, V) in a.items()})
    assert close([t.float() for uv in run["fp16"][2].values() for t in uv],  # make: fp16 start
                 [t.half().float() for uv in plain[2].values() for t in uv], atol=2e-3)
    pipe = b4m.load_pipeline(str(models["sd"]), "cpu", torch.float32)
    base, fp32, fp16, merged = unet_with(pipe, fast / "b4m", tmp_path / "fp16" / "b4m",
                                         tmp_path / "lora-merge" / "b4m")  # the last: rank 8
    assert torch.allclose(fp32, fp16, atol=1e-2) and not torch.equal(fp32, fp16)
    assert not torch.allclose(merged, base, atol=1e-6)

# SD3 and FLUX: the flow-matching transformers ------------------------------------------------
# Every attention projection of the tiny transformers: SD3's 2 joint blocks (the last one is
# context_pre_only: no to_add_out), FLUX's joint block and its single block (to_q/k/v only).
JOINT = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
         "to_add_out")
FLOW_LAYERS = {"sd3": [f"transformer_blocks.{b}.attn.{m}" for b in (0, 1) for m in JOINT][:-1],
               "flux": [f"transformer_blocks.0.attn.{m}" for m in JOINT]
               + [f"single_transformer_blocks.0.attn.{m}" for m in ("to_q", "to_k", "to_v")]}
@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_flow_models_resume_sample_make_instantly_ablate_and_load(kind, models, tmp_path, capsys):
    from diffusers import DiffusionPipeline
    out, model = tmp_path / "run", models[kind]
    for flag in ("--resolution", "--sample-resolution"):  # SD3, FLUX patch latents 2 x 2
        assert error(capsys, cli(out, model, *FLOW, flag, "72")) == (
            f"b4m: error: {flag} 72: this model needs a multiple of 16")
    argv = list(map(str, [*cli(out, model, *FLOW), "--resume"]))
    with pytest.MonkeyPatch.context() as mp, pytest.raises(Killed):
        at_step(mp, "style", 3, kill)  # killed in the style stage: resumed from its step 2
        b4m.main(argv)
    assert "style: continuing from step 2" in ok(capsys, argv)
    names = [f"{s}/{b4m.WEIGHTS}" for s in STAGES] + ["losses.csv", "samples/grid.png"]
    ok(capsys, cli(tmp_path / "once", model, *FLOW))
    assert files(out, names) == files(tmp_path / "once", names)
    assert all([p.name for p in (out / s).iterdir()] == [b4m.WEIGHTS] for s in STAGES)  # no kohya
    content, style, made = adapters(out)
    assert sorted(made) == sorted(FLOW_LAYERS[kind])
    assert meta(out / "b4m" / b4m.WEIGHTS)["base_model"] == str(model)
    init = b4m.adapter_of(b4m.add_plp((pipe := DiffusionPipeline.from_pretrained(model)
                                       ).transformer, 4, 0))
    b4m.remove_plp(pipe.transformer)
    for a in (content, style, made):  # A and C as drawn, in every file
        assert same(halves(a, 0), halves(init, 0)) and same(halves(a, 2), halves(init, 2))
    if kind == "sd3":  # the last block is context_pre_only: its text queries reach no loss
        name = "transformer_blocks.1.attn.add_q_proj"
        assert all(same({0: a[name]}, {0: init[name]}) for a in (content, style, made))
    W0 = {n: pipe.transformer.get_submodule(n).weight.detach().clone() for n in made}
    pipe.load_lora_weights(str(out / "b4m"))  # the path any diffusers user takes
    pipe.fuse_lora()
    for name, (U, V) in made.items():
        fused = pipe.transformer.get_submodule(name).base_layer.weight
        assert torch.allclose(fused, W0[name] + U @ V, atol=1e-6, rtol=0), name
    ok(capsys, ["sample", "--run", out, "--export", tmp_path / "x", "--style-scale", "0.5"])
    assert [p.name for p in (tmp_path / "x").iterdir()] == [b4m.WEIGHTS]
    assert same(adapter(tmp_path / "x" / b4m.WEIGHTS), b4m.reassemble(made, made, 1.0, 0.5))
    ok(capsys, [*argv, "--make-steps", "0"])  # instant make: exact reassembly
    assert same(adapters(out)[2], b4m.reassemble(content, style))
    short = [*FLOW, "--steps", "1", "--make-steps", "0"]
    ok(capsys, cli(tmp_path / "no-mcp", model, *short, "--no-mcp"))
    assert not any(B.any() for B in halves(adapters(tmp_path / "no-mcp")[0], 1).values())
    ok(capsys, cli(tmp_path / "merge", model, *short, "--baseline", "lora-merge"))
    assert sorted(merged_is_the_sum(tmp_path / "merge")) == sorted(FLOW_LAYERS[kind])
@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_the_flow_matching_loss_equals_a_hand_computation(kind, models):
    # u from the density (SD3: logit-normal, FLUX: uniform), sigma and t at u T, x_t = (1 -
    # sigma) x0 + sigma eps, target eps - x0; FLUX: packed latents, ids, t / 1000, guidance
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline as Flux
    pipe = b4m.load_pipeline(str(models[kind]), "cpu", torch.float32)
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    data = b4m.encode_set(pipe, *(ps := b4m.load_image_set("--content", EXAMPLES / "content", 64)))
    got = b4m.training_loss(pipe, 2, 3.5)([data], torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    i = torch.randint(4, (2,), generator=g)
    x0 = data["mean"][i] + data["std"][i] * torch.randn(data["mean"][i].shape, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    u = (torch.rand(2, generator=g) if kind == "flux"
         else torch.sigmoid(torch.normal(0.0, 1.0, (2,), generator=g)))
    sigma, t = sched.sigmas[(u * 1000).long()].view(-1, 1, 1, 1), sched.timesteps[(u * 1000).long()]
    x_t, text = (1 - sigma) * x0 + sigma * eps, {k: data["cond"][k].expand(
        2, *data["cond"][k].shape[1:]) for k in ("encoder_hidden_states", "pooled_projections")}
    with torch.no_grad():
        if kind == "sd3":
            v = pipe.transformer(hidden_states=x_t, timestep=t, **text).sample
        else:
            v = Flux._unpack_latents(pipe.transformer(
                hidden_states=Flux._pack_latents(x_t, 2, 4, 8, 8), timestep=t / 1000,
                guidance=torch.full((2,), 3.5), **text, txt_ids=torch.zeros(
                    text["encoder_hidden_states"].shape[1], 3),
                img_ids=Flux._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32)).sample,
                64, 64, 8)
        dist = pipe.vae.encode(ps[0]).latent_dist
    assert got.shape == (1,) and torch.allclose(got[0], ((v - eps + x0) ** 2).mean(), atol=1e-6)
    assert torch.equal(data["mean"], (dist.mean - 0.0609) * 1.5035)  # (z - shift) * scale
    assert torch.equal(data["std"], dist.std * 1.5035)
def test_every_kind_loads_frozen_and_encodes_one_prompt_the_same_twice(models):
    for kind in KINDS:
        denoiser, prefix = b4m.denoiser_of(pipe := b4m.load_pipeline(str(models[kind]), "cpu",
                                                                    torch.float32))
        assert prefix == ("unet" if kind in ("sd", "sdxl") else "transformer") and not any(
            p.requires_grad for p in denoiser.parameters()) and not denoiser.training
        a, b = (b4m.encode_prompts(pipe, ["a snq object in w@z style"], 64) for _ in range(2))
        keys = {"sd": [], "sdxl": ["text_embeds", "time_ids"]}.get(kind, ["pooled_projections"])
        assert sorted(a) == sorted(b) == sorted(["encoder_hidden_states", *keys]), kind
        assert all(torch.equal(a[k], b[k]) for k in a), kind
def test_every_setting_is_a_flag_and_the_help_lists_every_default(capsys, monkeypatch):
    args = vars(b4m.parse_args(["--content", "c", "--style", "s"]))
    assert {*b4m.RUN, *sum(b4m.STAGES.values(), ()), *b4m.DEFAULTS} <= set(args)  # every setting
    assert {k: args[k] for k in b4m.DEFAULTS} == {**b4m.DEFAULTS, "style_lr": args["lr"]}
    assert b4m.pick_device(argparse.Namespace(device="cpu", dtype="auto")) == ("cpu", "fp32")
    monkeypatch.setenv("COLUMNS", "1000")  # no line wrapping inside a value
    for argv, shown in ((["-h"], [f"(default: {v})" for v in b4m.DEFAULTS.values()]
                         + [f"'{p}'" for p in b4m.PROMPTS.values()]),
                        (["sample", "-h"], [f"{flag} " for flag in b4m.SAMPLE_FLAGS])):
        with pytest.raises(SystemExit):
            b4m.parse_args(argv)
        text = capsys.readouterr().out
        assert all(s in text for s in shown), [s for s in shown if s not in text]
    assert text.count("(default: the run") == len(b4m.SAMPLE_FLAGS) + 1  # and --seed
