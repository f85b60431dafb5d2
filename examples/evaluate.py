"""Score finished b4m runs with CLIP, the way content-style customization papers compare methods.

    python examples/evaluate.py RUN [RUN ...] [--clip openai/clip-vit-base-patch32]

For each run's samples/b4m_*.png (images of the combined prompt):
    clip_t     mean cosine(sample, combined prompt)  - does the image follow the prompt?
    clip_i     mean cosine(sample, content image)    - is the subject kept? (all pairs)
    style_sim  mean cosine(sample, style image)      - is the style kept? (all pairs)
Raw cosines in [-1, 1] (CLIPScore would report 2.5 * max(cos, 0); papers often report 100 * cos).
Writes RUN/metrics.json and prints one table row per run.
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # b4m.py sits one folder up
# b4m's image reader (EXIF-upright, transparency on white, centre crop), so that the content and
# style images are scored as training saw them, and its atomic writer (temp file, os.replace).
from b4m import IMAGES, Parser, UsageError, open_image, read_config, save_json  # noqa: E402



def read_images(files, resolution):
    """The readable ones, as b4m reads a set (open_image); each other file named and skipped."""
    images = []
    for path in files:
        try:
            images.append(open_image(path, resolution))
        except Exception as e:  # PIL raises many kinds
            print(f"warning: skipping {path}: not a readable image ({type(e).__name__})",
                  file=sys.stderr)
    return images

def read_run(run):
    """(prompt, samples, content images, style images) of a run; a UsageError if it is not a
    finished run."""
    settings = read_config(run)
    if settings is None:
        raise UsageError(f"{run}: no b4m config.json; pass the --out folder of a b4m run")
    prompt, resolution = settings["prompt"], settings["resolution"]
    # Samples at the size they were made, references at the size they were trained at.
    samples = read_images(sorted((run / "samples").glob("b4m_*.png")),
                          settings.get("sample_resolution") or resolution)
    if not samples:
        raise UsageError(f"{run}: no samples/b4m_*.png; finish the run, or make them with "
                         f"`python b4m.py sample --run {run}`")
    refs = []
    for key in ("content", "style"):  # b4m stores them resolved: any working folder will do
        folder = Path(settings[key])
        files = folder.iterdir() if folder.is_dir() else []
        refs.append(read_images(sorted(p for p in files if p.suffix.lower() in IMAGES
                                       and p.is_file()), resolution))
        if not refs[-1]:
            raise UsageError(f"{run}: its {key} folder {folder} (config.json) has no readable "
                             f"image; fix settings.{key} in config.json")
    return prompt, samples, *refs


def load_clip(name):
    from transformers import CLIPModel, CLIPTokenizer

    # transformers 5: the PIL processor gives the same pixels whether or not torchvision is there
    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # transformers 4
        from transformers import CLIPImageProcessor as ImageProcessor
    try:
        # fp32: cosines comparable across machines
        model = CLIPModel.from_pretrained(name, dtype=torch.float32)
        processor = ImageProcessor.from_pretrained(name)
        tokenizer = CLIPTokenizer.from_pretrained(name)
    except Exception as e:
        raise UsageError(f"--clip {name}: could not load a CLIP model, tokenizer and image "
                         f"processor ({type(e).__name__}); pass a hub id (cached, or with "
                         f"network) or a save_pretrained folder") from None
    return model.eval().to("cuda" if torch.cuda.is_available() else "cpu"), processor, tokenizer


def unit(out):
    """transformers 5's get_*_features return a BaseModelOutputWithPooling whose pooler_output is
    the *projected* embedding (transformers 4 returned that tensor itself). Unit length: dot =
    cosine."""
    out = out if isinstance(out, torch.Tensor) else out.pooler_output
    return F.normalize(out.float(), dim=-1)


@torch.inference_mode()
def embed_images(clip, images, batch=32):
    model, image_processor, _ = clip
    chunks = (image_processor(images=images[i:i + batch], return_tensors="pt")
              for i in range(0, len(images), batch))
    return torch.cat([unit(model.get_image_features(**x.to(model.device))) for x in chunks])


@torch.inference_mode()
def embed_text(clip, texts):
    model, _, tokenizer = clip
    # Truncated to CLIP's context (77 tokens): a longer prompt would run past its position
    # embeddings.
    x = tokenizer(texts, padding=True, truncation=True, return_tensors="pt",
                  max_length=model.config.text_config.max_position_embeddings)
    return unit(model.get_text_features(**x.to(model.device)))


def evaluate(clip, prompt, samples, content, style):
    s = embed_images(clip, samples)
    return {"clip_t": (s @ embed_text(clip, [prompt]).T).mean().item(),
            "clip_i": (s @ embed_images(clip, content).T).mean().item(),
            # CLIP image similarity as a simple stand-in for style: the paper and others may use a
            # dedicated style encoder (e.g. CSD) or Gram-matrix distances, which separate style
            # from content.
            "style_sim": (s @ embed_images(clip, style).T).mean().item()}


def main(argv=None):
    p = Parser(prog="evaluate.py",
               description="CLIP scores (clip_t, clip_i, style_sim) of finished b4m runs.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="a b4m run's --out folder")
    p.add_argument("--clip", default="openai/clip-vit-base-patch32",
                   help="CLIP hub id or local folder")
    try:
        args = p.parse_args(sys.argv[1:] if argv is None else argv)
        # every run checked before the model loads
        data = [read_run(Path(run)) for run in args.runs]
        clip = load_clip(args.clip)
    except UsageError as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    width = max(len("run"), *map(len, args.runs))
    print(f"{'run':{width}}  {'samples':>7}  {'clip_t':>8}  {'clip_i':>8}  {'style_sim':>9}")
    for run, (prompt, samples, content, style) in zip(args.runs, data):
        metrics = evaluate(clip, prompt, samples, content, style)
        save_json(Path(run) / "metrics.json", metrics)
        print(f"{run:{width}}  {len(samples):7d}  {metrics['clip_t']:8.4f}  "
              f"{metrics['clip_i']:8.4f}  {metrics['style_sim']:9.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
