"""How much does each adapter of a finished b4m run change the base model, off and on its prompt?

    python examples/drift.py RUN [--json OUT]

Per adapter (content, style, b4m = the made one, as the run saved them):
    drift   mean squared change of the denoiser's prediction on unrelated prompts (DRIFT_PROMPTS):
            how much the adapter disturbs what the base model already does
    effect  the same on the adapter's own prompt (content_prompt, style_prompt, prompt)
The adapted and the base model see the same latents and timesteps (100..900, where the prompt
matters), drawn from the run's seed at its training resolution. Runs on the CPU in the run's
dtype (fp16 runs in fp32: fp16 is not supported on the CPU). Every model b4m trains: SD, SDXL
(UNets), SD3 and FLUX (transformers; FLUX.1 dev at the run's --guidance). OUT: JSON.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # b4m.py sits one folder up
import b4m  # noqa: E402

DRIFT_PROMPTS = ["a photo of a dog", "a city street at night", "a bowl of fruit on a table",
                 "a portrait of an old man"]


def predict(pipe, z, t, cond, guidance):
    """The denoiser's output for latents z (N x C x h x w): a UNet's noise (or v), a transformer's
    velocity. FLUX is called as b4m.training_loss calls it: latents packed 2 x 2, position ids,
    t / 1000 and, if guidance-distilled, a guidance value."""
    denoiser, prefix = b4m.denoiser_of(pipe)
    if prefix == "unet":
        return b4m.denoise(denoiser, z, t, cond).float()
    text = {k: cond[k] for k in ("encoder_hidden_states", "pooled_projections")}
    if not b4m.is_flux(pipe):  # SD3 / SD3.5
        return denoiser(hidden_states=z, timestep=t, **text).sample.float()
    n, c, h, w = z.shape
    g = None  # FLUX.1 schnell: no guidance input
    if denoiser.config.guidance_embeds:
        g = torch.full((n,), guidance, device=z.device, dtype=z.dtype)
    v = denoiser(hidden_states=pipe._pack_latents(z, n, c, h, w), timestep=t / 1000, guidance=g,
                 txt_ids=torch.zeros(text["encoder_hidden_states"].shape[1], 3).to(z),
                 img_ids=pipe._prepare_latent_image_ids(n, h // 2, w // 2, z.device, z.dtype),
                 **text).sample
    return pipe._unpack_latents(v, h, w, 1).float()  # sizes in latents, not pixels: scale 1


@torch.no_grad()
def drift(pipe, adapters, prompts, resolution, seed, guidance=3.5):
    """{"drift": {name: value}, "effect": {name: value}} for adapters {name: {layer: (U, V)}},
    prompts {name: its own prompt}."""
    denoiser, prefix = b4m.denoiser_of(pipe)
    k, g = len(DRIFT_PROMPTS), torch.Generator().manual_seed(seed)
    size = resolution // pipe.vae_scale_factor
    z = torch.randn(k, pipe.vae.config.latent_channels, size, size, generator=g)
    z = z.to(denoiser.device, denoiser.dtype)
    t = torch.randint(100, 900, (k,), generator=g).to(denoiser.device)
    # Encoded before any adapter is in: adapters change the denoiser only, never the text.
    drift_cond = b4m.encode_prompts(pipe, DRIFT_PROMPTS, resolution)
    base = predict(pipe, z, t, drift_cond, guidance)
    report = {"drift": {}, "effect": {}}
    for name, adapter in adapters.items():
        own_cond = b4m.encode_prompts(pipe, [prompts[name]] * k, resolution)
        base_own = predict(pipe, z, t, own_cond, guidance)
        # diffusers' own loader, as b4m.generate; unloaded, not unfused, so the base stays exact
        denoiser.load_lora_adapter(b4m.diffusers_keys(adapter, prefix), prefix=prefix,
                                   adapter_name="drift")
        try:
            report["drift"][name] = F.mse_loss(predict(pipe, z, t, drift_cond, guidance),
                                               base).item()
            report["effect"][name] = F.mse_loss(predict(pipe, z, t, own_cond, guidance),
                                                base_own).item()
        finally:
            denoiser.unload_lora()
    return report


def load_run(run):
    """(pipeline on the CPU, {name: adapter}, {name: prompt}, settings) of a finished run."""
    settings = b4m.read_config(run)
    if settings is None:
        raise b4m.UsageError(f"{run}: no b4m config.json; pass the --out folder of a b4m run")
    for stage in b4m.STAGES:
        if not (run / b4m.NAMES[stage] / b4m.WEIGHTS).is_file():
            raise b4m.UsageError(f"{run}: no {b4m.NAMES[stage]}/{b4m.WEIGHTS}; finish the run "
                                 f"first (b4m.py --resume)")
    dtype = b4m.DTYPES["fp32" if settings["dtype"] == "fp16" else settings["dtype"]]
    pipe = b4m.load_pipeline(settings["model"], "cpu", dtype)
    denoiser, prefix = b4m.denoiser_of(pipe)
    args = argparse.Namespace(**settings)
    adapters = {b4m.NAMES[s]: b4m.load_lora(run / b4m.NAMES[s] / b4m.WEIGHTS, denoiser, prefix,
                                            b4m.adapter_metadata(args, s)) for s in b4m.STAGES}
    prompts = {"content": settings["content_prompt"], "style": settings["style_prompt"],
               "b4m": settings["prompt"]}
    return pipe, adapters, prompts, settings


def is_report(path):
    """Whether path holds what this script writes (the one kind of file --json replaces)."""
    try:
        return set(json.loads(Path(path).read_text())) == {"drift", "effect"}
    except (OSError, ValueError, TypeError):
        return False


def main(argv=None):
    p = b4m.Parser(prog="drift.py", description=__doc__.strip().splitlines()[0])
    p.add_argument("run", metavar="RUN", help="a finished b4m run's --out folder")
    p.add_argument("--json", metavar="OUT", help="also write the numbers to this JSON file")
    try:
        args = p.parse_args(sys.argv[1:] if argv is None else argv)
        out = args.json and Path(args.json)
        if out and out.exists() and not is_report(out):  # checked before minutes of work
            raise b4m.UsageError(f"--json {out}: exists and is not a drift report; pick a new "
                                 f"file")
        pipe, adapters, prompts, settings = load_run(Path(args.run))
        report = drift(pipe, adapters, prompts, settings["resolution"], settings["seed"],
                       settings["guidance"])
        if out:  # null where not finite: JSON has no NaN
            b4m.save_json(out, {kind: {k: v if math.isfinite(v) else None for k, v in d.items()}
                                for kind, d in report.items()})
    except b4m.UsageError as e:
        print(f"drift.py: error: {e}", file=sys.stderr)
        return 2
    print(f"{'adapter':8} {'drift':>12} {'effect':>12}")
    for name in adapters:
        print(f"{name:8} {report['drift'][name]:12.4g} {report['effect'][name]:12.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
