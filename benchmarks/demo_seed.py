"""Finds the world model's demo case (issue 16): a two-object prompt and a seed for which the plain model misses a
subject and Attend-and-Excite (the paper's settings) draws both objects in their own colours, at the settings of
example_workflows/attend_and_excite_world.json (one image, 256 px, euler/normal, cfg 7.5).

    python benchmarks/demo_seed.py --ckpt world/world_sd15.safetensors [--steps 20] [--seeds 0-15]

Prints every (prompt, seed) with plain's detections (and A&E's where plain misses a subject's shape: only
there can it be a case), then the cases found. The images of one seed are
what KSampler gives a batch of one with that seed: the workflow reproduces them.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("effect", HERE / "effect.py")
effect = importlib.util.module_from_spec(spec)
spec.loader.exec_module(effect)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--seeds", default="0-15", help="first-last")
    parser.add_argument("--split", default="seen", help="seen, held_out_combo or held_out_pair")
    parser.add_argument("--prompts", type=int, default=0, help="at most this many prompts of the split (0: all)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    args.max_refinement = 20
    effect.boot_host()
    import comfy.utils
    import torch
    torch.set_num_threads(args.threads)
    comfy.utils.set_progress_bar_enabled(False)
    model, clip, _vae = effect.load_world(args.ckpt)
    configs = effect.method_configs(["plain", "attend_and_excite"])
    prompts = effect.pack_module("world.scenes").two_object_prompts()[args.split]
    if args.prompts:
        prompts = prompts[:args.prompts]
    first, _, last = args.seeds.partition("-")
    found = []
    for pair_a, pair_b in prompts:
        for seed in range(int(first), int(last or first) + 1):
            def outcome(name):
                latents, _record, _seconds = effect.run_batch(model, clip, pair_a, pair_b, seed, 1, configs[name], args)
                return effect.image_results(latents, pair_a, pair_b)[0]
            text = effect.pack_module("world.scenes").caption([pair_a, pair_b])
            plain = outcome("plain")
            if plain["shapes"]:  # plain has every subject's shape: not a case, and A&E (6x plain's time) is skipped
                print(f"{text!r} seed {seed}: plain {sorted(d.pair for d in plain['found'])}", flush=True)
                continue
            guided = outcome("attend_and_excite")
            print(f"{text!r} seed {seed}: plain {sorted(d.pair for d in plain['found'])} | A&E "
                  f"{sorted(d.pair for d in guided['found'])}", flush=True)
            if guided["both"]:  # plain lost a subject's shape; A&E has both, own colours
                # clean: A&E's picture holds the two objects and nothing else (the one a demo should show)
                clean = sorted(d.pair for d in guided["found"]) == sorted([pair_a, pair_b])
                found.append((text, seed, clean))
    print("\ncases (plain misses a subject, A&E draws both in their own colours; clean: and nothing else):")
    for text, seed, clean in sorted(found, key=lambda case: not case[2]):
        print(f"  {text!r} seed {seed}{' (clean)' if clean else ''}")
    return 0 if found else 1


if __name__ == "__main__":
    sys.exit(main())
