"""Peak tensor memory of one B4M training step at real model sizes, measured on the CPU.
    python examples/memory.py [--only sdxl|flux] [--json OUT]
Random weights from the real configs, frozen in bf16; PLP adapters at rank 64 (B, D in fp32); 512
px; a steady-state step (Adam's moments exist). A TorchDispatchMode sees every tensor an ATen op
returns, forward and backward; a new storage counts until a weakref callback says torch freed it.
The peak of the live bytes is split by what was live then. Tensor storage only: kernel scratch
and allocator overhead are not counted. FLUX.1 dev (24 GB in bf16) is estimated.
"""
import argparse
import itertools
import json
import sys
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import b4m  # noqa: E402

COLUMNS = ("weights", "adapter", "grads", "optimizer", "activations")
SDXL_UNET = dict(
    sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=[16, 56, 56])
DEPTHS = ((1, 1), (2, 1), (1, 2))  # (double, single) blocks of the full-width models measured
FLUX_NOTE = (f"FLUX rows: estimates, measured on full-width models of {DEPTHS} (double, single)"
             " blocks, extrapolated linearly to (19, 38) (exact for weights, adapter, optimizer).")


class Tracker(TorchDispatchMode):
    """Live bytes of tensor storages over time. Storages made before it are added with add()."""

    def __init__(self):
        super().__init__()
        self.live = {}  # storage address -> (id, weakref)
        self.events = []  # (id, change in bytes) in time order: split() replays them
        self.tags = {}  # id -> a column; untagged storages count as activations

    def add(self, tensor, tag=None, new=True):
        """Count tensor's storage from now on if new (in-place resizes, out= ops: none here)."""
        st = tensor.untyped_storage()
        key, size = st._cdata, st.nbytes()
        if key not in self.live and new:
            # torch keeps a storage's Python object alive exactly as long as the storage, so the
            # callback runs when the memory is freed, even if only C++ (autograd) held it.
            free = lambda _, key=key: self.events.append((self.live.pop(key)[0], -size))  # noqa
            self.live[key] = (len(self.events), weakref.ref(st, free))
            self.events.append((len(self.events), size))
        if tag:
            self.tags[self.live[key][0]] = tag

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # ATen returns a tuple exactly when an op has several returns (Tensor[] is a list)
        for ret, value in zip(func._schema.returns, out if isinstance(out, tuple) else (out,)):
            for t in tree_leaves(value):
                if isinstance(t, torch.Tensor):  # views and in-place results allocate nothing
                    self.add(t, new=ret.alias_info is None)
        return out

    def split(self):
        """{column: bytes live at the (first) moment of the peak, "peak": their sum}."""
        totals = [0, *itertools.accumulate(change for _, change in self.events)]
        row = dict.fromkeys(COLUMNS, 0)
        for ident, change in self.events[:totals.index(max(totals))]:  # up to the peak
            row[self.tags.get(ident, "activations")] += change
        return {**row, "peak": max(totals)}


def build(cls, **config):
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # bf16 from the start: no fp32 copy (10 GB for SDXL)
    try:
        return cls(**config).requires_grad_(False)
    finally:
        torch.set_default_dtype(torch.float32)


def batch(model, n, side=64, text=77, tokens=1024, flux_text=512):
    """(kwargs of a batch of n, target) at 512 px: SDXL 64 x 64 latents; FLUX 32 x 32 tokens."""
    c, r = model.config, lambda *shape: torch.randn(*shape).to(torch.bfloat16)
    if "joint_attention_dim" in c:
        kwargs = dict(hidden_states=r(n, tokens, c.in_channels), timestep=torch.full((n,), 0.5),
                      encoder_hidden_states=r(n, flux_text, c.joint_attention_dim),
                      pooled_projections=r(n, c.pooled_projection_dim),
                      guidance=torch.full((n,), 3.5), img_ids=torch.zeros(tokens, 3),
                      txt_ids=torch.zeros(flux_text, 3))
        return kwargs, r(n, tokens, c.in_channels)
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    cond = dict(text_embeds=r(n, pooled), time_ids=r(n, 6))  # SDXL: pooled text, size ids
    return dict(sample=r(n, c.in_channels, side, side), timestep=torch.randint(1000, (n,)),
                encoder_hidden_states=r(n, text, c.cross_attention_dim),
                added_cond_kwargs=cond), r(n, c.in_channels, side, side)


def measure(model, step, checkpointing, rank=64, **shapes):
    """Bytes of one B4M step, "break" (content stage) or "make"; the model is left as it was."""
    if checkpointing:
        model.enable_gradient_checkpointing()
    weights = [*model.parameters(), *model.buffers()]  # the frozen model, before the adapter
    layers = b4m.add_plp(model, rank, seed=0)
    every_B, every_D = [x.B for x in layers.values()], [x.D for x in layers.values()]
    if step == "break":  # target pass into D (own half), then auxiliary pass into B (other half)
        opt = torch.optim.AdamW([{"params": every_D}, {"params": every_B, "lr": 1e-5}], lr=1e-4)
        passes = [(1, every_D), (1, every_B)]
    else:  # content + style in one forward of batch 2, into B and D together
        opt = b4m.RiemannianAdamW(layers.values(), lr=1e-4)
        passes = [(2, every_B + every_D)]
    for p in every_B + every_D:  # a step on zero gradients: Adam's moments exist, as in step 2+
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    adapter = [t for x in layers.values() for t in (x.A, x.B, x.C, x.D)]
    state = lambda: [t for s in opt.state.values() for t in s.values()]  # noqa: E731
    tracker = Tracker()
    tag = lambda ts, name: [tracker.add(t, name) for t in ts if t is not None]  # noqa: E731
    for tensors, name in ((weights, "weights"), (adapter, "adapter"), (state(), "optimizer")):
        tag(tensors, name)
    try:
        with tracker:
            for n, trained in passes:
                kwargs, target = batch(model, n, **shapes)
                loss = F.mse_loss(model(**kwargs).sample.float(), target.float())
                loss.backward(inputs=trained)  # each loss reaches its own half only, as in b4m
                del kwargs, target, loss
                tag([p.grad for p in trained], "grads")
            for group in opt.param_groups:  # b4m clips each half on its own
                torch.nn.utils.clip_grad_norm_(group["params"], 1.0)
            opt.step()
            tag([p.grad for p in every_B + every_D], "grads")  # RiemannianAdamW replaced them
            tag(state(), "optimizer")
    finally:
        b4m.remove_plp(model)
        model.disable_gradient_checkpointing()
    return tracker.split()


def extrapolate(by_depth, doubles, singles):
    """Each column linear in the block counts, from the rows measured at DEPTHS."""
    base, double, single = (by_depth[d] for d in DEPTHS)
    return {k: base[k] + (doubles - 1) * (double[k] - base[k])
            + (singles - 1) * (single[k] - base[k]) for k in base}


def rows(which, keys=(("break", False), ("break", True), ("make", False), ("make", True))):
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel
    if which == "sdxl":
        unet = build(UNet2DConditionModel, **SDXL_UNET)
        for key in keys:
            yield dict(model="SDXL UNet", step=key[0], ckpt=key[1], method="measured",
                       **measure(unet, *key))
        return
    measured = {}
    for depth in DEPTHS:  # one model at a time
        model = build(FluxTransformer2DModel,
                      **{**FLUX_DEV, "num_layers": depth[0], "num_single_layers": depth[1]})
        measured |= {(key, depth): measure(model, *key) for key in keys}
        del model
    for key in keys:
        shallow = {d: measured[key, d] for d in DEPTHS}  # kept in the JSON: what was measured
        yield dict(model="FLUX.1 dev", step=key[0], ckpt=key[1], method="estimate",
                   **extrapolate(shallow, 19, 38), measured={str(d): shallow[d] for d in DEPTHS})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("sdxl", "flux"))
    parser.add_argument("--json", help="also write the rows, in bytes, to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    table = []
    print(f"| model | step | grad. ckpt | method | {' | '.join(COLUMNS)} | peak |\n"
          + "|---|---|---|---|" + "---:|" * (len(COLUMNS) + 1))
    for which in [args.only] if args.only else ["sdxl", "flux"]:
        for row in rows(which):
            table.append(row)
            gib = " | ".join(f"{row[k] / 2**30:.2f}" for k in (*COLUMNS, "peak"))
            print(f"| {row['model']} | {row['step']} | {('off', 'on')[row['ckpt']]} | "
                  f"{row['method']} | {gib} |", flush=True)
    print("\nGiB. Batch 1 (make: content + style, batch 2), 512 px, rank 64, bf16 weights. grads,"
          " activations: live at the peak; activations: all else (saved, inputs, temporaries).")
    if args.only != "sdxl":
        print(FLUX_NOTE)
    print("measured on the CPU; GPU kernels and allocator will differ")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
