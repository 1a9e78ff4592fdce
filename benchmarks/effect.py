"""What each guidance method does to what the model draws, on the world model (issue 16).

The world model (`world/`, trained by `world/train.py`) draws flat coloured shapes, and the detector
(`world/detector.py`, no learned part) reads back which (colour, shape) objects a picture holds, so that "did
the model draw every subject of the prompt, in its own colour" is counted exactly. Prompts: every two-object
prompt of the world with distinct colours and shapes ("a red circle and a blue square"; subjects as subject
groups "red circle, blue square": nouns circle, square with their colours as attributes), by split:

  seen            both colour-shape pairs and their combination occur in training
  held_out_combo  two seen pairs that never occur together in a training scene
  held_out_pair   at least one pair never drawn in training (e.g. a blue triangle)

Per method, over (prompt, seed) pairs (the seeds of one prompt run as one batch: image i of seed s has the
noise ComfyUI's KSampler gives batch row i of seed s):

  shapes    rate of images in which every subject's shape is present (any colour)
  both      rate of images in which both objects are drawn, each in its own colour (the detector finds both
            (colour, shape) pairs)
  clean     rate of images without a single off-palette pixel (`world.detector.off_palette_pixels`: a latent
            pixel that no mix of the background and one palette colour comes near; 90% of the UNet world model's
            plain pictures have none, 98% of the DiT's): a picture broken by too strong a guidance step holds specks of colours no
            object has, which the detector reads as background, so `both` alone can count a broken picture
  both + clean   rate of images with both objects in their own colours and no off-palette pixel
            the four rates with Wilson 95% intervals
  fixes / breaks   paired against plain on the same prompt and seed: images plain missed and the method got,
            and the reverse (for `both`)
  s/img     seconds per image (batch time / batch size)
  A&E loss  mean of Attend-and-Excite's loss (1 - the weakest subject's smoothed peak after A&E's softmax)
            at the first and the last guided step, from the ATTENTION record (guided methods): whether the
            method moved the maps it acts on

Methods: plain; every loss of `guidance.losses.LOSSES` alone at weight 1 with the Attention Guidance node's
defaults (the papers' settings: scale factor 20, guided over the first half, A&E's refinement where the A&E
loss is on); A-STAR (segregation + retention, guided over the whole schedule, no refinement); D&B
(attendance + divide_and_bind_binding, 1 each); InitNO (the Attention InitNO node at its defaults, the paper's
schedule: 5 rounds of 10 Adam steps, then 50) before plain sampling, and InitNO + A&E (then A&E at the papers'
settings, as the authors' pipeline runs it). InitNO optimises each image of a batch as if alone (its own
successes, restarts and best round), as the authors' code does. Sampling: euler/normal, cfg 7.5, 256 px (32x32 latent),
captured maps 16x16 (`attention_resolution` 16: the world model's 16x16 cross-attention layers).

Plain, for point 3 of the issue: the share of drawn objects whose subject map (raw attention, noun and
colour tokens) peaks inside the object's box, and the subjects' raw peaks, at A&E's last guided step.

Run from the pack root with ComfyUI's Python:

    python benchmarks/effect.py --ckpt world/world_sd15.safetensors                 # the full table
    python benchmarks/effect.py --ckpt world/world_sd15.safetensors --quick         # minutes

A run is one process on `--threads` threads; the batches are small, so two cores go further as separate
processes, each with plain and a share of the methods (`--methods plain,attend_and_excite,A-STAR --save a.txt`,
...). `--join a.txt b.txt ... --save all.txt` joins their reports into one table, after checking that plain's
outcomes are the same in each.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

PACK_DIR = Path(__file__).resolve().parent.parent
_PACK_MODULE: str | None = None


def boot_host() -> None:
    global _PACK_MODULE
    if _PACK_MODULE is not None:
        return
    spec = importlib.util.spec_from_file_location("attn_guide_host", PACK_DIR / "runner" / "host.py")
    host = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(host)
    try:
        _PACK_MODULE = host.boot_host(host.find_host(), cpu=True)
    except host.HostNotFound as error:
        sys.exit(str(error))


def pack_module(name: str):
    return importlib.import_module(f"{_PACK_MODULE}.{name}")


# ---------------------------------------------------------------- methods

GUIDANCE_DEFAULTS = {"scale_factor": 20.0, "guidance_start": 0.0, "guidance_end": 0.5, "max_refinement_steps": 20,
                     "softmax_temperature": 100.0, "exclude_padding": False, "smoothing_sigma": 0.5,
                     "retention_threshold": 0.5, "truncate_pass": True}
# the Attention InitNO node's inputs at the paper's values; `--set initno_rounds=1` etc. changes them
INITNO_DEFAULTS = {"initno_rounds": 5, "initno_iterations": 10, "initno_final_iterations": 50,
                   "initno_learning_rate": 0.01, "initno_tau_response": 0.2, "initno_tau_conflict": 0.3,
                   "initno_kl_bound": 0.001}
SETTINGS_DEFAULTS = {**GUIDANCE_DEFAULTS, **INITNO_DEFAULTS}
COMBINATIONS = {
    "A-STAR": ({"segregation": 1.0, "retention": 1.0}, {"guidance_end": 1.0}),
    "D&B": ({"attendance": 1.0, "divide_and_bind_binding": 1.0}, {}),
}
# InitNO's stage through the Attention InitNO node at its defaults (the paper's schedule): alone before plain
# sampling, and before A&E as the authors' pipeline runs it
INITNO_METHODS = {"InitNO": None, "InitNO + A&E": "attend_and_excite"}
QUICK_METHODS = ("plain", "attend_and_excite", "A-STAR", "D&B")


class Method(NamedTuple):
    """What one row of the table samples with: the Attention Guidance node's GUIDANCE and the Attention InitNO
    node's INITNO (None: not connected; both None is plain)."""
    guidance: object = None
    initno: object = None


def method_configs(names: list[str] | None = None, max_refinement_steps: int = 20,
                   changed: dict | None = None) -> dict:
    """name -> Method, its settings built by the Attention Guidance and Attention InitNO nodes; `changed`: node
    inputs set for every method instead of the papers' (SETTINGS_DEFAULTS), e.g. {"scale_factor": 80.0} or
    {"initno_rounds": 1}."""
    guidance_node = pack_module("nodes.guidance").AttentionGuidance
    initno_node = pack_module("nodes.initno").AttentionInitNO
    losses = pack_module("guidance.losses")
    refinement = ", ".join(f"{f}:{t}" for f, t in pack_module("guidance.sampler").DEFAULT_REFINEMENT)

    def config(weights, **changes):
        all_weights = {f"{name}_weight": weights.get(name, 0.0) for name in losses.LOSSES}
        schedule = {"refinement": refinement if weights.get("attend_and_excite") else "",
                    "max_refinement_steps": max_refinement_steps}
        inputs = {**GUIDANCE_DEFAULTS, **schedule, **changes,
                  **{k: v for k, v in (changed or {}).items() if k in GUIDANCE_DEFAULTS}}
        return guidance_node.execute(**inputs, **all_weights).args[0]

    methods = {"plain": Method()}
    for name in losses.LOSSES:
        methods[name] = Method(config({name: 1.0}))
    for name, (weights, changes) in COMBINATIONS.items():
        methods[name] = Method(config(weights, **changes))
    initno_inputs = {**INITNO_DEFAULTS, **{k: v for k, v in (changed or {}).items() if k in INITNO_DEFAULTS}}
    initno = initno_node.execute(**{k.removeprefix("initno_"): v for k, v in initno_inputs.items()}).args[0]
    for name, loss in INITNO_METHODS.items():
        methods[name] = Method(config({loss: 1.0}) if loss else None, initno)
    if names:
        unknown = [n for n in names if n not in methods]
        if unknown:
            raise SystemExit(f"unknown method(s) {unknown}; valid: {', '.join(methods)}")
        methods = {n: methods[n] for n in names}
    return methods


def parse_settings(items: list[str]) -> dict:
    """--set key=value pairs -> {key: value} over SETTINGS_DEFAULTS' keys, each value of the default's type."""
    changed = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in SETTINGS_DEFAULTS or not value:
            raise SystemExit(f"--set {item!r}: expected key=value with key one of {', '.join(SETTINGS_DEFAULTS)}")
        kind = type(SETTINGS_DEFAULTS[key])
        try:
            changed[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
        except ValueError:
            raise SystemExit(f"--set {item!r}: {key} takes a {kind.__name__}") from None
    # the papers' own value is not a change: the report's header must not call it other settings
    return {key: value for key, value in changed.items() if value != SETTINGS_DEFAULTS[key]}


# ---------------------------------------------------------------- one batch

def load_world(checkpoint: Path):
    """MODEL, CLIP, VAE of the world checkpoint through Load Checkpoint (CheckpointLoaderSimple)."""
    return pack_module("world.model").load_checkpoint(checkpoint)


def latent_format(model):
    """The model's latent format (ComfyUI's: SD1.x's for the UNet world model, SD3's for the MMDiT)."""
    return model.get_model_object("latent_format")


def run_batch(model, clip, pair_a, pair_b, seed: int, batch: int, method: Method | None, args):
    """Samples `batch` images of the prompt with `method` (None: plain); returns latents [B, C, 32, 32] (VAE
    space: C = 4 for the UNet world model, 16 for the MMDiT), the ATTENTION record, seconds."""
    import torch

    import nodes
    scenes = pack_module("world.scenes")
    encode = pack_module("nodes.text_encode").AttentionTextEncode
    ksampler = pack_module("nodes.sampler").AttentionKSampler
    prompt = scenes.caption([pair_a, pair_b])
    subjects = f"{pair_a[0]} {pair_a[1]}, {pair_b[0]} {pair_b[1]}"
    positive, subject_tokens = encode.execute(clip, prompt, subjects).args
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = {"samples": torch.zeros(batch, latent_format(model).latent_channels, 32, 32)}
    method = method or Method()
    start = time.perf_counter()
    with torch.inference_mode():
        out, record = ksampler.execute(model, seed, args.steps, args.cfg, "euler", "normal", positive, negative,
                                       latent, 1.0, subject_tokens, resolution(model), True, guidance=method.guidance,
                                       initno=method.initno).args
    return out["samples"], record, time.perf_counter() - start


def resolution(model) -> int:
    """The sampler's attention_resolution: the UNet world model's 16x16 cross-attention layers; 0 (the default,
    every joint block on the 16x16 token grid) for the MMDiT, which reads blocks, not resolutions."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    return 16 if isinstance(model.model.diffusion_model, UNetModel) else 0


def image_results(latents, pair_a, pair_b, model_latent=None) -> list[dict]:
    """Per image: shapes present, both objects in their own colours, no off-palette pixel, the detections. model_latent: the model's
    latent format's process_in (VAE space -> the space whose channels 0-2 are the picture); SD1.x's by default."""
    scenes = pack_module("world.scenes")
    detector = pack_module("world.detector")
    if model_latent is None:
        scale = pack_module("world.model").LATENT_SCALE
        model_latent = lambda latent: latent * scale  # noqa: E731
    rows = []
    pictures = scenes.latent_to_rgb(model_latent(latents.float()).numpy())
    for picture, found in zip(pictures, detector.detect_batch(pictures)):
        pairs = {d.pair for d in found}
        shapes = {d.shape for d in found}
        rows.append({"shapes": pair_a[1] in shapes and pair_b[1] in shapes,
                     "both": pair_a in pairs and pair_b in pairs,
                     "clean": detector.off_palette_pixels(picture) == 0, "found": found})
    return rows


def aae_losses(record) -> tuple[list[float], list[float]] | None:
    """Per image: A&E's loss at the first and the last guided step (the record's loss terms, before the update),
    or computed from the maps for methods without the A&E term; None for plain."""
    if not record.losses:
        return None
    losses = pack_module("guidance.losses")

    def at(entry):
        if "attend_and_excite" in entry.terms:
            return entry.terms["attend_and_excite"]
        index = record.steps.index(entry.step)
        maps = losses.subject_attention_maps(record.grid_maps(index), record.subjects, record.resolution, 100.0)
        return [float(v) for v in losses.attend_and_excite_loss(maps)]

    return at(record.losses[0]), at(record.losses[-1])


def attention_grounding(record, results, pairs, step: int) -> tuple[list[float], list[float]]:
    """For plain images: per drawn object, 1 if its subject's raw map (mean over the group's noun and colour
    tokens) peaks inside the object's box on the 16x16 grid; and every subject's raw peak."""
    index = record.steps.index(step)
    aggregated = record.grid_maps(index)                                   # [B, HW, T]
    height, width = record.resolution
    hits, peaks = [], []
    for subject, pair in zip(record.subjects.subjects, pairs):
        positions = list(subject.token_positions) + [p for a in subject.attributes for p in a.token_positions]
        maps = aggregated[:, :, positions].mean(-1).reshape(-1, height, width)
        for b, result in enumerate(results):
            peaks.append(float(maps[b].max()))
            match = [d for d in result["found"] if d.pair == pair]
            if match:
                top, left, box_h, box_w = match[0].box
                flat = int(maps[b].argmax())
                y, x = (flat // width + 0.5) * 32 / height, (flat % width + 0.5) * 32 / width
                hits.append(float(top - 1 <= y <= top + box_h + 1 and left - 1 <= x <= left + box_w + 1))
    return hits, peaks


# ---------------------------------------------------------------- statistics and report

def wilson(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    if total == 0:
        return 0.0, 0.0
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(values: list[bool]) -> str:
    low, high = wilson(sum(values), len(values))
    return f"{sum(values) / max(len(values), 1):.3f} [{low:.2f}, {high:.2f}]"


NAME_WIDTH = 26      # a report row: the method's name padded to this, then the columns below
RATES = ("shapes", "both (own colours)", "clean", "both + clean")
# a report from before the clean columns has only these rates; joined in, its rows show "-" in the others
EARLIER_RATES = ("shapes", "both (own colours)")
MISSING = "-"


def column_line() -> str:
    return (f"{'method':<{NAME_WIDTH}}" + "".join(f" {name:>20}" for name in RATES)
            + f" {'fixes':>5} {'breaks':>6} {'s/img':>6} {'A&E loss first->last':>21}")


def parse_row(line: str) -> tuple[str, list[str], list[str]]:
    """A report row -> (method name, its outcomes: one string per rate ("0.222 [0.18, 0.27]", or "-" where not
    measured), then fixes and breaks; the rest: s/img and the A&E loss)."""
    fields = line[NAME_WIDTH:].split()
    outcome = []
    for _ in RATES:
        width = 1 if fields[0] == MISSING else 3
        outcome.append(" ".join(fields[:width]))
        fields = fields[width:]
    return line[:NAME_WIDTH].strip(), outcome + fields[:2], fields[2:]


def format_row(name: str, outcome: list[str], rest: list[str]) -> str:
    rest = rest if rest[1:] == [MISSING] else [rest[0], " ".join(rest[1:])]
    return (f"{name:<{NAME_WIDTH}}" + "".join(f" {value:>20}" for value in outcome[:len(RATES)])
            + f" {outcome[-2]:>5} {outcome[-1]:>6} {float(rest[0]):>6.2f} {rest[1]:>21}")


def upgraded(section: list[str]) -> list[str]:
    """A split section of a report from before the clean columns, in today's columns ("-" where not measured)."""
    if section[1] == column_line():
        return section
    if section[1].split()[:2] != ["method", "shapes"] or "clean" in section[1]:
        raise ValueError(f"unknown report columns {section[1]!r}")
    rows = []
    for line in section[2:]:
        fields = line[NAME_WIDTH:].split()
        rates = [" ".join(fields[3 * i:3 * i + 3]) for i in range(len(EARLIER_RATES))]
        fields = fields[3 * len(EARLIER_RATES):]
        outcome = [rates[EARLIER_RATES.index(r)] if r in EARLIER_RATES else MISSING for r in RATES] + fields[:2]
        rows.append(format_row(line[:NAME_WIDTH].strip(), outcome, fields[2:]))
    return [section[0], column_line(), *rows]


def same_outcomes(one: list[str], other: list[str]) -> bool:
    """Two rows' outcomes agree on every column both measured."""
    return all(a == b for a, b in zip(one, other) if MISSING not in (a, b))


def report(results: dict, splits: dict, header: list[str]) -> str:
    lines = list(header)
    for split in ("all", *splits):
        plain = results["plain"]
        keys = [k for k in plain["images"] if split == "all" or k[0] == split]
        if not keys:
            continue
        lines += ["", f"{split}: {len(keys)} images (prompt, seed)", column_line()]
        for name, values in results.items():
            images = values["images"]
            both = [images[k]["both"] for k in keys]
            shapes = [images[k]["shapes"] for k in keys]
            clean = [images[k]["clean"] for k in keys]
            both_clean = [images[k]["both"] and images[k]["clean"] for k in keys]
            fixes = sum(images[k]["both"] and not plain["images"][k]["both"] for k in keys)
            breaks = sum(plain["images"][k]["both"] and not images[k]["both"] for k in keys)
            seconds = statistics.fmean(images[k]["seconds"] for k in keys)
            firsts = [images[k]["aae"][0] for k in keys if images[k]["aae"] is not None]
            lasts = [images[k]["aae"][1] for k in keys if images[k]["aae"] is not None]
            aae = f"{statistics.fmean(firsts):.3f} -> {statistics.fmean(lasts):.3f}" if firsts else "-"
            lines.append(format_row(name, [rate(shapes), rate(both), rate(clean), rate(both_clean), str(fixes),
                                           str(breaks)], [str(seconds), aae]))
    return "\n".join(lines)


def settings_lines(args, changed: dict) -> list[str]:
    """The report's first lines: the run's settings (reports joined must have the same)."""
    return [f"effect: {args.ckpt.name}, {args.steps} steps euler/normal, cfg {args.cfg}, 256 px (latent 32x32, maps "
            f"16x16), {args.seeds} images per prompt (one batch, seed 0), max refinement {args.max_refinement}",
            "settings: the papers' (" + ", ".join(f"{k} {v}" for k, v in GUIDANCE_DEFAULTS.items()
                                                  if k != "max_refinement_steps") + ")"
            + ("" if not changed else "; NOT the papers': " + ", ".join(f"{k} {v}" for k, v in changed.items()))]


def plain_line(measured: dict) -> str:
    """Plain's attention grounding (point 3 of the issue), from `measure`'s output."""
    hits, peaks = measured["hits"], measured["peaks"]
    return (f"plain: drawn objects whose subject map peaks inside them at step {measured['last_guided']}: "
            f"{sum(hits) / max(len(hits), 1):.3f} of {len(hits)}; subjects' raw peak mean "
            f"{statistics.fmean(peaks) if peaks else 0:.3f} (median {statistics.median(peaks) if peaks else 0:.3f})")


def _sections(text: str) -> tuple[list[str], list[list[str]]]:
    """A report's header lines and its split sections (title, column line, method rows)."""
    blocks = text.strip("\n").split("\n\n")
    return blocks[0].splitlines(), [block.splitlines() for block in blocks[1:]]


JOINED = "joined with another process's report"


DROPPED = "rows of an earlier measurement dropped"


INITNO_CLAUSE = "InitNO succeeded for"  # how initno_line opens each method's clause, which drop_method finds


def _settings(header: list[str]) -> list[str]:
    """A report's header without its timing line (the third) and the lines a join or drop added: what joined reports
    share."""
    return [line for i, line in enumerate(header) if i != 2 and not line.startswith((JOINED, DROPPED))]


def drop_method(text: str, name: str) -> str:
    """The report without `name`'s rows (and without its clause in the lines of earlier joins), saying so in its
    header: how a method measured again (e.g. after its code changed) replaces its rows in a joined table."""
    header, sections = _sections(text)
    names = {parse_row(line)[0] for section in sections for line in section[2:]}
    if name == "plain" or name not in names:
        raise ValueError(f"cannot drop {name!r}: the report's methods other than plain are "
                         f"{sorted(names - {'plain'})}")
    clause = re.compile(rf"; {re.escape(name)}: {INITNO_CLAUSE} .*?(?=; [^;]+: {INITNO_CLAUSE} |\)$)")
    header = [clause.sub("", line) if line.startswith(JOINED) else line for line in header]
    header.append(f"{DROPPED}: {name}")
    sections = [section[:2] + [line for line in section[2:] if parse_row(line)[0] != name] for section in sections]
    return "\n\n".join("\n".join(block) for block in [header, *sections])


def join_reports(texts: list[str]) -> str:
    """One table from reports of the same run settings over different methods (each with plain): the first report's
    rows, then each other report's methods that are not in it yet. Refused when the settings, the splits, plain's
    attention line or plain's outcomes (every column but s/img) differ: then the reports are not of the same
    images. The timing line (the third) may differ. A joined table joins again (its rows come first). A report
    from before the clean columns joins with "-" in them (plain's outcomes compared on the columns both have)."""
    header, sections = _sections(texts[0])
    sections = [upgraded(section) for section in sections]
    joined = list(header)
    for text in texts[1:]:
        other_header, others = _sections(text)
        others = [upgraded(section) for section in others]
        if _settings(other_header) != _settings(header):
            raise ValueError("the reports' settings or plain's attention differ: not the same run settings")
        joined += [line for line in other_header if line.startswith(JOINED)]  # a joined table joins on
        joined.append(f"{JOINED} ({other_header[2].split('; ', 1)[-1]})")
        if [section[0] for section in others] != [section[0] for section in sections]:
            raise ValueError("the reports cover different splits or image counts: not the same run settings")
        for section, other in zip(sections, others):
            rows = {parse_row(line)[0]: line for line in section[2:]}
            for line in other[2:]:
                name, outcome, _ = parse_row(line)
                if name == "plain":
                    kept = parse_row(rows["plain"])[1]
                    if not same_outcomes(outcome, kept):
                        raise ValueError(f"plain differs between the reports in {section[0]!r}: "
                                         f"{rows['plain']!r} against {line!r}")
                    if outcome.count(MISSING) < kept.count(MISSING):  # the row that measured more columns
                        section[section.index(rows["plain"])] = rows["plain"] = line
                elif name not in rows:
                    section.append(line)
                    rows[name] = line
                elif not same_outcomes(outcome, parse_row(rows[name])[1]):
                    raise ValueError(f"{name} differs between the reports in {section[0]!r}: a table keeps one row "
                                     f"per method; drop the older rows first (--drop {name!r})")
    return "\n\n".join("\n".join(block) for block in [joined, *sections])


def mcnemar_p(fixes: int, breaks: int) -> float:
    """Exact McNemar test of a method against plain on the same images: two-sided binomial on fixes vs breaks."""
    n = fixes + breaks
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(min(fixes, breaks) + 1)) / 2 ** n)


def markdown_table(text: str) -> str:
    """A report (joined or not) as the README's table: the `all` rates, fixes / breaks with McNemar's p, the
    held-out splits' `both`, s/img and the A&E loss."""
    _, sections = _sections(text)
    rows = {section[0].split(":")[0]: {row[0]: row for row in map(parse_row, upgraded(section)[2:])}
            for section in sections}
    lines = ["| method | shapes | both | clean | both + clean | fixes / breaks (p) | held-out combo | held-out pair "
             "| s/img | A&E loss |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, outcome, rest in rows["all"].values():
        shapes, both, clean, both_clean, fixes, breaks = outcome
        p = mcnemar_p(int(fixes), int(breaks))
        paired = "-" if name == "plain" else f"{fixes} / {breaks} ({p:.2f})" if p >= 0.01 else f"{fixes} / {breaks} ({p:.1g})"
        held = [rows[split][name][1][1].split()[0] if split in rows else "-"
                for split in ("held_out_combo", "held_out_pair")]
        loss = " ".join(rest[1:]).replace("->", "→")
        lines.append(f"| {name} | {shapes} | **{both}** | {clean} | {both_clean} | {paired} | {held[0]} | {held[1]} "
                     f"| {rest[0]} | {loss} |")
    return "\n".join(lines)


def save_grid(path: Path, vae, latents: dict, labels: list[str]) -> None:
    """Rows = (prompt, seed) images, columns = methods, VAE-decoded through the checkpoint's VAE."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw
    columns = list(latents)
    rows = len(next(iter(latents.values())))
    tile, head, side = 128, 16, 200
    canvas = Image.new("RGB", (side + tile * len(columns), head + tile * rows), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(columns):
        draw.text((side + c * tile + 4, 2), name[:20], fill="black")
        with torch.inference_mode():
            pictures = vae.decode(torch.stack(latents[name]))
        for r in range(rows):
            array = (pictures[r].float().clamp(0, 1).numpy() * 255).astype(np.uint8)
            canvas.paste(Image.fromarray(array).resize((tile, tile), Image.NEAREST), (side + c * tile, head + r * tile))
    for r, label in enumerate(labels):
        draw.text((4, head + r * tile + tile // 2 - 6), label[:32], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def measure(model, clip, methods: dict, splits: dict, args, progress: bool = True) -> dict:
    """Runs every method on every prompt of `splits` (one batch of args.seeds images each); per-image outcomes
    by (split, prompt index, image), plain's attention grounding, and the grid's first two images per split."""
    started = time.perf_counter()
    last_guided = max(0, int(args.steps * GUIDANCE_DEFAULTS["guidance_end"]) - 1)
    results = {name: {"images": {}} for name in methods}
    hits, peaks = [], []
    initno_runs: dict[str, list[dict]] = {}
    grid_latents = {name: [] for name in methods}
    grid_labels = []
    total = len(methods) * sum(len(v) for v in splits.values())
    done = 0
    for split, prompts in splits.items():
        for prompt_index, (pair_a, pair_b) in enumerate(prompts):
            for name, config in methods.items():
                latents, record, seconds = run_batch(model, clip, pair_a, pair_b, 0, args.seeds, config, args)
                rows = image_results(latents, pair_a, pair_b, latent_format(model).process_in)
                aae = aae_losses(record)
                for i, row in enumerate(rows):
                    results[name]["images"][(split, prompt_index, i)] = {
                        "both": row["both"], "shapes": row["shapes"], "clean": row["clean"], "seconds": seconds / len(rows),
                        "aae": None if aae is None else (aae[0][i], aae[1][i])}
                if record.initno is not None:
                    initno_runs.setdefault(name, []).append({**record.initno, "config": config.initno})
                if name == "plain":
                    h, p = attention_grounding(record, rows, (pair_a, pair_b), last_guided)
                    hits += h
                    peaks += p
                if prompt_index == 0:
                    grid_latents[name] += [latents[0], latents[1]]
                done += 1
                if progress:
                    print(f"\r{done}/{total} batches, {time.perf_counter() - started:.0f} s", end="", file=sys.stderr,
                          flush=True)
            if prompt_index == 0:
                grid_labels += [f"{pair_a[0]} {pair_a[1]} + {pair_b[0]} {pair_b[1]} #{i}" for i in (0, 1)]
    if progress:
        print(file=sys.stderr)
    return {"results": results, "hits": hits, "peaks": peaks, "grid_latents": grid_latents,
            "grid_labels": grid_labels, "last_guided": last_guided, "started": started, "initno": initno_runs}


def initno_line(measured: dict) -> str:
    """How InitNO's stage ended per image (the record's InitNO entry): successes and the kept noise's scores."""
    parts = []
    for name, runs in measured["initno"].items():
        config = runs[0]["config"]
        succeeded = [s for r in runs for s in r["succeeded"]]
        parts.append(f"{name}: {INITNO_CLAUSE} {sum(succeeded)} of {len(succeeded)} images, kept response "
                     f"{statistics.fmean(x for r in runs for x in r['response']):.3f}, conflict "
                     f"{statistics.fmean(x for r in runs for x in r['conflict']):.3f} (mean over images; success: "
                     f"below {config.tau_response:g} and {config.tau_conflict:g})")
    return "; ".join(parts)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, help="the world checkpoint (.safetensors)")
    parser.add_argument("--join", type=Path, nargs="+", metavar="REPORT",
                        help="join saved reports of the same settings over different methods into one table")
    parser.add_argument("--drop", action="append", default=[], metavar="METHOD",
                        help="with --join: take this method's rows out of the first report (it was measured again)")
    parser.add_argument("--markdown", action="store_true",
                        help="with --join: print the table as the README's markdown (McNemar's p beside fixes / breaks)")
    parser.add_argument("--quick", action="store_true", help="4 methods, 2 prompts per split, 4 seeds, 10 steps")
    parser.add_argument("--methods", default=None, help="comma-separated (default: all; --quick: " + ", ".join(QUICK_METHODS) + ")")
    parser.add_argument("--prompts-per-split", type=int, default=None, help="default: all (--quick: 2)")
    parser.add_argument("--seeds", type=int, default=8, help="images per prompt, one batch (default 8)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--max-refinement", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a guidance setting other than the papers' for every method (repeatable; keys: "
                             + ", ".join(SETTINGS_DEFAULTS) + "); the report's header names it")
    parser.add_argument("--save", type=Path, default=None, help="write the report here too")
    parser.add_argument("--grid", type=Path, default=None, help="PNG of plain and each method, same seeds")
    args = parser.parse_args(argv)
    if (args.drop or args.markdown) and not args.join:
        parser.error("--drop and --markdown work on saved reports: give --join REPORT ...")
    if args.join:
        try:
            texts = [path.read_text() for path in args.join]
            for name in args.drop:
                texts[0] = drop_method(texts[0], name)
            text = join_reports(texts)
        except ValueError as error:
            raise SystemExit(f"--join: {error}") from None
        print(markdown_table(text) if args.markdown else text)
        if args.save:
            args.save.write_text(text + "\n")
        return
    if args.ckpt is None:
        parser.error("--ckpt is required (or --join REPORT ...)")
    if args.quick:
        args.prompts_per_split = args.prompts_per_split or 2
        args.seeds = min(args.seeds, 4)
        args.steps = 10 if args.steps == 20 else args.steps
        args.max_refinement = min(args.max_refinement, 5)
    boot_host()
    import torch
    torch.set_num_threads(args.threads)
    names = args.methods.split(",") if args.methods else (list(QUICK_METHODS) if args.quick else None)
    changed = parse_settings(args.set)
    methods = method_configs([n.strip() for n in names] if names else None, args.max_refinement, changed)
    model, clip, vae = load_world(args.ckpt)
    scenes = pack_module("world.scenes")
    splits = scenes.two_object_prompts()
    if args.prompts_per_split:
        splits = {k: v[:args.prompts_per_split] for k, v in splits.items()}
    measured = measure(model, clip, methods, splits, args)
    results, started = measured["results"], measured["started"]
    header = [*settings_lines(args, changed),
              "; ".join([f"torch {torch.__version__}, {args.threads} threads, cpu",
                         f"wall time {time.perf_counter() - started:.0f} s", *filter(None, [initno_line(measured)])]),
              plain_line(measured)]
    text = report(results, splits, header)
    print(text)
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(text + "\n")
    if args.grid:
        save_grid(args.grid, vae, measured["grid_latents"], measured["grid_labels"])


if __name__ == "__main__":
    main()
