"""The made adapter of a finished b4m run at several strengths, in one grid image.

    python examples/scale_grid.py RUN [--scales 0 0.5 1 1.5] [--out FILE]

Cell (row i, column j): the made adapter with the style half at scales[i] and the content half
at scales[j], U = [A; s_s B], V = [C, s_c D] (b4m.reassemble), one image of the run's --prompt
with the run's seed and sampling settings: the cell at (1, 1) is the run's samples/b4m_0.png
(where the run sampled at strengths 1, the default).
Default FILE: RUN/samples/scale_grid.png. FILE is only ever replaced if this script wrote it.
B4M runs only: a --baseline lora-merge adapter has no halves to scale.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # b4m.py sits one folder up
import b4m  # noqa: E402

MARK = "b4m-scale-grid"  # a PNG text key: how a grid this script wrote is told from other files


def is_grid(path):
    from PIL import Image

    try:
        with Image.open(path) as im:
            return MARK in getattr(im, "text", {})
    except Exception:  # PIL raises many kinds on files that are no image
        return False


def render(pipe, made, prompt, scales, settings):
    """The grid (PIL image): rows the style scale, columns the content scale."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    rows = [[b4m.generate(pipe, b4m.reassemble(made, made, s_c, s_s), prompt, num_samples=1,
                          steps=settings["sample_steps"], resolution=settings["sample_resolution"],
                          seed=settings["seed"], guidance=settings["sample_guidance"])[0]
             for s_c in scales] for s_s in scales]
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * len(scales), h * len(scales)), "white")
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            grid.paste(im, (j * w, i * h))
    info = PngInfo()
    info.add_text(MARK, f"rows: style scale, columns: content scale, both {list(scales)}")
    return grid, info


def main(argv=None):
    p = b4m.Parser(prog="scale_grid.py", description=__doc__.strip().splitlines()[0])
    p.add_argument("run", metavar="RUN", help="a finished b4m run's --out folder")
    p.add_argument("--scales", nargs="+", type=b4m.FINITE, default=[0.0, 0.5, 1.0, 1.5],
                   help="the strengths, the same for rows and columns (default 0 0.5 1 1.5)")
    p.add_argument("--out", metavar="FILE",
                   help="the grid PNG (default RUN/samples/scale_grid.png)")
    try:
        args = p.parse_args(sys.argv[1:] if argv is None else argv)
        run = Path(args.run)
        out = Path(args.out or run / "samples" / "scale_grid.png")
        settings = b4m.read_config(run)
        if settings is None:
            raise b4m.UsageError(f"{run}: no b4m config.json; pass the --out folder of a b4m run")
        if settings["baseline"] != "b4m":
            raise b4m.UsageError(f"{run}: a --baseline {settings['baseline']} run; its adapter "
                                 f"has no content and style halves to scale")
        if not (run / "b4m" / b4m.WEIGHTS).is_file():
            raise b4m.UsageError(f"{run}: no b4m/{b4m.WEIGHTS}; finish the run first "
                                 f"(b4m.py --resume)")
        if out.exists() and not is_grid(out):
            raise b4m.UsageError(f"--out {out}: exists and is not a scale grid; pick a new file")
        # The device and dtype as `b4m.py sample` picks them for this run.
        device, dtype = b4m.pick_device(argparse.Namespace(**settings))
        with b4m.locked(run):  # not while b4m.py trains or samples in this run
            pipe = b4m.load_pipeline(settings["model"], device, b4m.DTYPES[dtype])
            made = b4m.load_lora(run / "b4m" / b4m.WEIGHTS, *b4m.denoiser_of(pipe),
                                 b4m.adapter_metadata(argparse.Namespace(**settings), "make"))
            grid, info = render(pipe, made, settings["prompt"], args.scales, settings)
            b4m.write_file(out, b4m.to_bytes(lambda f: grid.save(f, format="PNG", pnginfo=info)))
    except b4m.UsageError as e:
        print(f"scale_grid.py: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({len(args.scales)} x {len(args.scales)}: rows style scale, columns "
          f"content scale, {args.scales})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
