"""Wall time of a whole 50-step run on the tiny SD1.5-shaped model: KSampler vs Attention KSampler with
Attend-and-Excite's defaults (25 guided steps, refinement at steps 0/10/20 up to 20 iterations).

    python benchmarks/guided_run_time.py [--steps 50] [--size 256]
"""
import argparse
import os
import sys
import time
from pathlib import Path

# before torch is imported: OpenMP threads sleep instead of spinning (a busy machine slowed runs 10x)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from harness import pack_module  # noqa: E402  (boots the ComfyUI host, loads the pack)

import nodes  # noqa: E402
import torch  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    tiny = pack_module("runner.tiny_models")
    sampler_nodes = pack_module("nodes.sampler")
    config = pack_module("guidance.sampler").GuidanceConfig()
    model, clip = tiny.make_model("sd15"), tiny.make_clip("sd15")
    encode = pack_module("nodes.text_encode").AttentionTextEncode
    positive, subjects = encode.execute(clip, "a cat and a frog", "cat, frog").args
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = {"samples": torch.zeros(1, 4, args.size // 8, args.size // 8)}
    start = time.perf_counter()
    nodes.common_ksampler(model, 1, args.steps, 7.5, "euler", "normal", positive, negative, latent)
    plain = time.perf_counter() - start
    start = time.perf_counter()
    out = sampler_nodes.AttentionKSampler.execute(model, 1, args.steps, 7.5, "euler", "normal", positive, negative,
                                                  latent, 1.0, subjects, 0, False, guidance=config)
    guided = time.perf_counter() - start
    record = out.args[1]
    refinement = sum(len(entry.refinement) for entry in record.losses)
    print(f"tiny sd15, {args.size} px, {args.steps} steps, {torch.get_num_threads()} threads: plain KSampler "
          f"{plain:.1f} s; guided (A&E defaults: {len(record.losses)} guided steps, {refinement} refinement "
          f"forwards) {guided:.1f} s; ratio {guided / plain:.2f}")


if __name__ == "__main__":
    main()
