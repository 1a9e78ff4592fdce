"""What each guidance loss does to the attention maps, on the tiny random models (issue 4).

For a fixed set of two-subject prompts of the Attend-and-Excite paper and a few seeds, samples with
the pack's Attention KSampler node four times: plain (no guidance), Attend-and-Excite (A&E's
defaults: guidance_end 0.5), A-STAR (segregation + retention, guided across the whole schedule) and
both together, all with the Attention Guidance node's defaults otherwise (A&E's refinement schedule
included; --refinement changes it). Per method, over prompts x seeds:

  min-peak   A&E's objective: min over subjects of the peak of the subject's smoothed map
             (losses.subject_attention_maps + losses.max_attention_per_subject); higher = every
             subject is attended somewhere.
  overlap    mean over subject pairs of the soft IoU sum min(A_m, A_n) / sum (A_m + A_n) of the
             smoothed maps (A-STAR's segregation term per pair; 0 = disjoint, 0.5 = identical).
  retention  mean over subjects of the soft IoU of the subject's early map (step --early-step) and
             its final map, both smoothed and scaled to peak 1 (0.5 = same shape, lower = it moved).
  forwards   guided forward+backward passes per image (guided steps + refinement iterations).
  time       wall time relative to plain.

min-peak and overlap are read at A&E's last guided step and at the last step (A-STAR's last
guided step), from the maps that the sampler's own model evaluation of that step recorded, i.e.
after the guidance changed the latent. The table gives means, and the paired change against plain
(same prompt, same seed) with its standard error and how many images improved.

The models are random: this measures whether the losses move the quantities they target through a
real UNet and sampler, not image quality. Run from the pack root:

    python benchmarks/losses_effect.py                       # 3 prompts x 2 seeds, 20 steps, 256 px
    python benchmarks/losses_effect.py --num-prompts 12 --seeds 0 1 2 3 --steps 50 --size 512
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

# before torch is imported: OpenMP threads sleep instead of spinning (a busy machine slowed runs 10x)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

PACK_DIR = Path(__file__).resolve().parent.parent
DEFAULT_PROMPTS = PACK_DIR.parent / "shared" / "data" / "attend_and_excite_prompts.json"
CATEGORIES = ("animals", "animals_objects", "objects")

_PACK_MODULE: str | None = None


# ---------------------------------------------------------------- host

def _host_module():
    spec = importlib.util.spec_from_file_location("attn_guide_host", PACK_DIR / "host.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_host = _host_module()


def find_host() -> Path:
    """COMFYUI_PATH, else the ComfyUI whose custom_nodes/ holds this pack, else ~/comfy/ComfyUI."""
    try:
        return _host.find_host()
    except _host.HostNotFound as error:
        sys.exit(str(error))


def boot_host(device: str = "cpu", host_argv: tuple[str, ...] = ()):
    """Imports the real ComfyUI host and loads the pack as ComfyUI loads custom nodes."""
    global _PACK_MODULE
    if _PACK_MODULE is not None:
        return
    _PACK_MODULE = _host.boot_host(find_host(), cpu=device == "cpu", host_argv=tuple(host_argv))
    import comfy.model_management
    if device != "cpu" and comfy.model_management.get_torch_device().type != device:
        sys.exit(f"--device {device}: ComfyUI's device is {comfy.model_management.get_torch_device()}")


def emit(text: str, save: Path | None) -> None:
    """Prints a report, and writes it to `save` too when given."""
    print(text)
    if save:
        save.parent.mkdir(parents=True, exist_ok=True)
        save.write_text(text + "\n")


def pack_module(name: str):
    return importlib.import_module(f"{_PACK_MODULE}.{name}")


# ---------------------------------------------------------------- prompts

def subject_words(prompt: str) -> list[str]:
    """The two subjects of an A&E prompt: the last word of each half split at ' and ' / ' with '."""
    for separator in (" and ", " with "):
        if separator in prompt:
            halves = prompt.split(separator)
            if len(halves) == 2:
                return [half.split()[-1] for half in halves]
    raise ValueError(f"prompt {prompt!r} is not 'a X and a Y' / 'a X with a Y'")


def load_prompts(path: Path, count: int, categories: list[str]) -> list[tuple[str, list[str]]]:
    """The first `count` prompts, taken in turn from each category (file order), with their subjects."""
    if not path.is_file():
        sys.exit(f"prompt file {path} not found; pass --prompts PATH (the Attend-and-Excite prompt JSON)")
    data = json.loads(path.read_text())
    unknown = [c for c in categories if c not in data]
    if unknown:
        sys.exit(f"categories {unknown} are not in {path.name}; valid: {', '.join(data)}")
    picked, index = [], 0
    while len(picked) < count and any(index < len(data[c]) for c in categories):
        for category in categories:
            if index < len(data[category]) and len(picked) < count:
                prompt = data[category][index]
                picked.append((prompt, subject_words(prompt)))
        index += 1
    return picked


# ---------------------------------------------------------------- methods

def method_configs(refinement: str):
    """name -> GuidanceConfig (None: plain), built by the Attention Guidance node from its defaults."""
    guidance_node = pack_module("nodes.guidance").AttentionGuidance
    losses = pack_module("guidance.losses")
    defaults = {"scale_factor": 20.0, "guidance_start": 0.0, "guidance_end": 0.5, "refinement": refinement,
                "max_refinement_steps": 20, "softmax_temperature": 100.0, "exclude_padding": False,
                "smoothing_sigma": 0.5, "retention_threshold": 0.5, "truncate_pass": True}

    def config(weights: dict[str, float], **changes):
        all_weights = {f"{name}_weight": weights.get(name, 0.0) for name in losses.LOSSES}
        return guidance_node.execute(**{**defaults, **changes}, **all_weights).args[0]

    return {
        "plain": None,
        "A&E": config({"attend_and_excite": 1.0}),
        "A-STAR": config({"segregation": 1.0, "retention": 1.0}, guidance_end=1.0),
        "A&E+A-STAR": config({"attend_and_excite": 1.0, "segregation": 1.0, "retention": 1.0}, guidance_end=1.0),
    }


# ---------------------------------------------------------------- metrics

def map_metrics(record, measure_steps: dict[str, int], early_step: int, temperature: float = 100.0) -> dict:
    """min-peak and overlap at each of `measure_steps` (label -> step), retention from `early_step` to the
    last of them, for `record`'s image (see the module docstring)."""
    losses = pack_module("guidance.losses")

    def maps_at(step):
        return losses.subject_attention_maps(record.grid_maps(record.steps.index(step)), record.subjects,
                                             record.resolution, temperature)

    def peak_normalised(maps):
        smoothed = losses.smooth(maps)
        return smoothed / smoothed.flatten(2).max(dim=-1).values[..., None, None].clamp(min=1e-12)

    metrics = {}
    for label, step in measure_steps.items():
        maps = maps_at(step)
        metrics[f"min-peak@{label}"] = float(losses.max_attention_per_subject(maps).min(dim=1).values.mean())
        smoothed = losses.smooth(maps)
        count = smoothed.shape[1]
        pairs = [(m, n) for m in range(count) for n in range(m + 1, count)]
        metrics[f"overlap@{label}"] = statistics.fmean(
            float(losses._soft_iou(smoothed[:, m], smoothed[:, n]).mean()) for m, n in pairs)
    final = maps_at(max(measure_steps.values()))
    metrics["retention"] = float(losses._soft_iou(peak_normalised(maps_at(early_step)), peak_normalised(final)).mean())
    return metrics


def run_method(model, clip, prompt, subjects_text, seed, config, args):
    import torch

    import nodes
    encode = pack_module("nodes.text_encode").AttentionTextEncode
    ksampler = pack_module("nodes.sampler").AttentionKSampler
    positive, subjects = encode.execute(clip, prompt, ", ".join(subjects_text)).args
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = {"samples": torch.zeros(1, 4, args.size // 8, args.size // 8)}
    start = time.perf_counter()
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        _latent, record = ksampler.execute(model, seed, args.steps, args.cfg, args.sampler, args.scheduler, positive,
                                           negative, latent, 1.0, subjects, 0, True, guidance=config).args
    seconds = time.perf_counter() - start
    forwards = sum(1 + len(entry.refinement) for entry in record.losses)
    return record, seconds, forwards


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sd15", choices=("sd15", "sd2", "sdxl"), help="tiny model family")
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS,
                        help="the Attend-and-Excite prompt JSON (default: ../shared/data/ next to the pack)")
    parser.add_argument("--categories", default=",".join(CATEGORIES),
                        help="prompt categories to take prompts from in turn (comma separated)")
    parser.add_argument("--num-prompts", type=int, default=3, help="prompts, taken in turn from each category")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--scheduler", default="normal")
    parser.add_argument("--early-step", type=int, default=5, help="step whose maps the retention metric compares")
    parser.add_argument("--refinement", default="0.0:0.05, 0.2:0.5, 0.4:0.8",
                        help="refinement schedule of every guided method (the node's default, A&E's); '' = off")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--save", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    if args.size % 32:
        parser.error(f"--size {args.size} must be a multiple of 32 (the 1/4-latent attention maps)")
    if args.steps < 2:
        parser.error("--steps must be at least 2")

    boot_host(args.device)
    import comfy.utils
    import torch
    comfy.utils.PROGRESS_BAR_ENABLED = False
    if args.threads:
        torch.set_num_threads(args.threads)
    tiny = pack_module("tiny_models")
    prompts = load_prompts(args.prompts, args.num_prompts, args.categories.split(","))
    methods = method_configs(args.refinement)
    model, clip = tiny.make_model(args.family), tiny.make_clip(args.family)
    early = min(args.early_step, args.steps - 1)
    run_method(model, clip, prompts[0][0], prompts[0][1], 0, None, args)  # warm-up (first-call costs)

    ae_end = methods["A&E"].guided_steps(args.steps)[-1]
    measure_steps = {str(ae_end): ae_end, str(args.steps - 1): args.steps - 1}
    keys = [f"{name}@{label}" for name in ("min-peak", "overlap") for label in measure_steps] + ["retention"]
    higher_is_better = {key: not key.startswith("overlap") for key in keys}
    results = {name: {key: [] for key in keys + ["forwards", "seconds"]} for name in methods}
    for prompt, subjects_text in prompts:
        for seed in args.seeds:
            took = []
            for name, config in methods.items():
                record, seconds, forwards = run_method(model, clip, prompt, subjects_text, seed, config, args)
                took.append(f"{name} {seconds:.1f} s")
                for key, value in map_metrics(record, measure_steps, early).items():
                    results[name][key].append(value)
                results[name]["forwards"].append(forwards)
                results[name]["seconds"].append(seconds)
            print(f"  {prompt!r} [{', '.join(subjects_text)}] seed {seed}: {', '.join(took)}", file=sys.stderr,
                  flush=True)

    malloc = " ".join(f"{k}={os.environ[k]}" for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
                      if k in os.environ)
    plain, images = results["plain"], len(results["plain"]["seconds"])
    lines = [
        f"losses_effect: tiny {args.family}, {len(prompts)} prompts x {len(args.seeds)} seeds, {args.steps} steps "
        f"{args.sampler}/{args.scheduler}, cfg {args.cfg}, {args.size} px (maps {record.resolution[0]}x"
        f"{record.resolution[1]}), refinement '{args.refinement}'",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}"
        + (f", {malloc}" if malloc else ""),
        "prompts: " + "; ".join(f"{p} [{', '.join(s)}]" for p, s in prompts),
        f"steps: {ae_end} = A&E's last guided step (guidance_end 0.5), {args.steps - 1} = the last step (A-STAR "
        f"guides to the end); retention = step {early} vs step {args.steps - 1}",
        "",
        f"means over {images} images (higher min-peak and retention, lower overlap = the losses' aims)",
        f"{'method':<11} " + " ".join(f"{k:>14}" for k in keys) + f" {'forwards':>9} {'time':>6}",
    ]
    plain_seconds = sum(plain["seconds"])
    for name, values in results.items():
        ratio = sum(values["seconds"]) / plain_seconds
        lines.append(f"{name:<11} " + " ".join(f"{statistics.fmean(values[k]):>14.5f}" for k in keys)
                     + f" {statistics.fmean(values['forwards']):>9.1f} {ratio:>5.2f}x")
    lines += ["", "paired change vs plain, same prompt and seed: mean ± standard error [images improved / all]",
              f"{'method':<11} " + " ".join(f"{k:>22}" for k in keys)]
    for name in list(methods)[1:]:
        cells = []
        for key in keys:
            deltas = [a - b for a, b in zip(results[name][key], plain[key])]
            error = statistics.stdev(deltas) / len(deltas) ** 0.5 if len(deltas) > 1 else float("nan")
            improved = sum((d > 0) if higher_is_better[key] else (d < 0) for d in deltas)
            cells.append(f"{statistics.fmean(deltas):+.5f}±{error:.5f} [{improved}/{len(deltas)}]")
        lines.append(f"{name:<11} " + " ".join(f"{c:>22}" for c in cells))
    lines += ["", f"plain: {plain_seconds / images:.2f} s per image; forwards = guided forward+backward passes per "
              "image (guided steps + refinement iterations)"]
    emit("\n".join(lines), args.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
