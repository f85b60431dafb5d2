"""examples/memory.py on tiny models: the exact things that could silently go wrong.

    python -m pytest -q examples/test_memory.py
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory  # noqa: E402

torch.set_num_threads(1)
RANK = 4
TINY = dict(side=16, text=8, tokens=16, flux_text=8)  # batch()'s sizes: 16 x 16 latents, 8 tokens


@pytest.fixture(scope="module")
def unet():
    from diffusers import UNet2DConditionModel
    return memory.build(  # shaped like tiny SDXL: text_time conditioning, linear projections
        UNet2DConditionModel, sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
        attention_head_dim=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80, use_linear_projection=True)


def flux(doubles, singles):
    from diffusers import FluxTransformer2DModel
    return memory.build(FluxTransformer2DModel, patch_size=1, in_channels=16, num_layers=doubles,
                        num_single_layers=singles, attention_head_dim=16, num_attention_heads=2,
                        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                        axes_dims_rope=[4, 4, 8])


def test_tracker_peak_on_known_allocations():
    kept = torch.empty(100, dtype=torch.int16)  # 200 B before tracking, added by hand
    tracker = memory.Tracker()
    tracker.add(kept, "weights")
    with tracker:
        a = torch.empty(1000)  # 4000 B
        b = torch.empty(500, dtype=torch.float64)  # 4000 B: 8200 live
        b.view(50, 10).add_(1)  # a view and an in-place op allocate nothing
        del a  # 4200 live
        c = torch.empty(3000, dtype=torch.uint8)  # 7200 live
        d = b * 2  # 11200 live: the peak
        del b, c, d
        torch.empty(1000, dtype=torch.float64)  # 8200 at most: freed at once
    assert tracker.split() == dict(weights=200, adapter=0, grads=0, optimizer=0,
                                   activations=11000, peak=11200)


def test_tracker_sees_backward_and_saved_tensors():
    w = torch.randn(8, 8, requires_grad=True)  # 256 B, not added: the tracker never saw it made
    tracker = memory.Tracker()
    with tracker:
        x = torch.ones(4, 8)  # 128 B, saved by mm for w's gradient
        loss = (x @ w).sum()  # 4 B; mm's output (128 B) is freed at once: sum saves no input
        del x  # still held by autograd, in C++ only: must stay live
        loss.backward()  # the seed gradient (4 B, expanded: a view) and w's gradient (256 B)
    assert w.grad is not None
    # The peak is at the end of backward: x + loss + seed + w.grad. Were x dropped when Python
    # let go of it, this would be 264; were mm's output never freed, 520.
    assert tracker.split()["peak"] == 128 + 4 + 4 + 256


@pytest.mark.parametrize("step", ["break", "make"])
def test_split_is_exact(unet, step):
    row = memory.measure(unet, step, False, RANK, **TINY)
    frozen = [*unet.parameters(), *unet.buffers()]
    assert not any(p.requires_grad for p in frozen)  # measure left no adapter behind
    assert row["weights"] == sum(p.numel() * p.element_size() for p in frozen)
    import b4m
    layers = b4m.add_plp(unet, RANK, seed=0)
    b4m.remove_plp(unet)
    adapter = [t for x in layers.values() for t in (x.A, x.B, x.C, x.D)]
    assert all(t.dtype == torch.float32 for t in adapter)  # fp32 next to bf16 weights
    assert row["adapter"] == sum(t.numel() * 4 for t in adapter)
    trained = [t for x in layers.values() for t in (x.B, x.D)]
    # AdamW: exp_avg and exp_avg_sq of every trained tensor, plus its float32 step counter
    assert row["optimizer"] == 2 * sum(t.numel() * 4 for t in trained) + 4 * len(trained)
    assert row["peak"] == sum(row[k] for k in memory.COLUMNS)
    if step == "break":  # the second pass runs with the first pass's D gradients live
        assert row["grads"] == sum(x.D.numel() * 4 for x in layers.values())


@pytest.mark.parametrize("step", ["break", "make"])
def test_checkpointing_lowers_activations(unet, step):
    plain, ckpt = (memory.measure(unet, step, c, RANK, **TINY) for c in (False, True))
    assert ckpt["activations"] < 0.5 * plain["activations"]
    assert ckpt["weights"] == plain["weights"]


def test_flux_extrapolation_matches_a_deeper_model():
    """The estimate's assumption, linear in the block counts, checked exactly on a (2, 2) model:
    its activations and grads at the peak are what (1, 1), (2, 1) and (1, 2) predict."""
    models = {d: flux(*d) for d in (*memory.DEPTHS, (2, 2))}
    for key in [("break", False), ("break", True), ("make", False), ("make", True)]:
        rows = {d: memory.measure(m, *key, RANK, **TINY) for d, m in models.items()}
        assert memory.extrapolate(rows, 2, 2) == rows[(2, 2)], key


def test_flux_weights_and_adapter_are_linear_in_the_block_counts():
    """The estimate's exact columns, on FLUX.1 dev's real config: the bytes of weights, adapter
    (A, B, C, D) and AdamW state of the full model, built on the meta device (shapes only), are
    what the three shallow models extrapolate to. Rank 4, not 64, to keep the test fast: the
    adapter's bytes are r (m + n) x 4 per layer, linear in the rank."""
    import b4m
    from diffusers import FluxTransformer2DModel

    def exact(doubles, singles):
        with torch.device("meta"):
            model = FluxTransformer2DModel(**{**memory.FLUX_DEV, "num_layers": doubles,
                                              "num_single_layers": singles}).to(torch.bfloat16)
        nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
        weights = nbytes([*model.parameters(), *model.buffers()])
        layers = b4m.add_plp(model, RANK, seed=0)
        trained = [t for x in layers.values() for t in (x.B, x.D)]
        return dict(weights=weights, optimizer=2 * nbytes(trained) + 4 * len(trained),
                    adapter=nbytes(t for x in layers.values() for t in (x.A, x.B, x.C, x.D)))

    full = exact(19, 38)
    assert memory.extrapolate({d: exact(*d) for d in memory.DEPTHS}, 19, 38) == full
    assert 11.8e9 < full["weights"] / 2 < 12.0e9  # FLUX.1 dev: ~11.9B parameters
