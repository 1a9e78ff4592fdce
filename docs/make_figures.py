"""Makes the README's figures with the pack itself, on the tiny random SD1.5-shaped model.

    python docs/make_figures.py            (from the pack root, with ComfyUI's Python)

The weights are random: the decoded pictures are noise and say nothing about image quality; the
attention maps, their change under guidance and the loss curves are what the pack really computes.
"""
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from harness import pack_module  # noqa: E402  (boots the ComfyUI host and loads the pack)

import nodes  # noqa: E402
import torch  # noqa: E402

OUT = ROOT / "docs" / "figures"
TEXT, SUBJECTS, STEPS, SEED = "a cat and a frog", "cat, frog", 20, 4


def save(array: np.ndarray, name: str) -> None:
    Image.fromarray((np.clip(array, 0, 1) * 255).astype(np.uint8)).save(OUT / name)
    print("wrote", OUT / name)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    tiny = pack_module("runner.tiny_models")
    sampler_nodes = pack_module("nodes.sampler")
    visualiser = pack_module("nodes.visualiser")
    GuidanceConfig = pack_module("guidance.sampler").GuidanceConfig
    model, clip, vae = tiny.make_model("sd15"), tiny.make_clip("sd15"), tiny.make_vae()
    positive, subjects = pack_module("nodes.text_encode").AttentionTextEncode.execute(clip, TEXT, SUBJECTS).args
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = {"samples": torch.zeros(1, 4, 32, 32)}
    runs = {}
    for name, config in (("plain", None), ("attend_and_excite", GuidanceConfig()),
                         ("a_star", GuidanceConfig(loss_weights={"segregation": 1.0, "retention": 1.0},
                                                   guidance_end=1.0, refinement=()))):
        out = sampler_nodes.AttentionKSampler.execute(model, SEED, STEPS, 7.5, "euler", "normal", positive, negative,
                                                      latent, 1.0, subjects, 0, True, guidance=config)
        runs[name] = (out.args[0], out.args[1])
    last_guided = int(round(0.5 * STEPS)) - 1
    for name, (samples, record) in runs.items():
        image = vae.decode(samples["samples"])
        save(image[0].numpy(), f"{name}_image.png")
        heat = visualiser.render(record, "step", last_guided, "turbo", 0.0, 0)
        save(np.concatenate(list(heat), axis=1), f"{name}_maps_step{last_guided}.png")
        save(visualiser.render(record, "overlap", -1, "turbo", 0.0, 0)[0], f"{name}_overlap.png")
    save(visualiser.render(runs["attend_and_excite"][1], "timeline", 0, "turbo", 0.0, 0)[0], "timeline.png")
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
