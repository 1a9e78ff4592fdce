"""What keeps the world model from drawing a prompt's objects (issue 16: why no method raises the effect table's
rate): whether it removes the initial noise's mean, and whether its pictures depend on the shape word.

The world model's backgrounds come out in the wrong colour, speckled, and the colour follows the seed, not the
prompt; and it draws the right colour in a wrong shape. Measured:

  DC gain         on a blank scene (the training background, latent 0) noised at sigma: the slope of the
                  predicted noise's spatial mean on the true noise's, per channel (ideal 1; 0 = the model is
                  blind to the noise's mean, and sampling keeps it: sigma_max x (1/32 of a 32x32 latent's noise)
                  is a background offset of about 0.45)
  background      sampled images of one prompt: each image's background (the border's median, model space)
                  against the mean of its initial noise; correlation and slope (slope ~ sigma_max = kept)
  single objects  one-object prompts: images where the detector finds exactly that object and nothing else; and
                  where it finds an object of the prompt's colour, of its shape (chance for the shape: 1/3)
  shape word      the same seeds for 'a blue circle', 'a blue square', 'a blue triangle' and 'a red circle': the
                  pictures' mean |difference| when only the shape word changes, against when only the colour word
                  does; and the text encoder's output at the shape word's position, how much it changes (relative)
  caption gap     the EPS loss on one-object renders (sigma 1 and 3) with a wrong shape word, and with a wrong
                  colour word, against the right caption (relative; 0 = the word is not used): no sampling, so it
                  also reads a training run's state.pt while it trains
  object size     (--sizes) two-object prompts sampled at cfg 7.5, 4 and 2: objects per picture, their mean area
                  and the share of the picture that is not background, against the training renders'

    python benchmarks/world_diagnostics.py --ckpt world/world_sd15.safetensors     # all of them
    python benchmarks/world_diagnostics.py --ckpt world/world_sd3.safetensors --sizes
    python benchmarks/world_diagnostics.py --state RUN/state.pt                    # DC gain and caption gap

The DiT world model (world/dit.py, `--ckpt world/world_sd3.safetensors`): its image attention's spread (the mean
distance from a query to the image keys it attends to, per block and head, and the text's share; the one-step x0
error on noised renders), single objects, shape word and caption gap (its flow loss: x = (1 - s) x0 + s noise with s = sigma / (1 + sigma), the same signal-to-noise ratio as SD1.x's
sigma, target noise - x0); the DC gain and the background are the UNet's GroupNorm question and are not run.

A state is world/train.py's `state.pt` (its config names the UNet's widths), e.g. after
`python world/train.py --out RUN --batches 300 --batch-size 16 --lr 8e-4 [--model-channels 64 --channel-mult 1,2,2]`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import effect  # noqa: E402  (boots the host the same way)

SIGMAS = (None, 3.0, 0.5)  # None: the schedule's sigma_max


def dc_gain(diffusion_model, model_sampling, context, seed: int = 5) -> dict[float, float]:
    """sigma -> slope of mean(predicted eps) on mean(eps) over 32 blank scenes (channels 0-2)."""
    import torch
    generator = torch.Generator().manual_seed(seed)
    context = context.expand(32, -1, -1)
    out = {}
    for sigma in SIGMAS:
        sigma = float(model_sampling.sigma_max) if sigma is None else sigma
        offset = torch.randn(32, 4, 1, 1, generator=generator) * 0.1  # spread the means for a clean slope
        noise = torch.randn(32, 4, 32, 32, generator=generator) + offset
        sigmas = torch.full((32,), sigma)
        with torch.no_grad():
            eps = diffusion_model(sigma * noise / (1 + sigma ** 2) ** 0.5, model_sampling.timestep(sigmas).float(),
                                  context=context.to(noise))
        true, predicted = noise.mean((2, 3))[:, :3].flatten(), eps.float().mean((2, 3))[:, :3].flatten()
        true = true - true.mean()
        out[round(sigma, 2)] = float((true * (predicted - predicted.mean())).sum() / (true * true).sum())
    return out


def caption_loss_gap(diffusion_model, model_sampling, encode, count: int = 48, seed: int = 7,
                     sigmas=(1.0, 3.0), flow: bool = False) -> dict[str, float]:
    """How much the model's EPS loss on one-object renders grows when the caption names the wrong shape, or the
    wrong colour, than when it is right (relative; 0 = the word is not used), averaged over `sigmas`.
    `encode(captions)` gives the context [N, 77, C], or (context, pooled) for the MMDiT (`flow`: its loss at the
    same signal-to-noise ratios). Cheaper and steadier than sampling: for training runs."""
    import torch
    scenes = effect.pack_module("world.scenes")
    drawn = [scenes.sample_scene(seed, i, pairs=[scenes.seen_pairs()[i % len(scenes.seen_pairs())]])
             for i in range(count)]
    x0 = torch.from_numpy(scenes.rgb_to_latent(scenes.render(drawn)[0]))
    if flow:
        x0 = effect.pack_module("world.dit").to_model_latent(x0)
    colours = list(scenes.COLOURS)

    def caption(scene, colour_step=0, shape_step=0):
        colour, shape = scene.objects[0].pair
        return scenes.caption([(colours[(colours.index(colour) + colour_step) % len(colours)],
                                scenes.other_shape(shape, shape_step))])
    contexts = {"right": encode([caption(s) for s in drawn]), "shape": encode([caption(s, 0, 1) for s in drawn]),
                "colour": encode([caption(s, 1, 0) for s in drawn])}
    train = effect.pack_module("world.train")
    family = "sd3" if flow else "sd15"
    generator = torch.Generator().manual_seed(seed)
    losses = {name: 0.0 for name in contexts}
    for sigma in sigmas:
        noise = torch.randn(x0.shape, generator=generator)
        model_sigma = train.flow_sigma(sigma) if flow else sigma
        x, target, _ = train.noised(family, x0, torch.tensor(model_sigma), noise)
        timestep = model_sampling.timestep(torch.full((count,), model_sigma)).float()
        for name, context in contexts.items():
            with torch.no_grad():
                if flow:
                    eps = diffusion_model(x, timestep, context=context[0].to(x), y=context[1].to(x))
                else:
                    eps = diffusion_model(x, timestep, context=context.to(x))
            losses[name] += float(((eps.float() - target) ** 2).mean()) / len(sigmas)
    return {name: losses[name] / losses["right"] - 1 for name in ("shape", "colour")}


def _sample(model, clip, pairs, batch: int, steps: int, cfg: float = 7.5):
    import torch

    import nodes
    scenes = effect.pack_module("world.scenes")
    positive = nodes.CLIPTextEncode().encode(clip, scenes.caption(list(pairs)))[0]
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = {"samples": torch.zeros(batch, effect.latent_format(model).latent_channels, 32, 32)}
    with torch.inference_mode():
        return nodes.common_ksampler(model, 0, steps, cfg, "euler", "normal", positive, negative, latent)[0]["samples"]


def _rgb(model, latents):
    """Sampled latents (VAE space) as the pictures on the latent grid, through the model's latent format."""
    scenes = effect.pack_module("world.scenes")
    return scenes.latent_to_rgb(effect.latent_format(model).process_in(latents.float()).numpy())


def background_follows_noise(model, clip, steps: int) -> tuple[float, float]:
    """(correlation, slope) of each image's background on its initial noise's mean, 16 images of one prompt."""
    import comfy.sample
    import numpy as np
    import torch
    scale = effect.pack_module("world.model").LATENT_SCALE
    noise_mean = comfy.sample.prepare_noise(torch.zeros(16, 4, 32, 32), 0).mean((2, 3))[:, :3].numpy().ravel()
    x = _sample(model, clip, [("red", "circle")], 16, steps).float()[:, :3] * scale
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=-1)
    background = border.median(dim=-1).values.numpy().ravel()
    return float(np.corrcoef(noise_mean, background)[0, 1]), float(np.polyfit(noise_mean, background, 1)[0])


def single_objects(model, clip, steps: int) -> dict[str, int]:
    """Counts over 6 one-object prompts x 8 seeds: exact, colour (an object of the prompt's colour), shape, total."""
    scenes = effect.pack_module("world.scenes")
    detector = effect.pack_module("world.detector")
    seen = scenes.two_object_prompts()["seen"][::3][:8]
    counts = {"exact": 0, "colour": 0, "shape": 0, "total": 0}
    for pair in sorted({p for prompt in seen for p in prompt})[:6]:
        latents = _sample(model, clip, [pair], 8, steps)
        for found in detector.detect_batch(_rgb(model, latents)):
            counts["exact"] += {d.pair for d in found} == {pair}
            counts["colour"] += any(d.pair[0] == pair[0] for d in found)
            counts["shape"] += any(d.pair[1] == pair[1] for d in found)
            counts["total"] += 1
    return counts


def picture_sizes(pictures) -> dict[str, float]:
    """What a batch of pictures ([N, H, W, 3]) draws: objects found per picture, their mean area in latent pixels,
    and the share of pixels that are not background (the detector's colour labels)."""
    import numpy as np
    detector = effect.pack_module("world.detector")
    found = detector.detect_batch(pictures)
    areas = [d.area for objects in found for d in objects]
    covered = [float((detector.colour_labels(detector.to_grid(picture))[0] > 0).mean()) for picture in pictures]
    return {"objects": len(areas) / len(pictures), "area": float(np.mean(areas)) if areas else 0.0,
            "covered": float(np.mean(covered))}


def sizes_by_cfg(model, clip, steps: int, cfgs=(7.5, 4.0, 2.0)) -> dict:
    """picture_sizes and the `both` count of the first 6 seen two-object prompts x 8 seeds at each cfg, and of 400
    training renders ("renders"): whether the objects come out at the size they were trained at."""
    import numpy as np
    scenes = effect.pack_module("world.scenes")
    detector = effect.pack_module("world.detector")
    sizes = {"renders": picture_sizes(scenes.render(scenes.sample_scenes(0, 400))[0])}
    for cfg in cfgs:
        pictures, both = [], 0
        for pair_a, pair_b in scenes.two_object_prompts()["seen"][:6]:
            rgb = _rgb(model, _sample(model, clip, [pair_a, pair_b], 8, steps, cfg))
            both += sum({pair_a, pair_b} <= {d.pair for d in found} for found in detector.detect_batch(rgb))
            pictures.append(rgb)
        sizes[cfg] = {**picture_sizes(np.concatenate(pictures)), "both": both, "total": 48}
    return sizes


def print_sizes(sizes: dict) -> None:
    renders = sizes["renders"]
    print(f"object size: training renders {renders['area']:.0f} latent pixels per object, "
          f"{renders['covered']:.2f} of the picture not background; sampled (6 two-object prompts x 8 seeds):")
    for cfg, one in ((cfg, one) for cfg, one in sizes.items() if cfg != "renders"):
        print(f"  cfg {cfg}: {one['objects']:.2f} objects per picture of {one['area']:.0f} latent pixels, "
              f"{one['covered']:.2f} not background; both objects in their colours {one['both']} of {one['total']}")


def shape_word_effect(model, clip, steps: int) -> dict[str, float]:
    """Mean |picture difference| (rgb) over 8 seeds when only the shape word changes and when only the colour word
    does, and the text encoder's relative change at the changed word's position."""
    scenes = effect.pack_module("world.scenes")
    prompts = {"circle": [("blue", "circle")], "square": [("blue", "square")], "triangle": [("blue", "triangle")],
               "red": [("red", "circle")]}
    pictures = {k: _rgb(model, _sample(model, clip, v, 8, steps)) for k, v in prompts.items()}
    encoded = {k: clip.encode_from_tokens(clip.tokenize(scenes.caption(v)))[0] for k, v in prompts.items()}

    def text_change(a, b, position):  # position in 'a <colour> <shape>' after the start token
        return float((encoded[a][position] - encoded[b][position]).norm() / encoded[a][position].norm())
    return {"shape": float(sum(abs(pictures["circle"] - pictures[k]).mean() for k in ("square", "triangle")) / 2),
            "colour": float(abs(pictures["circle"] - pictures["red"]).mean()),
            "text_shape": (text_change("circle", "square", 3) + text_change("circle", "triangle", 3)) / 2,
            "text_colour": text_change("circle", "red", 2)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", type=Path, help="a world checkpoint (.safetensors): all three measurements")
    source.add_argument("--state", type=Path, help="world/train.py's state.pt: the DC gain and the caption gap")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sizes", action="store_true",
                        help="with --ckpt: only the objects' size against the training renders' at cfg 7.5, 4 and 2")
    parser.add_argument("--gap-per-sigma", action="store_true",
                        help="also the caption gap at each of sigma 0.5, 1, 2, 3, 5, 8, 12 (results/world_shape_word.txt)")
    args = parser.parse_args(argv)
    if args.sizes and not args.ckpt:
        parser.error("--sizes samples pictures: give --ckpt CHECKPOINT")
    effect.boot_host()
    import torch
    torch.set_num_threads(args.threads)
    if args.state:
        train = effect.pack_module("world.train")
        world_model = effect.pack_module("world.model")
        saved = torch.load(args.state, weights_only=False)
        trainer = train.make_trainer(train.TrainConfig(**saved["config"]))
        trainer.model.diffusion_model.load_state_dict(saved["unet"])
        trainer.clip.cond_stage_model.load_state_dict(saved["text"])
        def encode(captions):
            with torch.no_grad():
                return world_model.encode_tokens(trainer.clip, world_model.tokenize(trainer.clip, captions))
        gains = dc_gain(trainer.model.diffusion_model, trainer.model.model_sampling, encode(["a red circle"]))
        gap = caption_loss_gap(trainer.model.diffusion_model, trainer.model.model_sampling, encode)
        unet, sampling = trainer.model.diffusion_model, trainer.model.model_sampling
        print(f"{args.state}: batch {saved['batch']}, UNet widths {unet.model_channels} x {list(unet.channel_mult)}")
    else:
        model, clip, _vae = effect.load_world(args.ckpt)
        if args.sizes:
            print(f"{args.ckpt.name}: {args.steps} euler steps")
            print_sizes(sizes_by_cfg(model, clip, args.steps))
            return
        if effect.resolution(model) == 0:  # the MMDiT
            dit_diagnostics(model, clip, args)
            return
        def encode(captions):
            return torch.cat([clip.encode_from_tokens(clip.tokenize(c)) for c in captions])
        gains = dc_gain(model.model.diffusion_model, model.model.model_sampling, encode(["a red circle"]))
        gap = caption_loss_gap(model.model.diffusion_model, model.model.model_sampling, encode)
        unet, sampling = model.model.diffusion_model, model.model.model_sampling
        print(f"{args.ckpt.name}: UNet widths {unet.model_channels} x {list(unet.channel_mult)}; {args.steps} euler "
              "steps, cfg 7.5")
        correlation, slope = background_follows_noise(model, clip, args.steps)
        print(f"background vs initial noise mean (16 images): correlation {correlation:.2f}, slope {slope:.1f} "
              f"(sigma_max {float(model.model.model_sampling.sigma_max):.1f})")
        counts = single_objects(model, clip, args.steps)
        print(f"single objects (of {counts['total']}): drawn exactly {counts['exact']}; an object of the prompt's "
              f"colour {counts['colour']}, of its shape {counts['shape']}")
        words = shape_word_effect(model, clip, args.steps)
        print(f"pictures' mean |difference| when only the shape word changes {words['shape']:.4f}, when only the "
              f"colour word does {words['colour']:.4f}; text encoder output at the changed word: "
              f"{words['text_shape']:.3f} (shape), {words['text_colour']:.3f} (colour) relative")
    print("DC gain (ideal 1) at sigma " + ", ".join(f"{s}: {g:.3f}" for s, g in gains.items()))
    if args.gap_per_sigma:
        for sigma in (0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 12.0):
            one = caption_loss_gap(unet, sampling, encode, sigmas=(sigma,))
            print(f"caption gap at sigma {sigma}: shape {one['shape']:+.1%}, colour {one['colour']:+.1%}")
    print(f"EPS loss on one-object renders with a wrong shape word {gap['shape']:+.1%}, a wrong colour word "
          f"{gap['colour']:+.1%} (against the right caption; 0 = the word is not used)")


def attention_spread(diffusion_model, encode, sigma: float, count: int = 8, seed: int = 0) -> dict:
    """The MMDiT's image queries on noised renders (any scenes) at the flow sigma `sigma`: per joint block and
    head, the mean distance in tokens from a query to the image keys it attends to (uniform over a 16x16 grid: 8.4;
    a 3x3 convolution's neighbourhood: about 1), and the text keys' share; and the x0 RMS error of the one-step
    prediction on the picture's channels. A model that never learnt neighbourhoods draws each pixel on its own."""
    import torch
    scenes = effect.pack_module("world.scenes")
    drawn = scenes.sample_scenes(seed, count, split="any")
    x0 = effect.pack_module("world.dit").to_model_latent(torch.from_numpy(scenes.rgb_to_latent(scenes.render(drawn)[0])))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    x = (1 - sigma) * x0 + sigma * noise
    context, pooled = encode([scene.caption for scene in drawn])
    dit = effect.pack_module("world.dit")
    timesteps = torch.full((count,), sigma * 1000.0)
    side = x0.shape[-1] // diffusion_model.patch_size
    spread, text = [], []
    blocks, velocity = dit.image_attention(diffusion_model, x, timesteps, context.to(x), pooled.to(x))
    for probs in blocks:
        heads_spread, heads_text = dit.attention_spread(probs, side)
        spread.append(heads_spread.tolist())
        text.append(heads_text.tolist())
    error = float(((x - sigma * velocity.float() - x0)[:, :3] ** 2).mean().sqrt())
    return {"spread": spread, "text": text, "x0_error": error}


def dit_diagnostics(model, clip, args) -> None:
    """The DiT world model's image attention spread, single objects, shape word and caption gap (flow loss)."""
    import torch
    diffusion_model = model.model.diffusion_model
    print(f"{args.ckpt.name}: MMDiT depth {diffusion_model.depth}; {args.steps} euler steps, cfg 7.5")

    def encode(captions):
        pairs = [clip.encode_from_tokens(clip.tokenize(c), return_pooled=True) for c in captions]
        return torch.cat([c for c, _ in pairs]).float(), torch.cat([p for _, p in pairs]).float()
    for sigma in (0.8, 0.5):
        found = attention_spread(diffusion_model, encode, sigma)
        blocks = "; ".join(" ".join(f"{d:.1f}" for d in heads) for heads in found["spread"])
        texts = "; ".join(" ".join(f"{t:.2f}" for t in heads) for heads in found["text"])
        print(f"flow sigma {sigma}: image attention spread per block (tokens, per head; uniform 8.4) {blocks}; "
              f"text share {texts}; one-step x0 RMS error {found['x0_error']:.3f}")
    counts = single_objects(model, clip, args.steps)
    print(f"single objects (of {counts['total']}): drawn exactly {counts['exact']}; an object of the prompt's "
          f"colour {counts['colour']}, of its shape {counts['shape']}")
    words = shape_word_effect(model, clip, args.steps)
    print(f"pictures' mean |difference| when only the shape word changes {words['shape']:.4f}, when only the "
          f"colour word does {words['colour']:.4f}")
    sigmas = (0.5, 1.0, 2.0, 3.0, 5.0, 8.0) if args.gap_per_sigma else (1.0, 3.0)
    for sigma in sigmas if args.gap_per_sigma else [None]:
        gap = caption_loss_gap(diffusion_model, model.model.model_sampling, encode,
                               sigmas=(sigma,) if sigma else (1.0, 3.0), flow=True)
        where = f"at SD1.x-equivalent sigma {sigma}" if sigma else "(SD1.x-equivalent sigma 1 and 3)"
        print(f"flow loss on one-object renders {where} with a wrong shape word {gap['shape']:+.1%}, a wrong colour "
              f"word {gap['colour']:+.1%} (against the right caption; 0 = the word is not used)")


if __name__ == "__main__":
    main()
