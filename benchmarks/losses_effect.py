"""What each guidance loss does to the attention maps, on the tiny random models (issue 4).

For a fixed set of two-subject prompts of the Attend-and-Excite paper and a few seeds, samples with
the pack's Attention KSampler node once per method: plain (no guidance), Attend-and-Excite (A&E's
defaults: guidance_end 0.5), A-STAR (segregation + retention, guided across the whole schedule),
both together, and the attribute-binding methods, each with the neglect term its paper pairs it
with: D&B (Divide & Bind: attendance + binding), SynGen alone, CONFORM alone, and A&E+SynGen (the
binding example workflow's). All use the Attention Guidance node's defaults otherwise: A&E's
refinement schedule (--refinement changes it) where the A&E loss is on (refinement stops on that
loss, so the pack does not refine without it), guidance_end 0.5 and scale factor 20 (A&E's; CONFORM's
code has the same).

A prompt's subjects are subject groups: each half, split at " and " / " with ", without its article
("a pink crown and a purple bow" -> "pink crown, purple bow": nouns crown, bow; attributes pink,
purple). The binding methods run only on prompts with at least one attribute (the objects category
has two per prompt, animals_objects one in its colour half, animals none). Per method, over
prompts x seeds:

  min-peak   A&E's objective: min over subjects of the peak of the subject's smoothed map
             (losses.subject_attention_maps + losses.max_attention_per_subject); higher = every
             subject is attended somewhere.
  overlap    mean over subject pairs of the soft IoU sum min(A_m, A_n) / sum (A_m + A_n) of the
             smoothed maps (A-STAR's segregation term per pair; 0 = disjoint, 0.5 = identical).
  retention  mean over subjects of the soft IoU of the subject's early map (step --early-step) and
             its final map, both smoothed and scaled to peak 1 (0.5 = same shape, lower = it moved).
  forwards   guided forward+backward passes per image (guided steps + refinement iterations).
  time       wall time relative to plain (on the same images).

Binding metrics, on the images whose prompt has attributes. Similarity of two maps = soft IoU of
their pixel distributions, sum min(P, Q) / sum (P + Q) with P = G * A / sum G * A (smoothed, then
normalised to sum 1, so only the shapes count, not the tokens' attention mass): 0 disjoint, 0.5 the
same. It is none of the three losses' own distance (JSD, symmetric KL, cosine).

  own        mean over attributes of the similarity of the attribute's map with its own noun's.
  other      the same with the other noun(s)' maps (mean over them).
  margin     own - other, per attribute, then the mean; higher = the attribute sits on its noun
             rather than on the other one.
  JSD, SynGen, CONFORM   the three binding losses themselves (Divide & Bind's binding term, SynGen's
             loss, CONFORM's InfoNCE; guidance.losses) on the recorded maps, lower = what each aims at.

min-peak, overlap and the margin are read at A&E's last guided step and at the last step (A-STAR's
last guided step), own, other and the losses at the first of them, from the maps that the sampler's own model evaluation of that step recorded, i.e.
after the guidance changed the latent. The table gives means, and the paired change against plain
(same prompt, same seed) with its standard error and how many images improved.

The models are random: this measures whether the losses move the quantities they target through a
real UNet and sampler, not image quality. Run from the pack root:

    python benchmarks/losses_effect.py                       # 3 prompts x 2 seeds, 20 steps, 256 px
    python benchmarks/losses_effect.py --quick               # objects prompts only, a few minutes
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
    spec = importlib.util.spec_from_file_location("attn_guide_host", PACK_DIR / "runner" / "host.py")
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

ARTICLES = ("a", "an", "the")


def subject_groups(prompt: str) -> list[str]:
    """The two subject groups of an A&E prompt: each half split at ' and ' / ' with ', without its article
    ('a pink crown and a purple bow' -> ['pink crown', 'purple bow']). The last word of a group is its noun
    (the A&E paper's subject), the words before it its attributes."""
    for separator in (" and ", " with "):
        if separator in prompt:
            halves = prompt.split(separator)
            if len(halves) == 2:
                groups = []
                for half in halves:
                    words = half.split()
                    groups.append(" ".join(words[1:] if len(words) > 1 and words[0] in ARTICLES else words))
                return groups
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
                picked.append((prompt, subject_groups(prompt)))
        index += 1
    return picked


# ---------------------------------------------------------------- methods

# the methods that need attributes: run only on prompts with a subject group of two or more words
BINDING_METHODS = ("D&B", "SynGen", "CONFORM", "A&E+SynGen")


def method_configs(refinement: str, max_refinement_steps: int = 20):
    """name -> GuidanceConfig (None: plain), built by the Attention Guidance node from its defaults.

    `refinement` applies where the A&E loss is on; the others get none (the pack refines on A&E's loss only,
    so there it would change nothing but print a warning)."""
    guidance_node = pack_module("nodes.guidance").AttentionGuidance
    losses = pack_module("guidance.losses")
    defaults = {"scale_factor": 20.0, "guidance_start": 0.0, "guidance_end": 0.5,
                "max_refinement_steps": max_refinement_steps, "softmax_temperature": 100.0, "exclude_padding": False,
                "smoothing_sigma": 0.5, "retention_threshold": 0.5, "truncate_pass": True}

    def config(weights: dict[str, float], **changes):
        all_weights = {f"{name}_weight": weights.get(name, 0.0) for name in losses.LOSSES}
        schedule = {"refinement": refinement if weights.get("attend_and_excite") else ""}
        return guidance_node.execute(**{**defaults, **schedule, **changes}, **all_weights).args[0]

    return {
        "plain": None,
        "A&E": config({"attend_and_excite": 1.0}),
        "A-STAR": config({"segregation": 1.0, "retention": 1.0}, guidance_end=1.0),
        "A&E+A-STAR": config({"attend_and_excite": 1.0, "segregation": 1.0, "retention": 1.0}, guidance_end=1.0),
        # Divide & Bind: its own neglect term (total variation) with the binding term, 1.0 each
        "D&B": config({"attendance": 1.0, "divide_and_bind_binding": 1.0}),
        # SynGen and CONFORM optimise their loss alone (no A&E term, as in their papers)
        "SynGen": config({"syngen": 1.0}),
        "CONFORM": config({"conform": 1.0}),
        # the binding example workflow's: A&E (with its refinement) and SynGen, 1.0 each
        "A&E+SynGen": config({"attend_and_excite": 1.0, "syngen": 1.0}),
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


def shape_similarity(p, q):
    """Soft IoU of two pixel distributions [..., N]: sum min(P, Q) / sum (P + Q), 0 disjoint .. 0.5 equal."""
    import torch
    return torch.minimum(p, q).sum(dim=-1) / (p + q).sum(dim=-1).clamp(min=1e-12)


def binding_metrics(record, measure_steps: dict[str, int], loss_step: int, temperature: float = 100.0) -> dict:
    """own, other, margin at each of `measure_steps`, and the three binding losses at `loss_step`, for
    `record`'s image; {} when its subjects have no attribute (see the module docstring)."""
    losses = pack_module("guidance.losses")
    pairs = record.subjects.attributes
    if not pairs:
        return {}

    def maps_at(step):
        aggregated = record.grid_maps(record.steps.index(step))
        maps = losses.subject_attention_maps(aggregated, record.subjects, record.resolution, temperature)
        return maps, losses.binding_context(aggregated, record.subjects, record.resolution, temperature)

    metrics = {}
    for label, step in measure_steps.items():
        maps, context = maps_at(step)
        nouns = losses.spatial_distribution(losses.smooth(maps))  # [B, S, HW]
        attributes = losses.spatial_distribution(losses.smooth(context["attribute_maps"]))  # [B, A, HW]
        own, other = [], []
        for a, owner in enumerate(context["attribute_owner"]):
            rest = [s for s in range(maps.shape[1]) if s != owner]
            own.append(shape_similarity(attributes[:, a], nouns[:, owner]))
            other.append(shape_similarity(attributes[:, a, None], nouns[:, rest]).mean(dim=1))
        own_mean = statistics.fmean(float(v.mean()) for v in own)
        other_mean = statistics.fmean(float(v.mean()) for v in other)
        metrics[f"own@{label}"] = own_mean
        metrics[f"other@{label}"] = other_mean
        metrics[f"margin@{label}"] = own_mean - other_mean
    maps, context = maps_at(loss_step)
    metrics[f"JSD@{loss_step}"] = float(losses.divide_and_bind_binding_loss(maps, **context).mean())
    metrics[f"SynGen@{loss_step}"] = float(losses.syngen_loss(maps, **context).mean())
    metrics[f"CONFORM@{loss_step}"] = float(losses.conform_loss(maps, **context).mean())
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


NEGLECT_KEYS = ("min-peak", "overlap")  # at each measured step; then "retention"
# --quick: the objects prompts (two attributes each), so that every method runs on every image, and refinement
# capped as `run --demo` caps it, so that the run takes minutes on a CPU
QUICK = {"categories": "objects", "num_prompts": 2, "seeds": [0, 1], "max_refinement": 5}
DEFAULTS = {"categories": ",".join(CATEGORIES), "num_prompts": 3, "seeds": [0, 1], "max_refinement": 20}
LOWER_IS_BETTER = ("overlap", "other", "JSD", "SynGen", "CONFORM")


def mean_table(results: dict, keys: list[str], width: int = 12) -> list[str]:
    """One row per method: its images (those with every key), the keys' means there, passes and time vs plain."""
    plain = results["plain"]
    lines = [f"{'method':<11} {'images':>6} " + " ".join(f"{k:>{width}}" for k in keys) + f" {'forwards':>9} "
             f"{'time':>6}"]
    for name, values in results.items():
        images = [i for i, m in values["metrics"].items() if all(k in m for k in keys)]
        if not images:
            continue
        ratio = sum(values["seconds"][i] for i in images) / sum(plain["seconds"][i] for i in images)
        lines.append(f"{name:<11} {len(images):>6} "
                     + " ".join(f"{statistics.fmean(values['metrics'][i][k] for i in images):>{width}.5f}"
                                for k in keys)
                     + f" {statistics.fmean(values['forwards'][i] for i in images):>9.1f} {ratio:>5.2f}x")
    return lines


def paired_table(results: dict, keys: list[str]) -> list[str]:
    """Per method and key: mean ± standard error of (method - plain) over the images both have, [improved/all]."""
    plain = results["plain"]["metrics"]
    lines = [f"{'method':<11} " + " ".join(f"{k:>24}" for k in keys)]
    for name, values in list(results.items())[1:]:
        cells = []
        for key in keys:
            deltas = [m[key] - plain[i][key] for i, m in values["metrics"].items() if key in m]
            if not deltas:
                cells.append("")
                continue
            error = statistics.stdev(deltas) / len(deltas) ** 0.5 if len(deltas) > 1 else float("nan")
            improved = sum((d < 0) if key.startswith(LOWER_IS_BETTER) else (d > 0) for d in deltas)
            cells.append(f"{statistics.fmean(deltas):+.5f}±{error:.5f} [{improved}/{len(deltas)}]")
        if any(cells):
            lines.append(f"{name:<11} " + " ".join(f"{c:>24}" for c in cells))
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sd15", choices=("sd15", "sd2", "sdxl"), help="tiny model family")
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS,
                        help="the Attend-and-Excite prompt JSON (default: ../shared/data/ next to the pack)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a few minutes on a CPU: categories {QUICK['categories']}, {QUICK['num_prompts']} "
                             f"prompts, seeds {' '.join(map(str, QUICK['seeds']))}, --max-refinement "
                             f"{QUICK['max_refinement']} (each still overridable)")
    parser.add_argument("--categories", help="prompt categories to take prompts from in turn (comma separated; "
                                             f"default {DEFAULTS['categories']})")
    parser.add_argument("--num-prompts", type=int, help="prompts, taken in turn from each category (default 3)")
    parser.add_argument("--seeds", type=int, nargs="+", help="default: 0 1")
    parser.add_argument("--methods", help="comma-separated subset of the methods (plain always runs; default: all)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--scheduler", default="normal")
    parser.add_argument("--early-step", type=int, default=5, help="step whose maps the retention metric compares")
    parser.add_argument("--refinement", default="0.0:0.05, 0.2:0.5, 0.4:0.8",
                        help="refinement schedule of the methods with the A&E loss (the node's default, A&E's); "
                             "'' = off")
    parser.add_argument("--max-refinement", type=int,
                        help="cap on refinement iterations per refinement step (default 20, A&E's)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--save", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
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
    tiny = pack_module("runner.tiny_models")
    prompts = load_prompts(args.prompts, args.num_prompts, args.categories.split(","))
    methods = method_configs(args.refinement, args.max_refinement)
    if args.methods:
        chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in chosen if m not in methods]
        if unknown:
            parser.error(f"--methods {unknown} unknown; valid: {', '.join(methods)}")
        methods = {name: config for name, config in methods.items() if name == "plain" or name in chosen}
    model, clip = tiny.make_model(args.family), tiny.make_clip(args.family)
    early = min(args.early_step, args.steps - 1)
    run_method(model, clip, prompts[0][0], prompts[0][1], 0, None, args)  # warm-up (first-call costs)

    ae_end = method_configs(args.refinement)["A&E"].guided_steps(args.steps)[-1]
    measure_steps = {str(ae_end): ae_end, str(args.steps - 1): args.steps - 1}
    neglect_keys = [f"{name}@{label}" for name in NEGLECT_KEYS for label in measure_steps] + ["retention"]
    binding_keys = ([f"{name}@{label}" for name in ("own", "other") for label in list(measure_steps)[:1]]
                    + [f"margin@{label}" for label in measure_steps]
                    + [f"{name}@{ae_end}" for name in ("JSD", "SynGen", "CONFORM")])
    results = {name: {"metrics": {}, "forwards": {}, "seconds": {}} for name in methods}
    with_attributes = 0
    for prompt, groups in prompts:
        has_attributes = any(len(group.split()) > 1 for group in groups)
        with_attributes += has_attributes * len(args.seeds)
        for seed in args.seeds:
            took = []
            for name, config in methods.items():
                if name in BINDING_METHODS and not has_attributes:
                    continue
                record, seconds, forwards = run_method(model, clip, prompt, groups, seed, config, args)
                took.append(f"{name} {seconds:.1f} s")
                image = (prompt, seed)
                metrics = map_metrics(record, measure_steps, early)
                metrics.update(binding_metrics(record, measure_steps, ae_end))
                results[name]["metrics"][image] = {k: v for k, v in metrics.items()
                                                   if k in neglect_keys or k in binding_keys}
                results[name]["forwards"][image] = forwards
                results[name]["seconds"][image] = seconds
            print(f"  {prompt!r} [{', '.join(groups)}] seed {seed}: {', '.join(took)}", file=sys.stderr,
                  flush=True)

    malloc = " ".join(f"{k}={os.environ[k]}" for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
                      if k in os.environ)
    plain = results["plain"]
    images = len(plain["seconds"])
    lines = [
        f"losses_effect: tiny {args.family}, {len(prompts)} prompts x {len(args.seeds)} seeds, {args.steps} steps "
        f"{args.sampler}/{args.scheduler}, cfg {args.cfg}, {args.size} px (maps {record.resolution[0]}x"
        f"{record.resolution[1]}), refinement '{args.refinement}' (A&E methods; at most {args.max_refinement} "
        "iterations each)",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}"
        + (f", {malloc}" if malloc else "") + (", --quick" if args.quick else ""),
        "prompts (subject groups: the last word is the noun): "
        + "; ".join(f"{p} [{', '.join(s)}]" for p, s in prompts),
        f"steps: {ae_end} = A&E's last guided step (guidance_end 0.5, also the binding methods'), {args.steps - 1} "
        f"= the last step (A-STAR guides to the end); retention = step {early} vs step {args.steps - 1}",
        f"binding methods ({', '.join(m for m in methods if m in BINDING_METHODS)}) run on the {with_attributes} of "
        f"{images} images whose prompt has attributes",
        "",
        "neglect and layout: means over each method's images (higher min-peak and retention, lower overlap = the "
        "losses' aims)",
        *mean_table(results, neglect_keys, width=14),
        "",
        f"binding, on the {with_attributes} images with attributes: own / other = soft IoU of an attribute's pixel "
        "distribution with its own noun's / the other noun's (0 disjoint, 0.5 equal), margin = own - other; "
        f"JSD, SynGen, CONFORM = the binding losses at step {ae_end} (higher own and margin, lower other and "
        "losses = the aims)",
        *mean_table(results, binding_keys, width=11),
        "",
        "paired change vs plain, same prompt and seed: mean ± standard error [images improved / all]",
        *paired_table(results, neglect_keys),
        "",
        *paired_table(results, binding_keys),
        "",
        f"plain: {sum(plain['seconds'].values()) / images:.2f} s per image; forwards = guided forward+backward "
        "passes per image (guided steps + refinement iterations); time = wall time / plain's on the same images",
    ]
    emit("\n".join(lines), args.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
