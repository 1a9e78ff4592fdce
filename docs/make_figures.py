"""Makes the README's figures with the pack itself, on the pack's own world model (world/, issue 16).

    python docs/make_figures.py            (from the pack root, with ComfyUI's Python)

The case is the one of example_workflows/attend_and_excite_world.json (its prompt, subjects, seed, steps, cfg
and size): a two-object prompt for which the plain model drops a subject and Attend-and-Excite, at the paper's
settings, brings it back. The checkpoint goes through Load Checkpoint, the pictures through VAE Decode, the
maps through the Attention Map Visualiser, as in the workflow. It also writes the example's thumbnail
(example_workflows/attend_and_excite_world.jpg, what the template browser shows): plain and A&E above, A&E's
subject maps (mean over the steps, over its picture) below. It runs on one CPU thread (see below).
"""
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from harness import pack_module  # noqa: E402  (boots the ComfyUI host and loads the pack)

import nodes  # noqa: E402
import torch  # noqa: E402

# One CPU thread, as `run --demo` runs the world example: A&E's gradient steps amplify the order in which floats
# are summed, so at another thread count the guided picture of the shipped seed can differ.
torch.set_num_threads(1)

OUT = ROOT / "docs" / "figures"
EXAMPLE = ROOT / "example_workflows" / "attend_and_excite_world.json"
THUMBNAIL = EXAMPLE.with_suffix(".jpg")
CHECKPOINT = ROOT / "world" / "world_sd15.safetensors"


def save(array: np.ndarray, name: str, scale: int = 1) -> None:
    picture = Image.fromarray((np.clip(array, 0, 1) * 255).astype(np.uint8))
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    picture.save(OUT / name)
    print("wrote", OUT / name)


def thumbnail(panels: list[tuple[str, np.ndarray]], side: int = 256, gap: int = 8, strip: int = 24) -> Image.Image:
    """A 2x2 contact sheet of (label, picture) panels, each `side` px under a `strip` px label."""
    rendering = pack_module("pictures.rendering")
    face = rendering.font(12)
    sheet = Image.new("RGB", (2 * side + gap, 2 * (side + strip)), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (label, picture) in enumerate(panels):
        x, y = (index % 2) * (side + gap), (index // 2) * (side + strip)
        draw.text((x + 4, y + 6), label, fill="black", font=face)
        tile = Image.fromarray((np.clip(picture, 0, 1) * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR)
        sheet.paste(tile, (x, y + strip))
    return sheet


def example_settings() -> dict:
    by_type = {n["type"]: n["widgets_values"] for n in json.loads(EXAMPLE.read_text())["nodes"]}
    text, subjects = by_type["AttnGuideTextEncode"]
    seed, _control, steps, cfg, sampler, scheduler, _denoise, resolution, _record = by_type["AttnGuideKSampler"]
    width, height, _batch = by_type["EmptyLatentImage"]
    return dict(text=text, subjects=subjects, seed=seed, steps=steps, cfg=cfg, sampler=sampler, scheduler=scheduler,
                resolution=resolution, width=width, height=height)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    case = example_settings()
    sampler_nodes = pack_module("nodes.sampler")
    visualiser = pack_module("nodes.visualiser")
    GuidanceConfig = pack_module("guidance.sampler").GuidanceConfig
    model, clip, vae = pack_module("world.model").load_checkpoint(CHECKPOINT)
    positive, subjects = pack_module("nodes.text_encode").AttentionTextEncode.execute(
        clip, case["text"], case["subjects"]).args
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = nodes.EmptyLatentImage().generate(case["width"], case["height"], 1)[0]
    runs = {}
    for name, config in (("plain", None), ("attend_and_excite", GuidanceConfig()),
                         ("a_star", GuidanceConfig(loss_weights={"segregation": 1.0, "retention": 1.0},
                                                   guidance_end=1.0, refinement=()))):
        with torch.inference_mode():
            out = sampler_nodes.AttentionKSampler.execute(
                model, case["seed"], case["steps"], case["cfg"], case["sampler"], case["scheduler"], positive,
                negative, latent, 1.0, subjects, case["resolution"], True, guidance=config)
        runs[name] = (out.args[0], out.args[1])
    last_guided = int(round(0.5 * case["steps"])) - 1
    detector = pack_module("world.detector")
    pictures = {}
    for name, (samples, record) in runs.items():
        image = pictures[name] = vae.decode(samples["samples"]).detach()
        found = detector.detect(image[0].numpy().astype(np.float64))
        print(f"{name}: the detector finds {', '.join(f'{d.colour} {d.shape}' for d in found) or 'nothing'}")
        save(image[0].numpy(), f"{name}_image.png")
        heat = visualiser.render(record, "step", last_guided, "turbo", 0.0, 0)
        save(np.concatenate(list(heat), axis=1), f"{name}_maps_step{last_guided}.png")
        save(visualiser.render(record, "overlap", -1, "turbo", 0.0, 0)[0], f"{name}_overlap.png")
    save(visualiser.render(runs["attend_and_excite"][1], "timeline", 0, "turbo", 0.0, 0)[0], "timeline.png")
    guided_maps = visualiser.render(runs["attend_and_excite"][1], "average", -1, "turbo", 0.6, 0,
                                    image=pictures["attend_and_excite"])
    subjects = runs["attend_and_excite"][1].subjects.labels
    panels = [(f"plain KSampler, seed {case['seed']}", pictures["plain"][0].numpy()),
              (f"Attend-and-Excite, seed {case['seed']}", pictures["attend_and_excite"][0].numpy())]
    panels += [(f"A&E map: {label}", heat) for label, heat in zip(subjects, guided_maps)]
    thumbnail(panels[:4]).save(THUMBNAIL, quality=90)
    print("wrote", THUMBNAIL)
    save(visualiser.render(runs["attend_and_excite"][1], "loss plot", 0, "turbo", 0.0, 0)[0], "loss_plot.png")
    L = pack_module("guidance.losses")
    for name, (_samples, record) in runs.items():
        index = record.steps.index(last_guided)
        maps = L.subject_attention_maps(record.grid_maps(index), record.subjects, record.resolution)
        peaks = L.max_attention_per_subject(maps)[0].tolist()
        print(f"{name}: smoothed peak attention at step {last_guided}: "
              + ", ".join(f"{label} {peak:.3f}" for label, peak in zip(record.subjects.labels, peaks)))


if __name__ == "__main__":
    main()
