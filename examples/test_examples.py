"""Tests for the small example scripts: tiny.py, drift.py, scale_grid.py, evaluate.py and
load_in_diffusers.py, on one tiny SD run trained once per session (offline, seconds).
benchmark.py has no test: even at --repeats 1 it times mid-size models for about a minute.

    OMP_NUM_THREADS=1 python -m pytest -q examples/test_examples.py   (from the repository root)
"""
import importlib.util
import json
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

EXAMPLES = Path(__file__).resolve().parent
ROOT = EXAMPLES.parent
sys.path.insert(0, str(ROOT))  # b4m.py, from any working directory

import b4m  # noqa: E402


def example(name):
    """An example script as a module, loaded by path: "evaluate" is also a pip package's name."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tiny, drift, scale_grid, evaluate = map(example, ("tiny", "drift", "scale_grid", "evaluate"))


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="session")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "sd"
    assert tiny.main(["sd", str(folder)]) == 0
    return folder


@pytest.fixture(scope="session")
def run(model, tmp_path_factory):
    """One finished B4M run on the tiny SD pipeline, shared by every test that only reads it."""
    out = tmp_path_factory.mktemp("runs") / "b4m"
    assert b4m.main(["--content", str(EXAMPLES / "content"), "--style", str(EXAMPLES / "style"),
                     "--model", str(model), "--rank", "4", "--resolution", "64", "--steps", "2",
                     "--make-steps", "2", "--grad-accum", "1", "--sample-steps", "2",
                     "--num-samples", "1", "--sample-resolution", "64", "--out", str(out)]) == 0
    return out


def last_error(capsys, prog):
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: error: "), last
    return last


# tiny.py -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", tiny.KINDS)
def test_tiny_pipeline_saves_loads_back_and_encodes_a_prompt_the_same_twice(kind, tmp_path):
    from diffusers import DiffusionPipeline

    built = tiny.tiny_pipeline(kind)
    assert tiny.main([kind, str(tmp_path / kind)]) == 0
    loaded = DiffusionPipeline.from_pretrained(tmp_path / kind)
    assert type(loaded) is type(built)
    denoiser, loaded_denoiser = b4m.denoiser_of(built)[0], b4m.denoiser_of(loaded)[0]
    weights = loaded_denoiser.state_dict()
    assert all(torch.equal(v, weights[k]) for k, v in denoiser.state_dict().items())
    for pipe in (built, loaded):  # both in eval mode: no dropout in the text encoders
        assert not any(m.training for part in pipe.components.values()
                       if isinstance(part, torch.nn.Module) for m in part.modules())
        first, second = (b4m.encode_prompts(pipe, ["a photo of snq teddybear"], 64)
                         for _ in range(2))
        assert first.keys() == second.keys() and "encoder_hidden_states" in first
        assert all(torch.equal(first[k], second[k]) for k in first), kind


def test_tiny_usage(capsys):
    assert tiny.main(["sd"]) == 2 and tiny.main(["sd2", "x"]) == 2
    assert "usage: python examples/tiny.py" in capsys.readouterr().err


# drift.py ------------------------------------------------------------------------------------

def adapters_for(denoiser, rank=4, seed=0):
    """A zero and a random adapter {layer: (U, V)} for every layer b4m adapts."""
    g = torch.Generator().manual_seed(seed)
    layers = {n: m for n, m in denoiser.named_modules() if b4m.is_target(n, m)}
    zero = {n: (torch.zeros(m.out_features, rank), torch.zeros(rank, m.in_features))
            for n, m in layers.items()}
    rand = {n: (torch.randn(m.out_features, rank, generator=g) * 0.1,
                torch.randn(rank, m.in_features, generator=g) * 0.1) for n, m in layers.items()}
    return zero, rand


@pytest.mark.parametrize("kind", tiny.KINDS)
def test_drift_is_exactly_zero_for_a_zero_adapter_and_positive_otherwise(kind):
    pipe = tiny.tiny_pipeline(kind)
    zero, rand = adapters_for(b4m.denoiser_of(pipe)[0])
    prompts = {"zero": "a photo of snq teddybear", "rand": "a photo of snq teddybear"}
    report = drift.drift(pipe, {"zero": zero, "rand": rand}, prompts, 64, seed=0)
    assert report["drift"]["zero"] == 0.0 and report["effect"]["zero"] == 0.0
    assert report["drift"]["rand"] > 0 and report["effect"]["rand"] > 0
    # the base model is left as it was: the same numbers again
    assert drift.drift(pipe, {"rand": rand}, prompts, 64, seed=0)["drift"]["rand"] == \
        report["drift"]["rand"]


def test_drift_of_a_finished_run(run, tmp_path, capsys):
    out = tmp_path / "drift.json"
    assert drift.main([str(run), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert sorted(report) == ["drift", "effect"]
    for kind in report.values():
        assert sorted(kind) == ["b4m", "content", "style"] and all(v > 0 for v in kind.values())
    table = capsys.readouterr().out
    assert "b4m" in table and f"{report['drift']['b4m']:.4g}" in table
    assert drift.main([str(run), "--json", str(out)]) == 0  # its own file: replaced
    # the made adapter against itself as the base: zero, through the run's own loader
    pipe, adapters, prompts, settings = drift.load_run(run)
    zero = {n: (torch.zeros_like(U), torch.zeros_like(V)) for n, (U, V) in adapters["b4m"].items()}
    again = drift.drift(pipe, {"b4m": adapters["b4m"], "zero": zero},
                        {"b4m": prompts["b4m"], "zero": prompts["b4m"]}, settings["resolution"],
                        settings["seed"])
    assert again["drift"] == {"b4m": report["drift"]["b4m"], "zero": 0.0}


def test_drift_bad_input(run, tmp_path, capsys):
    (tmp_path / "notes.json").write_text('{"mine": 1}')
    assert drift.main([str(run), "--json", str(tmp_path / "notes.json")]) == 2
    assert "notes.json" in last_error(capsys, "drift.py")
    assert (tmp_path / "notes.json").read_text() == '{"mine": 1}'
    assert drift.main([str(tmp_path)]) == 2
    assert "config.json" in last_error(capsys, "drift.py")


# scale_grid.py -------------------------------------------------------------------------------

def test_scale_grid_size_and_the_unscaled_cell_is_the_runs_sample(run):
    scales = [0, 0.5, 1, 1.5]
    assert scale_grid.main([str(run)]) == 0  # the default scales and file
    grid = pixels(run / "samples" / "scale_grid.png")
    assert grid.shape == (len(scales) * 64, len(scales) * 64, 3)
    i = scales.index(1)  # row: style scale 1, column: content scale 1
    assert np.array_equal(grid[i * 64:(i + 1) * 64, i * 64:(i + 1) * 64],
                          pixels(run / "samples" / "b4m_0.png"))
    assert not np.array_equal(grid[:64, :64], grid[i * 64:(i + 1) * 64, i * 64:(i + 1) * 64])
    # b4m's sample writer and --overwrite remove only the PNGs it names: the grid is not one
    assert not b4m.SAMPLES.fullmatch("scale_grid.png")


def test_scale_grid_replaces_only_its_own_file(run, tmp_path, capsys):
    one = tmp_path / "one.png"
    for _ in range(2):  # written, then replaced
        assert scale_grid.main([str(run), "--scales", "1", "--out", str(one)]) == 0
        assert np.array_equal(pixels(one), pixels(run / "samples" / "b4m_0.png"))
    sample = (run / "samples" / "b4m_0.png").read_bytes()
    assert scale_grid.main([str(run), "--scales", "1", "--out",
                            str(run / "samples" / "b4m_0.png")]) == 2
    assert "b4m_0.png" in last_error(capsys, "scale_grid.py")
    assert (run / "samples" / "b4m_0.png").read_bytes() == sample


def test_scale_grid_refuses_a_lora_merge_run_and_bad_input(run, tmp_path, capsys):
    merge = tmp_path / "merge"
    merge.mkdir()
    config = json.loads((run / "config.json").read_text())
    config["settings"]["baseline"] = "lora-merge"
    (merge / "config.json").write_text(json.dumps(config))
    assert scale_grid.main([str(merge)]) == 2
    assert "lora-merge" in last_error(capsys, "scale_grid.py")
    assert scale_grid.main([str(tmp_path / "nothing")]) == 2
    assert "config.json" in last_error(capsys, "scale_grid.py")
    assert scale_grid.main([str(run), "--scales", "1", "nan"]) == 2
    assert "--scales" in last_error(capsys, "scale_grid.py")
    assert not any(merge.rglob("*.png"))


# load_in_diffusers.py ------------------------------------------------------------------------

def test_load_in_diffusers_samples_with_the_made_adapter(run, model, tmp_path, monkeypatch):
    out = tmp_path / "x.png"
    monkeypatch.setattr(sys, "argv", ["load_in_diffusers.py", "--lora", str(run / "b4m"),
                                      "--model", str(model), "--steps", "2", "--out", str(out)])
    runpy.run_path(str(EXAMPLES / "load_in_diffusers.py"), run_name="__main__")
    assert Image.open(out).size == (64, 64)


# evaluate.py: CLIP metrics of a run, on a tiny random CLIP saved to a folder (offline) --------

@pytest.fixture(scope="session")
def clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    folder = tmp_path_factory.mktemp("clip")
    tokenizer = tiny.tiny_pipeline("sd").tokenizer
    layers = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2)
    config = CLIPConfig(
        text_config=dict(**layers, vocab_size=len(tokenizer), max_position_embeddings=77,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(**layers, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32},
                          crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def fake_run(folder, samples=2, resolution=64):
    """A run folder as far as evaluate.py reads it, without training."""
    settings = dict(content=str(EXAMPLES / "content"), style=str(EXAMPLES / "style"),
                    prompt="a snq object in w@z style", resolution=resolution)
    (folder / "samples").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"settings": settings,
                                                    "versions": {"b4m": b4m.__version__}}))
    g = torch.Generator().manual_seed(1)
    for i in range(samples):
        data = torch.randint(0, 256, (resolution, resolution, 3), generator=g, dtype=torch.uint8)
        Image.fromarray(data.numpy()).save(folder / "samples" / f"b4m_{i}.png")
    return folder


def test_evaluate_metrics_equal_a_computation_by_hand(clip, tmp_path, capsys):
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    run = fake_run(tmp_path / "run")
    assert evaluate.main([str(run), "--clip", str(clip)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert sorted(metrics) == ["clip_i", "clip_t", "style_sim"]
    out = capsys.readouterr().out
    assert str(run) in out and f"{metrics['clip_t']:.4f}" in out
    # By hand, through CLIPModel.forward (unit image_embeds/text_embeds), not get_*_features.
    model = CLIPModel.from_pretrained(clip).eval()
    processor = CLIPImageProcessorPil.from_pretrained(clip)
    tokenizer = CLIPTokenizer.from_pretrained(clip)
    samples = [Image.open(p).convert("RGB") for p in sorted((run / "samples").glob("b4m_*.png"))]
    refs = {k: [b4m.open_image(p, 64) for p in sorted((EXAMPLES / k).glob("*.png"))]
            for k in ("content", "style")}
    with torch.no_grad():
        def embeds(images, text="x"):
            return model(**tokenizer([text], return_tensors="pt"),
                         **processor(images=images, return_tensors="pt"))

        out = embeds(samples, "a snq object in w@z style")
        s = out.image_embeds
        expect = {"clip_t": (s @ out.text_embeds.T).mean().item(),
                  "clip_i": (s @ embeds(refs["content"]).image_embeds.T).mean().item(),
                  "style_sim": (s @ embeds(refs["style"]).image_embeds.T).mean().item()}
    assert len(samples) == 2 and len(refs["content"]) == len(refs["style"]) == 4
    for key, value in expect.items():
        assert abs(metrics[key] - value) < 1e-5, (key, metrics[key], value)


def test_evaluate_a_finished_run(run, clip, capsys):
    assert evaluate.main([str(run), "--clip", str(clip)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert all(-1 <= v <= 1 for v in metrics.values()) and str(run) in capsys.readouterr().out


def test_evaluate_bad_input(clip, tmp_path, capsys):
    no_samples = fake_run(tmp_path / "no_samples", samples=0)
    no_config = fake_run(tmp_path / "no_config")
    (no_config / "config.json").unlink()
    for argv, words in [([no_samples, "--clip", clip], ["no_samples", "b4m_*.png"]),
                        ([no_config, "--clip", clip], ["no_config", "config.json"]),
                        ([fake_run(tmp_path / "good"), "--clip", tmp_path / "no_clip"],
                         ["--clip", "no_clip"])]:
        assert evaluate.main([str(a) for a in argv]) == 2
        last = last_error(capsys, "evaluate.py")
        assert all(w in last for w in words), last
    assert not any(tmp_path.glob("*/metrics.json"))


def test_a_content_folder_without_prompt_txt_takes_the_default_prompt(model, tmp_path):
    """b4m.py: only auxiliary sets need a prompt.txt; content and style fall back
    to the defaults."""
    content = tmp_path / "content"
    content.mkdir()
    for path in (EXAMPLES / "content").glob("*.png"):
        shutil.copy(path, content / path.name)
    out = tmp_path / "out"
    assert b4m.main(["--content", str(content), "--style", str(EXAMPLES / "style"),
                     "--model", str(model), "--rank", "4", "--resolution", "64", "--steps", "1",
                     "--make-steps", "0", "--grad-accum", "1", "--sample-steps", "1",
                     "--num-samples", "1", "--sample-resolution", "64", "--out", str(out)]) == 0
    settings = json.loads((out / "config.json").read_text())["settings"]
    assert settings["content_prompt"] == "a photo of snq object"
    assert settings["style_prompt"] == (EXAMPLES / "style" / "prompt.txt").read_text().strip()
