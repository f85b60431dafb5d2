"""Tests for examples/toyworld.py: the world, the evaluator, the shipped models, a content stage
that teaches the base model a shape it has never seen, the comparison's bookkeeping, and v3's
captions and text encoder (checked without a trained v3 model). Real models, no mocks.

    OMP_NUM_THREADS=1 python -m pytest -q examples/test_toyworld.py   (from the repository root)
"""
import functools
import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent
ROOT = EXAMPLES.parent
sys.path.insert(0, str(ROOT))  # b4m.py, from any working directory

import b4m  # noqa: E402

# examples/toyworld.py: the world, the evaluator, the shipped model, and a content stage that
# teaches it a shape it has never seen. Real models, no mocks.

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
    # position, size and phase come from the seed
    assert toyworld.draw("star", "zebra", 8).tobytes() != a.tobytes()


def test_held_out_concepts_never_reach_base_training():
    known_shapes = ["circle", "square", "triangle", "star", "cross", "diamond", "hexagon",
                    "crescent"]
    known_styles = ["red", "blue", "stripes", "dots", "outline", "gradient", "night", "zebra"]
    # heart, arrow, checker, neon: none
    every = {(a, b) for a in known_shapes for b in known_styles}
    assert len(toyworld.HELD_OUT_PAIRS) == 4 and set(toyworld.HELD_OUT_PAIRS) < every
    # 60, each once
    assert sorted(toyworld.TRAIN_PAIRS) == sorted(every - set(toyworld.HELD_OUT_PAIRS))


def test_the_v2_world_holds_out_three_shapes_and_three_styles():
    try:
        toyworld.use_world("v2")
        known_shapes = ["circle", "square", "triangle", "star", "cross", "diamond", "hexagon"]
        known_styles = ["red", "blue", "stripes", "dots", "outline", "gradient", "night"]
        # heart, arrow, crescent; checker, neon, zebra
        every = {(a, b) for a in known_shapes for b in known_styles}
        # 45, each once
        assert sorted(toyworld.TRAIN_PAIRS) == sorted(every - set(toyworld.HELD_OUT_PAIRS))
        assert (len(toyworld.TRAIN_PAIRS) == 45
                and toyworld.MODEL == EXAMPLES / "toyworld" / "model-v2")
        # every adapted layer at least 64 wide: rank 8 gives r / m_f <= 0.25
        unet = toyworld.make_unet()
        widths = {min(m.out_features, m.in_features)
                  for n, m in unet.named_modules() if b4m.is_target(n, m)}
        assert widths == {64, 128}
    finally:
        toyworld.use_world("v1")
    assert toyworld.MODEL == EXAMPLES / "toyworld" / "model" and len(toyworld.TRAIN_PAIRS) == 60


def test_the_shipped_v2_model_loads_and_has_the_v2_shape():
    pipe = toyworld.load_model(EXAMPLES / "toyworld" / "model-v2")
    assert (tuple(pipe.unet.config.block_out_channels) == (64, 128)
            and pipe.unet.config.cross_attention_dim == 128)
    assert pipe.text_encoder.config.hidden_size == 128 and pipe.vae.config.latent_channels == 4
    assert b4m.check_rank(8, pipe.unet) is None  # rank 8 fits; the smallest layer allows 64
    with pytest.raises(b4m.UsageError, match="layer allows 64"):
        b4m.check_rank(65, pipe.unet)


def test_word_level_tokenizer_gives_every_word_one_token(toy_pipe):
    ids = toy_pipe.tokenizer("a snq object in w@z style").input_ids
    vocab = toy_pipe.tokenizer.get_vocab()
    assert ids == [vocab[w] for w in ["<bos>", "a", "snq", "object", "in", "w@z", "style", "<eos>"]]


def test_a_word_means_the_same_in_every_prompt(toy_pipe):
    emb = b4m.encode_prompts(toy_pipe, ["a photo of snq object", "a snq object in w@z style"],
                             32)["encoder_hidden_states"]
    assert torch.equal(emb[0, 4], emb[1, 2])  # "snq" at positions 4 and 2
    assert torch.equal(emb[0, 5], emb[1, 3])  # "object"


@pytest.mark.parametrize("world, classes", [("v1", 20), ("v3", 21)])  # v3's: and "none" on clutter
def test_evaluator_is_right_on_fresh_images_of_every_class(world, classes):
    toyworld.use_world(world)
    try:
        # seeds never used in training
        accuracy = toyworld.evaluator_accuracy(n=20, seed0=2 * 10**6)
    finally:
        toyworld.use_world("v1")
    assert len(accuracy) == classes
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
    target = b4m.encode_set(toy_pipe, *b4m.load_image_set("--content", content, 32))
    aux = b4m.encode_set(toy_pipe, *b4m.load_image_set("--style", style, 32))
    hearts = lambda images: sum(s == "heart" for s, _ in toyworld.classify(images, evaluator))
    base = hearts(toyworld.sample(toy_pipe, "a photo of snq object", 16, 0))
    # The quick start's rank and batch; 100 steps at 3e-3 (a content stage alone learns faster
    # at a higher lr)
    loss = functools.partial(b4m.denoising_loss, toy_pipe.unet,
                             DDPMScheduler.from_config(toy_pipe.scheduler.config), 8)
    sd, _ = b4m.break_stage("content", toy_pipe.unet, loss, target, aux, rank=16, seed=0, steps=100,
                            lr=3e-3, aux_lr=3e-4, grad_accum=1, max_grad_norm=1.0)
    learned = hearts(b4m.generate(toy_pipe, sd, "a photo of snq object", num_samples=16, steps=25,
                                  resolution=32, seed=0))
    assert base == 0 and learned >= 8, (base, learned)  # measured here: 0, then 10 of 16


def test_compare_scores_the_combined_prompt_and_the_leaks(evaluator, tmp_path):
    """score_run's definitions, on drawn images standing in for a run's samples: the new shape in
    the new style is `both`; the content set's own style is a style leak; a known shape is a
    shape leak."""
    samples = tmp_path / "samples"
    samples.mkdir()
    combined = [("heart", "checker"), ("heart", "blue"), ("star", "checker"), ("star", "zebra")]
    singles = {"content": [("heart", "blue")] * 3 + [("circle", "blue")],
               "style": [("star", "checker")] * 4}
    for kind, pairs in [("b4m", combined), *singles.items()]:
        for i, (shape, style) in enumerate(pairs):
            toyworld.draw(shape, style, 40 + i).save(samples / f"{kind}_{i}.png")
    assert toyworld.classify([toyworld.draw(*p, 40 + i) for i, p in enumerate(combined)],
                             evaluator) == combined
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
        names = [n for n in layers if n.endswith("." + kind.split()[1])
                 and ((".attn2." in n) == kind.startswith("cross"))
                 and f"{layers[n].base.out_features}x{layers[n].base.in_features}" == shape]
        assert len(names) == row["layers"] > 0
        m, n = map(int, shape.split("x"))
        assert (row["r/m_f"], row["r/n_f"], row["B rows"], row["D columns"]) == (
            16 / (m // 2), 16 / (n // 2), m - m // 2, n - n // 2)
        ratio = sum(((layers[k].U @ layers[k].V).norm() / layers[k].base.weight.norm()).item()
                    for k in names) / len(names)
        assert row["|dW_init|/|W0|"] == round(ratio, 3), (kind, shape)
    assert sum(r["layers"] for r in rows.values()) == len(layers) == 56
    sdxl = toyworld.regime(toyworld.sdxl_unet_on_meta(), 64)
    assert sum(r["layers"] for r in sdxl) == 560  # 140 attention modules x 4 projections
    assert {r["shape"]: r["r/m_f"] for r in sdxl} == {"640x640": 0.2, "640x2048": 0.2,
                                                      "1280x1280": 0.1, "1280x2048": 0.1}
    assert all(r["|dW_init|/|W0|"] is None for r in sdxl)  # no weights here


def test_validation_and_test_pairs_never_overlap_and_are_all_new_in_v2():
    test, validation = set(toyworld.TEST_PAIRS), set(toyworld.VALIDATION_PAIRS)
    assert not test & validation and len(test) >= 3 and len(test | validation) == 9
    new = {(a, c) for a in ("heart", "arrow", "crescent") for c in ("checker", "neon", "zebra")}
    # every one of v2's nine new pairs, once
    assert {(a, c) for a, _, c in test | validation} == new
    # a known style
    assert all(own not in ("checker", "neon", "zebra") for _, own, _ in test | validation)


def test_regime_with_a_prior_scale_shrinks_the_init_by_its_square(toy_pipe):
    plain, scaled = (toyworld.regime(toy_pipe.unet, 16),
                     toyworld.regime(toy_pipe.unet, 16, scale=0.5))
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
    assert chosen == {"b4m": toyworld.SEARCH["b4m"][1],
                      "lora-merge": toyworld.SEARCH["lora-merge"][0]}  # first on a tie
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
    assert (len(test) == 5 * len(toyworld.TEST_PAIRS) * 2
            and {tuple(r[3]) for r in test} == set(toyworld.TEST_PAIRS))
    for key, method, flags, *_ in test:  # every run's flags are b4m.py's, at the chosen setting
        args = b4m.parse_args(["--content", "c", "--style", "s", *flags, *toyworld.METHODS[method]])
        setting = chosen["lora-merge" if method == "lora-merge" else "b4m"]
        assert ((args.lr, args.style_lr, args.rank, args.steps)
                == (setting["lr"], setting["style_lr"], 8, 150)), key
        assert args.prior_scale == setting.get("prior_scale", 1.0)
    groups = toyworld.plan("ablations", record, [0, 1])  # make-only ablations on every cell first
    assert [[run[1] for run in g] for g in groups] == (
        [["b4m", "no-precondition", "make-steps-0"]] * 8
        + [["b4m", "no-mcp", "no-orth-prior"]] * 8)
    # the same 8 cells, same flags
    assert [g[0][2:5] for g in groups[:8]] == [g[0][2:5] for g in groups[8:]]
    assert (sorted(r[1] for g in groups for r in g if r[1] != "b4m")
            == sorted(toyworld.ABLATIONS * 8))


def test_v3_compare_searches_joint_with_the_same_budget_and_tests_all_three(tmp_path):
    """v3: b4m, the merge and joint each get 4 settings, two at 150 steps and two at 400; the test
    phase runs all three at their chosen settings; joint's runs are in b4m's layout (run_joint)."""
    toyworld.use_world("v3")
    try:
        assert (set(toyworld.search()) == {"b4m", "lora-merge", "joint"}
                and set(toyworld.search()) <= set(toyworld.METHODS))
        assert all(sorted(s["steps"] for s in settings) == [150, 150, 400, 400]
                   for settings in toyworld.search().values())
        record = {"runs": {}, "chosen": {m: s[2] for m, s in toyworld.search().items()}}
        test = [run for group in toyworld.plan("test", record, [0, 1]) for run in group]
        assert (sorted({r[1] for r in test}) == ["b4m", "joint", "lora-merge"]
                and len(test) == 3 * 2 * 4)
        for key, method, flags, *_ in test:
            if method == "joint":
                assert flags == toyworld.SEARCH_V3["joint"][2], key
                continue
            args = b4m.parse_args(["--content", "c", "--style", "s", *flags,
                                   *toyworld.METHODS[method]])
            assert (args.steps, args.lr, args.rank) == (400, record["chosen"][method]["lr"], 8), key
        assert toyworld.record_file() == toyworld.ROOT / "compare-v3.json"
        runs = {}  # every setting ties at both-right 0; the stages' own scores break the tie
        for method, settings in toyworld.search().items():
            for i in range(4):
                for a, _, c in toyworld.SEARCH_PAIRS:
                    runs[f"search/{method}/{i}/{a}-{c}/seed0"] = {
                        **dict.fromkeys(toyworld.SCORES, 0.0),
                        "content_stage_shape": [0.1, 0.3, 0.3, 0.2][i],
                        "style_stage_style": [0.5, 0.5, 0.5, 0.9][i]}
        chosen, _ = toyworld.choose({"runs": runs})
        # (0.2 + 0.9) / 2 beats 0.3 and 0.4
        assert chosen == {m: s[3] for m, s in toyworld.search().items()}
        runs["search/joint/0/crescent-neon/seed0"]["both"] = 0.01  # both-right first
        assert toyworld.choose({"runs": runs})[0]["joint"] == toyworld.search()["joint"][0]
    finally:
        toyworld.use_world("v1")


def test_compare_skips_the_runs_its_record_holds(tmp_path, monkeypatch, capsys, evaluator):
    """A search whose every run is in the record runs nothing and writes the choice (no b4m.py
    call: one would fail on the missing image sets)."""
    record = search_record({m: [[0.1 * i, 0.0] for i in range(4)] for m in toyworld.SEARCH})
    monkeypatch.setattr(toyworld, "record_file",
                        lambda: tmp_path / "compare.json")  # and compare.md
    (tmp_path / "compare.json").write_text(json.dumps(record))
    monkeypatch.setattr(toyworld, "b4m", lambda *a, **k: pytest.fail("ran b4m.py"))
    try:
        toyworld.main(["compare", "--world", "v2", "--phase", "search", "--out",
                       str(tmp_path / "runs")])
    finally:
        toyworld.use_world("v1")
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert (saved["runs"] == record["runs"]
            and saved["chosen"] == {m: s[3] for m, s in toyworld.SEARCH.items()})
    assert "| b4m | " in (tmp_path / "compare.md").read_text()


def test_a_stopped_compare_keeps_the_wall_time_of_the_runs_it_finished(tmp_path, monkeypatch,
                                                                        evaluator):
    """Two search runs left: the first takes 100 s on a fake clock, the second is stopped (Ctrl-C)
    after 30 s more. The record keeps the first run and 100 s, added when that run finished."""
    record = search_record({m: [[0.1 * i, 0.0] for i in range(4)] for m in toyworld.SEARCH})
    left = sorted(record["runs"])[:2]
    for key in left:
        del record["runs"][key]
    monkeypatch.setattr(toyworld, "record_file", lambda: tmp_path / "compare.json")
    (tmp_path / "compare.json").write_text(json.dumps(record))
    clock = [1000.0]
    monkeypatch.setattr(toyworld, "time", SimpleNamespace(time=lambda: clock[0]))
    monkeypatch.setattr(toyworld, "image_sets", lambda out, *pair: (out / "c", out / "s"))

    def run_method(method, out, *args, **kw):
        clock[0] += 100 if not (tmp_path / "first").exists() else 30
        if (tmp_path / "first").exists():
            raise KeyboardInterrupt
        (tmp_path / "first").touch()
        return out
    monkeypatch.setattr(toyworld, "run_method", run_method)
    monkeypatch.setattr(toyworld, "score_run", lambda *a: dict.fromkeys(toyworld.SCORES, 0.5))
    try:
        with pytest.raises(KeyboardInterrupt):
            # one run at a time: the fake run_method is not thread-safe
            toyworld.main(["compare", "--world", "v2", "--phase", "search", "--out",
                           str(tmp_path / "runs"), "--jobs", "1"])
    finally:
        toyworld.use_world("v1")
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert sorted(key in saved["runs"] for key in left) == [False, True]  # the first run, kept
    assert saved["wall_seconds"] == {"search": 100}


def test_ablation_table_pairs_each_ablation_with_b4m_on_the_cells_it_ran():
    score = lambda v: {k: v for k in toyworld.SCORES}
    record = {"runs": {"test/b4m/heart-checker/seed0": score(0.5),
                       "test/b4m/heart-checker/seed1": score(1.0),
                       "test/b4m/arrow-neon/seed0": score(0.25),
                       "test/no-mcp/heart-checker/seed0": score(0.75),
                       "test/no-mcp/arrow-neon/seed0": score(0.0),
                       "test/lora-merge/heart-checker/seed1": score(0.0)}}
    only = {("heart-checker", "seed0"), ("arrow-neon", "seed0")}
    rows, cells = toyworld.table(record, "test", ["b4m", *toyworld.ABLATIONS], against=None,
                                 only=only)
    # seed 1: not an ablation cell
    assert set(cells) == {"b4m", "no-mcp"} and set(cells["b4m"]) == only
    assert rows[2].startswith("| b4m | 2 | 0.38 [0.25, 0.50] |")
    assert rows[3].startswith("| no-mcp | 2 | 0.38 [0.00, 0.75] |")
    assert (rows[4].startswith("| no-mcp − b4m (paired) | 2 | 0.00 [-0.25, 0.25] |")
            and len(rows) == 5)
    record["runs"]["test/no-mcp/arrow-neon/seed0"] = score(0.249)
    rows, _ = toyworld.table(record, "test", ["b4m", "no-mcp"], against=None, only=only)
    assert rows[-1].startswith("| no-mcp − b4m (paired) | 2 | 0.12 [0.00, 0.25] |")  # not -0.00
    # B4M − merge over seed 1 only
    rows, _ = toyworld.table(record, "test", ["b4m", "lora-merge"])
    assert rows[-1].startswith("| B4M − merge (paired) | 1 | 1.00 [1.00, 1.00] |")


def test_compare_picture_needs_the_cells_b4m_and_merge_runs(tmp_path, monkeypatch):
    from PIL import Image
    monkeypatch.setattr(toyworld, "ROOT", tmp_path)
    cell = tmp_path / "cell"
    for method, colour in [("no-mcp", "red"), ("b4m", "blue"), ("lora-merge", "green")]:
        (cell / method / "samples").mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (toyworld.SIZE, toyworld.SIZE), colour).save(
                cell / method / "samples" / f"b4m_{i}.png")
        toyworld.picture(cell, k=2)
        assert (tmp_path / "compare.png").exists() == (method == "lora-merge")  # only with both
    grid = Image.open(tmp_path / "compare.png")
    assert grid.size == (6 * toyworld.SIZE, 3 * toyworld.SIZE)  # a row per method, b4m first
    rows = [grid.getpixel((5 * toyworld.SIZE, j * toyworld.SIZE + 1)) for j in range(3)]
    assert rows == [(0, 0, 255), (0, 128, 0), (255, 0, 0)]


def test_make_only_ablations_reuse_a_finished_b4m_run_and_train_their_own_otherwise(tmp_path,
                                                                                     monkeypatch):
    calls = []
    monkeypatch.setattr(toyworld, "b4m", lambda *argv, threads=None: calls.append(argv))

    def finished(run):  # the files a finished b4m.py run leaves, each holding its own path
        for folder in ("content", "style", "samples"):
            (run / folder).mkdir(parents=True)
        for name in ("config.json", "losses.csv", "report.json", "samples/b4m_1.png",
                     "style/x.safetensors"):
            (run / name).write_text(f"{run.name}/{name}")

    toyworld.run_method("no-precondition", tmp_path, "c", "s", 0, 2)
    assert "--overwrite" in calls[-1] and "--resume" not in calls[-1]  # no B4M run to reuse
    finished(tmp_path / "no-precondition")  # B4M's folder gone (recorded elsewhere): this one's
    toyworld.run_method("make-steps-0", tmp_path, "c", "s", 0, 2)
    assert "--resume" in calls[-1] and calls[-1][-2:] == ("--make-steps", "0")
    assert ((tmp_path / "make-steps-0" / "style" / "x.safetensors").read_text()
            == "no-precondition/style/x.safetensors")
    toyworld.run_method("no-mcp", tmp_path, "c", "s", 0, 2)  # changes the break stages: its own
    assert "--overwrite" in calls[-1] and len(calls) == 3
    cell = tmp_path / "cell2"
    finished(cell / "b4m")
    toyworld.run_method("no-precondition", cell, "c", "s", 0, 2)  # B4M's break stages first
    assert "--resume" in calls[-1] and calls[-1][-1] == "--no-precondition" and len(calls) == 4
    assert (cell / "no-precondition" / "config.json").read_text() == "b4m/config.json"


def test_a_stopped_run_is_resumed_and_started_over_only_when_b4m_refuses(tmp_path, monkeypatch):
    """A run folder holding a b4m run (config.json) that is not finished: --resume; b4m.py refusing
    it (exit 2) gives --overwrite; a signal (exit 143) stops compare with the checkpoints kept."""
    calls, codes = [], []

    def fake_b4m(*argv, threads=None):
        calls.append(argv)
        if codes:
            raise toyworld.subprocess.CalledProcessError(codes.pop(0), "b4m.py")
    monkeypatch.setattr(toyworld, "b4m", fake_b4m)
    run = tmp_path / "no-mcp"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"settings": {},
                                                 "versions": {"b4m": b4m.__version__}}))
    toyworld.run_method("no-mcp", tmp_path, "c", "s", 0, 2)
    assert len(calls) == 1 and "--resume" in calls[0] and "--overwrite" not in calls[0]
    codes.append(2)
    toyworld.run_method("no-mcp", tmp_path, "c", "s", 0, 2)
    assert "--resume" in calls[1] and "--overwrite" in calls[2] and "--resume" not in calls[2]
    codes.append(143)
    with pytest.raises(toyworld.subprocess.CalledProcessError):
        toyworld.run_method("no-mcp", tmp_path, "c", "s", 0, 2)
    assert len(calls) == 4 and "--resume" in calls[3]


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
        "world": "v1", "shapes": toyworld.SHAPES, "styles": toyworld.STYLES,
        "held_out_shapes": ["heart", "arrow"], "held_out_styles": ["checker", "neon"],
        "held_out_pairs": [list(p) for p in toyworld.HELD_OUT_PAIRS],
        "model": str(EXAMPLES / "toyworld" / "model")}
    toyworld.main(["draw", "--shape", "arrow", "--style", "neon", "--n", "3", "--seed", "9",
                   "--out", str(tmp_path), "--prompt", "an image in w@z style"])
    assert (tmp_path / "prompt.txt").read_text() == "an image in w@z style\n"
    capsys.readouterr()
    toyworld.main(["score", str(tmp_path)])
    assert json.loads(capsys.readouterr().out) == {
        f"arrow_neon_{k}.png": {"shape": "arrow", "style": "neon"} for k in (9, 10, 11)}


@pytest.mark.parametrize("argv, message", [
    (["score", "no/such/folder"],
     "score: no/such/folder is not a folder; give a folder of PNG images"),
    (["compare", "--jobs", "0"], "argument --jobs: must be a whole number >= 1, got 0"),
    (["compare", "--phase", "all"],
     "argument --phase: invalid choice: 'all' (choose from 'search', 'test', "
     "'ablations', 'binding', 'rescore', 'old', 'report')"),
    (["draw", "--shape", "heart", "--style", "red", "--n", "x", "--out", "x"],
     "argument --n: must be a whole number >= 1, got x")])
def test_toyworld_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        toyworld.main(argv)
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith("error: " + message)


# v3 (issue 24): the captions and the text encoder, checked without a trained v3 model ----------

RARE = {"snq", "w@z", "sks", "zqx"}
TOY_PROMPTS = [(EXAMPLES / "toy_content" / "prompt.txt").read_text().strip(),
               (EXAMPLES / "toy_style" / "prompt.txt").read_text().strip(),
               "a photo of snq object", "an image in w@z style", "a snq object in w@z style",
               "an image in w@z style of a snq object",
               "a photo of snq object in red style"]  # joint


@pytest.fixture
def v3():
    try:
        toyworld.use_world("v3")
        # every training caption
        yield [c for pair in toyworld.TRAIN_PAIRS for c in toyworld.captions(*pair)]
    finally:
        toyworld.use_world("v1")
    assert toyworld.MODEL == EXAMPLES / "toyworld" / "model" and len(toyworld.TRAIN_PAIRS) == 60


def test_v3_trains_every_non_rare_word_of_the_toy_prompts_in_the_same_templates(v3):
    assert toyworld.MODEL == EXAMPLES / "toyworld" / "model-v3" and len(toyworld.TRAIN_PAIRS) == 45
    # the sets' prompt.txt
    assert TOY_PROMPTS[:2] == ["a photo of snq object", "an image in w@z style"]
    trained = {w for c in v3 for w in c.split()}
    for prompt in TOY_PROMPTS:
        assert set(prompt.split()) - RARE <= trained, (prompt, set(prompt.split()) - RARE - trained)
        # used the same way: with a known shape for snq and a known style for w@z, a
        # training caption
        assert any(prompt.replace("snq", a).replace("w@z", b) in v3
                   for a, b in toyworld.TRAIN_PAIRS), prompt
    tokenizer = toyworld.make_tokenizer()
    ids = tokenizer(v3).input_ids  # every caption fits the encoder whole, no word unknown
    assert max(map(len, ids)) <= toyworld.MAX_TOKENS and tokenizer.unk_token_id not in sum(ids, [])


def test_v3_captions_never_name_a_held_out_concept_or_a_rare_token(v3):
    assert toyworld.HELD_OUT_SHAPES == ["heart", "arrow", "crescent"]
    assert toyworld.HELD_OUT_STYLES == ["checker", "neon", "zebra"]
    never = set(toyworld.HELD_OUT_SHAPES) | set(toyworld.HELD_OUT_STYLES) | RARE
    assert not {w for c in v3 for w in c.split()} & never
    assert not set(toyworld.HELD_OUT_PAIRS) & set(toyworld.TRAIN_PAIRS)
    # every known concept is trained
    assert {a for a, _ in toyworld.TRAIN_PAIRS} == set(toyworld.KNOWN_SHAPES)
    assert {b for _, b in toyworld.TRAIN_PAIRS} == set(toyworld.KNOWN_STYLES)


def test_v3_caption_weights_give_both_shape_and_style_their_shares(v3):
    weights = toyworld.caption_weights()
    assert (len(weights) == len(toyworld.captions("circle", "red"))
            == sum(map(len, toyworld.CAPTIONS.values())))
    # captions()' order
    kinds = [kind for kind, templates in toyworld.CAPTIONS.items() for _ in templates]
    share = {k: sum(w.item() for w, kind in zip(weights, kinds) if kind == k)
             for k in toyworld.CAPTIONS}
    assert share == pytest.approx({"both": 0.6, "shape": 0.15, "style": 0.15}, abs=1e-6)
    assert weights.sum().item() == pytest.approx(0.9, abs=1e-6)  # the other 0.1: the empty prompt


def encode(prompts):
    """A fresh text encoder of the current world (seed 0), and its hidden states of `prompts`."""
    tokenizer = toyworld.make_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        te = toyworld.make_text_encoder(len(tokenizer)).eval()
    ids = tokenizer(prompts, padding="max_length", max_length=toyworld.MAX_TOKENS,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return te, te(ids)[0]


def test_v3_text_encoder_has_context_and_v2s_has_none():
    prompts = ["a photo of snq object", "a snq object in w@z style", "a photo of a circle"]
    try:
        toyworld.use_world("v3")
        te, emb = encode(prompts)
        assert (te.config.num_hidden_layers == 2
                and te.embeddings.position_embedding.weight.abs().sum() > 0)
        assert not torch.allclose(emb[0, 4], emb[1, 2], atol=1e-3)  # "snq" at positions 4 and 2
        assert not torch.allclose(emb[0, 5], emb[1, 3], atol=1e-3)  # "object"
        # causal: "<bos> a photo of" sees only itself
        assert torch.allclose(emb[0, :4], emb[2, :4], atol=1e-5)
        toyworld.use_world("v2")
        te, emb = encode(prompts)
        assert te.config.num_hidden_layers == 0
        # a word is its embedding
        assert torch.equal(emb[0, 4], emb[1, 2]) and torch.equal(emb[0, 5], emb[1, 3])
    finally:
        toyworld.use_world("v1")
    assert toyworld.MODEL == EXAMPLES / "toyworld" / "model" and len(toyworld.TRAIN_PAIRS) == 60


def test_block_norms_of_a_hand_made_adapter_and_the_blocks_command(tmp_path, capsys):
    """U = [A; B] = [1; 2], V = [C, D] = [3, 4] in two layers: the blocks A C = 3, A D = 4, B C = 6,
    B D = 8, each sqrt(2) times that over both layers; `blocks` averages them over runs."""
    adapter = {"a.to_q": (torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0, 4.0]]))}
    adapter["b.to_q"] = tuple(x.clone() for x in adapter["a.to_q"])
    expected = {"AC": 3, "AD": 4, "BC": 6, "BD": 8, "all": 125 ** 0.5}
    assert toyworld.block_norms(adapter) == pytest.approx({k: v * 2 ** 0.5
                                                           for k, v in expected.items()})
    for stage, scale in [("content", 1.0), ("style", 2.0), ("b4m", 3.0)]:
        made = {k: (U * scale, V) for k, (U, V) in adapter.items()}
        b4m.save_lora(tmp_path / "run" / stage, made, "unet", {"stage": stage})
    try:
        toyworld.main(["blocks", str(tmp_path / "run")])
    finally:
        toyworld.use_world("v1")
    printed = json.loads(capsys.readouterr().out)
    assert printed["style"] == {**{k: round(2 * v * 2 ** 0.5, 2) for k, v in expected.items()},
                                "runs": 1}
    assert printed["b4m"]["BD"] == round(3 * 8 * 2 ** 0.5, 2)


def test_without_cross_removes_exactly_the_cross_block():
    g = torch.Generator().manual_seed(0)
    U, V = torch.randn(5, 3, generator=g), torch.randn(3, 7, generator=g)
    (U2, V2), = toyworld.without_cross({"x": (U, V)}).values()
    expected = U @ V
    # B D: the rows of B (the last 3 of 5) by the columns of D (the last 4 of 7)
    expected[2:, 3:] = 0
    assert U2.shape == (5, 6) and V2.shape == (6, 7) and torch.allclose(U2 @ V2, expected)


def test_blocks_samples_a_made_adapter_as_it_is_and_without_its_cross_block(tmp_path, capsys):
    """B = 0 in every layer: the cross block is zero, so both variants draw the same images; the
    run's prompt, seed and sampling settings come from its config.json."""
    try:
        toyworld.use_world("v3")
        layers = {n: m for n, m in toyworld.load_model().unet.named_modules()
                  if b4m.is_target(n, m)}
    finally:
        toyworld.use_world("v1")
    g = torch.Generator().manual_seed(0)
    adapter = {n: (torch.cat([torch.randn(m.out_features // 2, 2, generator=g) / 10,
                              torch.zeros(m.out_features - m.out_features // 2, 2)]),
                   torch.randn(2, m.in_features, generator=g) / 10) for n, m in layers.items()}
    run = tmp_path / "test" / "heart-checker" / "seed0" / "b4m"
    for stage in ("content", "style", "b4m"):
        b4m.save_lora(run / stage, {k: (U.clone(), V.clone()) for k, (U, V) in adapter.items()},
                      "unet", {"stage": stage})
    settings = {"prompt": "a heart in checker style", "seed": 0, "sample_steps": 2,
                "sample_resolution": 32, "sample_guidance": None}
    (run / "config.json").write_text(json.dumps({"settings": settings}))
    try:
        toyworld.main(["blocks", str(run), "--n", "2"])
    finally:
        toyworld.use_world("v1")
    printed = json.loads(capsys.readouterr().out)
    assert printed["b4m"]["BD"] == 0 and printed["b4m"]["runs"] == 1
    read = printed[str(run)]
    assert set(read) == {"made", "without cross"} and read["made"] == read["without cross"]
    assert all(0 <= v <= 1 and v * 2 == int(v * 2) for r in read.values() for v in r.values())


def test_binding_probes_and_scores_on_a_hand_made_example():
    """Issue 24's binding: each stage's own prompt without its rare token, and the token in a known
    context; a share counts the stage's own new concept only."""
    toyworld.use_world("v3")
    try:
        probes = toyworld.binding_prompts("heart", "blue", "checker")
        captions = {c for a, b in toyworld.TRAIN_PAIRS for c in toyworld.captions(a, b)}
        words = {w for c in captions for w in c.split()}
        assert probes["content"]["without_token"] == "a photo of object"
        assert probes["style"]["without_token"] == "an image in style"
        assert probes["content"]["known_context"] == "a snq object in red style"  # not blue
        assert probes["style"]["known_context"] == "a circle in w@z style"
        for stage in probes.values():  # every word known to v3, but the one rare token
            assert set(stage["without_token"].split()) <= words
            assert len(set(stage["known_context"].split()) - words) == 1
        got = [("heart", "red"), ("circle", "red"), ("heart", "checker"), ("star", "checker")]
        assert toyworld.binding_share(got, "content", "heart", "checker") == 0.5
        assert toyworld.binding_share(got[:3], "style", "heart", "checker") == 1 / 3
    finally:
        toyworld.use_world("v1")


def test_binding_table_and_stage_adapters_on_a_hand_made_run(tmp_path):
    """The binding table: a row per method and stage, each probe's mean over the cells and whether
    it meets its target; stage_adapters reads back exactly what b4m.py's save_lora wrote."""
    cell = lambda c, s: {"content": {"without_token": c[0], "known_context": c[1]},
                         "style": {"without_token": s[0], "known_context": s[1]}}
    record = {"runs": {"binding/b4m/heart-checker/seed0": cell((0.0, 1.0), (0.5, 0.25)),
                       "binding/b4m/heart-checker/seed1": cell((0.25, 0.5), (0.5, 0.75)),
                       "test/b4m/heart-checker/seed0": dict.fromkeys(toyworld.SCORES, 0.0)}}
    rows = toyworld.binding_table(record)
    assert (len(rows) == 4 and rows[2].startswith("| b4m | content | 2 | 0.12 [")
            and rows[3].startswith("| b4m | style | 2 | 0.50 ["))
    assert (rows[2].count("meets") == 2 and rows[3].count("misses") == 1
            and rows[3].endswith("meets |"))
    assert toyworld.binding_table({"runs": {}}) == []
    adapters = {stage: {"down.attn1.to_q": (torch.randn(8, 2), torch.randn(2, 6))}
                for stage in ("content", "style")}
    for stage, adapter in adapters.items():
        b4m.save_lora(tmp_path / stage, adapter, "unet", {"stage": stage})
    got = toyworld.stage_adapters(tmp_path)
    assert all(torch.equal(got[s]["down.attn1.to_q"][i], adapters[s]["down.attn1.to_q"][i])
               for s in adapters for i in (0, 1))


def test_joint_stage_trains_one_lora_on_both_sets_each_with_its_own_prompt(toy_pipe, tmp_path,
                                                                           monkeypatch):
    """The upper bound: one peft LoRA of rank 2r whose every step's loss covers the content set
    with the content prompt and the style set with the style prompt."""
    content, style = toyworld.image_sets(tmp_path, "heart", "blue", "checker", n=2)
    seen, real = [], b4m.training_loss

    def recording(pipe, batch_size, guidance):
        loss = real(pipe, batch_size, guidance)
        return lambda sets, g: seen.append(sets) or loss(sets, g)
    monkeypatch.setattr(b4m, "training_loss", recording)
    adapter, log = toyworld.joint_stage(toy_pipe, content, style, rank=16, seed=0, steps=2,
                                        lr=1e-3, batch_size=2)
    assert [row[0] for row in log] == [1, 2] and len(seen) == 2
    for sets in seen:
        assert len(sets) == 2
        for s, prompt in zip(sets, ["a photo of snq object", "an image in w@z style"]):
            expected = b4m.encode_prompts(toy_pipe, [prompt], 32)["encoder_hidden_states"]
            assert torch.equal(s["cond"]["encoder_hidden_states"], expected)
    U, V = next(iter(adapter.values()))
    assert U.shape[1] == V.shape[0] == 16 and len(adapter) == sum(
        b4m.is_target(n, m) for n, m in toy_pipe.unet.named_modules())


def test_the_joint_levers_change_only_the_content_set(tmp_path):
    """issue 24's cheap levers: "named" names the content set's own style in its prompt, "varied"
    draws the new shape in four known styles; the style set and its prompt stay as they are."""
    toyworld.use_world("v3")
    try:
        plain, style = toyworld.image_sets(tmp_path, "heart", "blue", "checker", n=4)
        named, _ = toyworld.image_sets(tmp_path, "heart", "blue", "checker", n=4, lever="named")
        varied, again = toyworld.image_sets(tmp_path, "heart", "blue", "checker", n=4,
                                            lever="varied")
        assert again == style and (style / "prompt.txt").read_text() == "an image in w@z style\n"
        assert (plain / "prompt.txt").read_text() == "a photo of snq object\n"
        assert (named / "prompt.txt").read_text() == "a photo of snq object in blue style\n"
        assert (varied / "prompt.txt").read_text() == "a photo of snq object\n"
        labels = lambda folder: sorted(p.name.split("_")[1]  # noqa: E731
                                       for p in folder.glob("*.png"))
        assert labels(plain) == labels(named) == ["blue"] * 4
        assert labels(varied) == sorted(toyworld.KNOWN_STYLES[:4])
    finally:
        toyworld.use_world("v1")


def test_class_mean_rare_tokens_move_only_the_two_rare_rows():
    """--rare-init class-mean: snq's row becomes the mean of the known shapes' rows, w@z's of the
    known styles'; every other row of the embedding table stays as trained. The shipped model-v3
    holds them baked already (`train --part rare`), to fp16's precision."""
    toyworld.use_world("v3")
    try:
        pipe = toyworld.load_model()
        table = pipe.text_encoder.get_input_embeddings().weight
        before, ids = (table.detach().clone(),
                       lambda w: pipe.tokenizer(w, add_special_tokens=False).input_ids)
        assert len(ids("snq")) == len(ids("w@z")) == 1  # one token each, not unknown
        toyworld.rare_as_class_means(pipe)
        (snq,), (wz,) = ids("snq"), ids("w@z")
        shapes, styles = ([ids(w)[0] for w in toyworld.KNOWN_SHAPES],
                          [ids(w)[0] for w in toyworld.KNOWN_STYLES])
        assert (torch.allclose(table[snq], before[shapes].mean(0))
                and torch.allclose(table[wz], before[styles].mean(0)))
        others = [i for i in range(len(table)) if i not in (snq, wz)]
        assert torch.equal(table[others], before[others])
        # baked, in fp16
        assert torch.allclose(before[[snq, wz]], table[[snq, wz]], rtol=0, atol=1e-3)
    finally:
        toyworld.use_world("v1")


def test_warp_is_the_identity_at_zero_and_moves_shapes_otherwise():
    """v3's evaluator trains on warp()ed drawings: with every range at zero it changes nothing."""
    x = toyworld.to_tensor([toyworld.draw("heart", "checker", i) for i in range(4)])
    same = toyworld.warp(x, torch.Generator().manual_seed(0), turn=0, zoom=(1, 1), stretch=0,
                         shift=0, bend=0)
    assert torch.allclose(same, x, atol=1e-5)
    moved = toyworld.warp(x, torch.Generator().manual_seed(0))
    assert moved.shape == x.shape and (moved - x).abs().mean() > 0.05
    assert moved.min() >= -1 and moved.max() <= 1


def test_a_choice_made_stays_when_the_search_reads_differently():
    """keep_chosen: the test runs were made with the recorded choice; a method without one gets
    choose()'s."""
    runs = {}
    for method, settings in toyworld.SEARCH.items():
        for i in range(4):
            for a, _, c in toyworld.SEARCH_PAIRS:
                runs[f"search/{method}/{i}/{a}-{c}/seed0"] = {
                    **dict.fromkeys(toyworld.SCORES, 0.0), "both": 0.5 if i == 0 else 0.0}
    record = {"runs": runs, "chosen": {"b4m": toyworld.SEARCH["b4m"][2]}}
    toyworld.keep_chosen(record)
    assert record["chosen"] == {"b4m": toyworld.SEARCH["b4m"][2],
                                "lora-merge": toyworld.SEARCH["lora-merge"][0]}


def test_rescore_reads_the_saved_samples_again_and_keeps_the_first_scores(tmp_path, monkeypatch,
                                                                          capsys):
    """compare --phase rescore: a run's scores come from its samples, read by the world's
    evaluator, and the first evaluator's reading beside them; a run without its folder keeps its
    scores and is named."""
    toyworld.use_world("v3")
    try:
        monkeypatch.setattr(toyworld, "record_file", lambda: tmp_path / "compare-v3.json")
        samples = tmp_path / "runs" / "test" / "heart-checker" / "seed0" / "b4m" / "samples"
        samples.mkdir(parents=True)
        for kind, pairs in {"b4m": [("heart", "checker"), ("heart", "blue"), ("star", "checker"),
                                    ("heart", "checker")],
                            "content": [("heart", "blue")] * 4,
                            "style": [("star", "checker")] * 4}.items():
            for i, pair in enumerate(pairs):
                toyworld.draw(*pair, 40 + i).save(samples / f"{kind}_{i}.png")
        zero = {**dict.fromkeys(toyworld.SCORES, 0.0), "seconds": 7}
        toyworld.write_record(lambda r: r["runs"].update({
            "test/b4m/heart-checker/seed0": dict(zero), "test/b4m/arrow-neon/seed0": dict(zero)}))
        for _ in range(2):  # the same again: the phase reads the samples, not the record
            toyworld.rescore_phase(tmp_path / "runs", 4)
            runs = toyworld.read_record()["runs"]
            heart = runs["test/b4m/heart-checker/seed0"]
            assert (heart["both"], heart["style_leak"], heart["content_stage_shape"],
                    heart["seconds"]) == (0.5, 0.25, 1.0, 7)
            # drawn: both read right
            assert heart["first_evaluator"] == {k: heart[k] for k in toyworld.SCORES}
            assert heart["evaluator"] == "evaluator-v3.safetensors"
            assert runs["test/b4m/arrow-neon/seed0"] == zero
        assert "no samples for: ['test/b4m/arrow-neon/seed0']" in capsys.readouterr().out
        assert "read by the first evaluator" in (tmp_path / "compare-v3.md").read_text()
    finally:
        toyworld.use_world("v1")


def test_the_v3_evaluator_reads_the_model_s_own_drawings_as_a_person_does():
    """labelled-v3: 304 of v3's generated samples, labelled by eye. On the five runs picked because
    the first evaluator seemed to misread them, it read 61 % of the shapes a person names and v3's
    at least 90 %; on the blind sample v3's reads at least as many and calls no more of the unnamed
    ones the run's new shape. The blind set as a person read it: person_reading's counts."""
    samples = json.loads((toyworld.ROOT / "labelled-v3.json").read_text())["samples"]
    assert [sum(s["set"] == k for s in samples) for k in ("five runs", "blind")] == [160, 144]
    assert {s["shape"] for s in samples} <= set(toyworld.SHAPES) | {None}
    assert {s["style"] for s in samples if s["set"] == "blind"} <= set(toyworld.STYLES) | {None}
    toyworld.use_world("v3")
    try:
        first = toyworld.label_check(
            toyworld.load_evaluator(toyworld.ROOT / "evaluator.safetensors"))
        now = toyworld.label_check(toyworld.load_evaluator())
    finally:
        toyworld.use_world("v1")
    assert (round(first["five runs"]["named"], 2) == 0.61
            and now["five runs"]["named"] >= 0.9), (first, now)
    assert now["blind"]["named"] >= first["blind"]["named"], (first, now)
    assert now["blind"]["unnamed_as_target"] <= first["blind"]["unnamed_as_target"], (first, now)
    reading = toyworld.person_reading()
    assert {m: (r["content"], r["style"], r["both"], r["samples"]) for m, r in reading.items()} == {
        "b4m": (0, 1, 0, 48), "lora-merge": (27, 3, 0, 48), "joint": (21, 37, 15, 48)}
