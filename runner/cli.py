"""Command line: run a workflow headlessly through ComfyUI's own executor.

    python -m <pack> run WORKFLOW [--out DIR] [--ckpt FILE] [--demo] [--steps N] [--size PX] ...
    python -m <pack> convert WORKFLOW [-o PROMPT.json]

Run it from the folder that holds the pack (ComfyUI/custom_nodes/ when installed) with ComfyUI's
Python. The ComfyUI host is found as the tests find it: --comfyui, COMFYUI_PATH, the ComfyUI whose
custom_nodes/ holds this pack, else ~/comfy/ComfyUI. The workflow may be in either format: as the
editor saves it (converted by workflow_convert.py) or as 'Export (API)' saves it; a PNG that ComfyUI
saved with its workflow runs that workflow, and a folder runs each workflow in it (each into a
subfolder of --out named after its file; the others still run when one fails). The input is read and
checked before ComfyUI boots.

The prompt goes through the host's own validation and `execution.PromptExecutor`, exactly as a
queued prompt would. Images of SaveImage nodes are written into --out (default: ComfyUI's output
folder, in attn_guide/), and the pictures of preview nodes (PreviewImage, the Attention Map
Visualiser) are copied there too. The saved PNGs embed the workflow as it ran: the command line's
overrides (--steps, --size, --seed, --ckpt, ...) written into its widgets. A node that fails is
reported by its message, once (--verbose shows ComfyUI's log with the traceback).

--demo swaps the checkpoint loaders (and ControlNet loaders) for tiny built-in models with random
weights (tiny_models.py) and gives LoadImage a synthetic line drawing, so the whole path runs on any
machine without downloads; the pictures are noise, the attention maps and guidance losses are
computed for real. To stay quick on a CPU it also runs 20 steps at 256 px and caps refinement at 2
iterations per refinement step (--steps, --size and --max-refinement override these; it says so when
it does). A loader that names the pack's own model (`world_sd15.safetensors`) is not swapped: --demo
loads the shipped, trained world checkpoint (world/), at the workflow's own settings, so its pictures
show what the guidance does (example_workflows/attend_and_excite_world.json). On the CPU the runner
picks torch's attention kernel (ComfyUI's default there is its slower sub-quadratic one).

Nothing here imports ComfyUI at module level: `--help` works without a host, and the host is booted
(device chosen, nodes loaded) before anything touches torch devices.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import json
import logging
import re
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import NamedTuple

from . import host

PACK_DIR = Path(__file__).resolve().parent.parent
FAMILIES = ("sd15", "sd2", "sdxl", "sd3", "sd35m", "flux", "flux_schnell")
DEMO_CHECKPOINT = "AttnGuideDemoCheckpoint"
DEMO_CONTROLNET = "AttnGuideDemoControlNet"
CHECKPOINT_LOADERS = ("CheckpointLoaderSimple", "CheckpointLoader")
CONTROLNET_LOADERS = ("ControlNetLoader", "DiffControlNetLoader")
VISUALISER = "AttnGuideVisualize"
GUIDANCE = "AttnGuideGuidance"
DEMO_SIZE = 256
DEMO_STEPS = 20
DEMO_MAX_REFINEMENT = 2
DEFAULT_OUT_FOLDER = "attn_guide"  # under ComfyUI's output folder, where ComfyUI writes its own pictures
WORKFLOW_SUFFIXES = (".json", ".png")
# The pack's own small model, trained on flat shapes (world/): --demo loads it for real where a workflow names it
WORLD_CHECKPOINT = "world_sd15.safetensors"
WORLD_DEMO_THREADS = 1  # on a CPU the world example runs on the thread count its shipped pictures were made with
DEMO_BANNER = ("DEMO MODE: tiny built-in models with RANDOM WEIGHTS. The images are noise and say nothing about "
               "quality; the attention maps and guidance losses are real computations on those random models.")


class CliError(Exception):
    """A problem the user can fix; printed without a traceback."""


# ---------------------------------------------------------------- the host

def find_host(explicit: str | None = None) -> Path:
    try:
        return host.find_host(explicit)
    except host.HostNotFound as error:
        raise CliError(f"{error} Or pass --comfyui DIR.") from None


def _accelerator_available() -> bool:
    import torch
    if torch.cuda.is_available():
        return True
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available())


def boot_host(comfyui: Path, force_cpu: bool = False, verbose: bool = False) -> str:
    """Boots ComfyUI from `comfyui` with this pack loaded (host.boot_host); the pack's module name."""
    cpu = force_cpu or not _accelerator_available()
    try:
        # on the CPU ComfyUI defaults to its sub-quadratic attention; torch's is about twice as fast here
        name = host.boot_host(comfyui, cpu=cpu, torch_attention=cpu, log_level=None if verbose else logging.ERROR)
    except RuntimeError as error:
        raise CliError(f"{error} (run with --verbose to see why)") from None
    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)
    return name


# ---------------------------------------------------------------- demo models (also used by the tests)

class DemoCheckpointLoader:
    """--demo's stand-in for a checkpoint loader: the tiny random model of a family."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (list(FAMILIES),), "seed": ("INT", {"default": 0, "min": 0})}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, family, seed):
        from . import tiny_models
        return tiny_models.make_model(family, seed), tiny_models.make_clip(family, seed + 1), tiny_models.make_vae(
            seed + 2, family=family)


class DemoControlNetLoader:
    """--demo's stand-in for ControlNetLoader: a tiny random ControlNet matching the tiny model."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (list(FAMILIES),), "seed": ("INT", {"default": 3, "min": 0})}}

    RETURN_TYPES = ("CONTROL_NET",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, family, seed):
        from . import tiny_models
        return (tiny_models.make_controlnet(family, seed),)


def guess_family(checkpoint_name: str) -> str:
    """The model family a checkpoint's file name suggests (flux, sd3.5 / sd3, sdxl, sd2, else sd15)."""
    name = str(checkpoint_name).replace("\\", "/").lower()
    if "flux" in name:
        return "flux_schnell" if "schnell" in name else "flux"
    if re.search(r"sd3\.5|sd35|sd_3\.5", name):
        return "sd35m"
    if re.search(r"sd3|sd_3", name):
        return "sd3"
    if re.search(r"xl", name):
        return "sdxl"
    if re.search(r"(^|[^a-z0-9])(v2|sd2|sd_2|2[-_.][01])([^0-9]|$)|768", name):
        return "sd2"
    return "sd15"


def demo_image(width: int = 512, height: int = 512):
    """A white-on-black line drawing (a canny-like edge map): a circle, a square and a horizon."""
    from PIL import Image, ImageDraw
    picture = Image.new("RGB", (width, height), "black")
    draw = ImageDraw.Draw(picture)
    line = max(2, width // 128)
    draw.line([(0, int(height * 0.7)), (width, int(height * 0.7))], fill="white", width=line)
    draw.ellipse([width * 0.12, height * 0.25, width * 0.45, height * 0.62], outline="white", width=line)
    draw.rectangle([width * 0.55, height * 0.3, width * 0.88, height * 0.66], outline="white", width=line)
    return picture


def world_checkpoint() -> Path:
    return Path(__file__).resolve().parent.parent / "world" / WORLD_CHECKPOINT


def apply_demo(prompt: dict, family: str | None, input_dir: Path, say) -> str:
    """Swaps checkpoint and ControlNet loaders for the tiny models and gives every LoadImage a
    synthetic picture in `input_dir`. A loader that names the pack's world model keeps it: the shipped,
    trained checkpoint is loaded (its folder registered with ComfyUI). Returns the family used ("world" when
    every checkpoint is the world model)."""
    families = []
    for node_id, node in prompt.items():
        if node["class_type"] in CHECKPOINT_LOADERS and node["inputs"].get("ckpt_name") == WORLD_CHECKPOINT:
            override_checkpoint({node_id: node}, str(world_checkpoint()))
            families.append("world")
            say(f"  demo: node {node_id} {node['class_type']} ({WORLD_CHECKPOINT!r}) -> the pack's own world model "
                "(trained on flat coloured shapes: its pictures and maps mean something)")
        elif node["class_type"] in CHECKPOINT_LOADERS:
            name = node["inputs"].get("ckpt_name", "")
            chosen = family or guess_family(name)
            families.append(chosen)
            say(f"  demo: node {node_id} {node['class_type']} ({name!r}) -> tiny random {chosen} model")
            node["class_type"], node["inputs"] = DEMO_CHECKPOINT, {"family": chosen, "seed": 0}
    if not families:
        raise CliError(f"--demo swaps checkpoint loaders ({', '.join(CHECKPOINT_LOADERS)}) for tiny models, and "
                       "this workflow has none")
    if set(families) == {"world"}:
        return "world"
    say(DEMO_BANNER)
    families = [f for f in families if f != "world"]
    if len(set(families)) > 1 and family is None:
        say(f"  demo: the checkpoints suggest several families ({', '.join(sorted(set(families)))}); the tiny "
            f"ControlNet follows {families[0]} (use --family to choose)")
    used = family or families[0]
    for node_id, node in prompt.items():
        kind = node["class_type"]
        if kind in CONTROLNET_LOADERS:
            say(f"  demo: node {node_id} {kind} ({node['inputs'].get('control_net_name')!r}) -> tiny random "
                f"{used} ControlNet")
            node["class_type"], node["inputs"] = DEMO_CONTROLNET, {"family": used, "seed": 3}
        elif kind == "LoadImage" and isinstance(node["inputs"].get("image"), str):
            name = node["inputs"]["image"]
            target = input_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            demo_image().save(target)
            say(f"  demo: node {node_id} LoadImage ({name!r}) -> a synthetic line drawing")
    return used


def register_demo_nodes() -> None:
    import nodes
    nodes.NODE_CLASS_MAPPINGS.setdefault(DEMO_CHECKPOINT, DemoCheckpointLoader)
    nodes.NODE_CLASS_MAPPINGS.setdefault(DEMO_CONTROLNET, DemoControlNetLoader)
    nodes.NODE_DISPLAY_NAME_MAPPINGS.setdefault(DEMO_CHECKPOINT, "Tiny random checkpoint (AttnGuide demo)")
    nodes.NODE_DISPLAY_NAME_MAPPINGS.setdefault(DEMO_CONTROLNET, "Tiny random ControlNet (AttnGuide demo)")


# ---------------------------------------------------------------- overrides

def _set_everywhere(prompt: dict, names: tuple[str, ...], value, classes: tuple[str, ...] | None = None) -> list:
    changed = []
    for node_id, node in prompt.items():
        if classes is not None and node["class_type"] not in classes:
            continue
        for name in names:
            if name in node["inputs"] and not isinstance(node["inputs"][name], list):
                node["inputs"][name] = value
                changed.append(f"{node_id}.{name}")
    return changed


def override_checkpoint(prompt: dict, checkpoint: str) -> str:
    """Points every `ckpt_name` input at `checkpoint`: a file path (its folder is registered with
    ComfyUI) or a name from ComfyUI's checkpoints folders."""
    import folder_paths
    path = Path(checkpoint).expanduser()
    if path.is_file():
        folder = str(path.resolve().parent)
        try:
            folder_paths.add_model_folder_path("checkpoints", folder, is_default=True)
        except TypeError:  # older ComfyUI: no is_default
            folder_paths.add_model_folder_path("checkpoints", folder)
        name = path.name
    else:
        name = checkpoint
        available = folder_paths.get_filename_list("checkpoints")
        if name not in available:
            listed = ", ".join(available[:20]) + (" ..." if len(available) > 20 else "") or "none"
            raise CliError(f"--ckpt {checkpoint!r} is neither a file nor a checkpoint ComfyUI knows; ComfyUI's "
                           f"checkpoints: {listed}")
    if not _set_everywhere(prompt, ("ckpt_name",), name):
        raise CliError("--ckpt: the workflow has no checkpoint loader (no node with a ckpt_name input)")
    return name


def apply_overrides(prompt: dict, options, say) -> None:
    if options.ckpt and options.demo:
        say("  note: --ckpt is ignored with --demo (the tiny random models replace every checkpoint)")
    elif options.ckpt:
        name = override_checkpoint(prompt, options.ckpt)
        say(f"  checkpoint: {name}")
    if options.steps is not None:
        if not _set_everywhere(prompt, ("steps",), options.steps):
            raise CliError("--steps: no node of the workflow has a 'steps' widget")
        say(f"  steps: {options.steps}")
    if options.size is not None:
        width, height = options.size
        latents = tuple(node["class_type"] for node in prompt.values() if node["class_type"].startswith("Empty"))
        if not (_set_everywhere(prompt, ("width",), width, latents) and _set_everywhere(prompt, ("height",), height,
                                                                                          latents)):
            raise CliError("--size: the workflow has no empty-latent node with width and height")
        say(f"  size: {width}x{height}")
    if options.max_refinement is not None:
        if not _set_everywhere(prompt, ("max_refinement_steps",), options.max_refinement, (GUIDANCE,)):
            raise CliError("--max-refinement: the workflow has no Attention Guidance Losses node")
        say(f"  max_refinement_steps: {options.max_refinement}")
    if options.seed is not None:
        if not _set_everywhere(prompt, ("seed", "noise_seed"), options.seed):
            raise CliError("--seed: no node of the workflow has a seed")
        say(f"  seed: {options.seed}")


def _parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: give PX or WIDTHxHEIGHT (e.g. 256 or 512x768)")
    width = int(match.group(1))
    height = int(match.group(2) or width)
    if width % 8 or height % 8 or not (64 <= width <= 16384 and 64 <= height <= 16384):
        raise argparse.ArgumentTypeError(f"size {width}x{height}: both sides must be multiples of 8 in 64..16384")
    return width, height


# ---------------------------------------------------------------- running

class _ConsoleServer:
    """What PromptExecutor needs of a server when none runs: it prints which node runs."""

    def __init__(self, prompt: dict, say):
        self.client_id = "attn-guide-cli"
        self.last_node_id = None
        self.last_prompt_id = None
        self.prompt = prompt
        self.say = say
        self.executed: list[tuple[str, dict]] = []
        self._count = 0

    def send_sync(self, event, data, sid=None):
        if event == "executing" and isinstance(data, dict) and data.get("node") is not None:
            node_id = str(data["node"])
            self.last_node_id = node_id
            self._count += 1
            node = self.prompt.get(node_id, {})
            title = node.get("_meta", {}).get("title")
            kind = node.get("class_type", "?")
            label = f"{kind}" + (f" '{title}'" if title and title != kind else "")
            self.say(f"[{self._count}/{len(self.prompt)}] node {node_id}: {label}")
        elif event == "executed" and isinstance(data, dict):
            self.executed.append((str(data.get("node")), data.get("output") or {}))

    def queue_updated(self):
        pass


def _progress_hook(stream):
    """ComfyUI's progress-bar hook: a bar redrawn in place on a terminal; in a log, a line per tenth."""
    interactive = stream.isatty()
    state = {"bar": None, "tenth": -1}

    def hook(value, total, preview_image=None, prompt_id=None, node_id=None):
        if not total:
            return
        if state["bar"] != (node_id, total) or value < state.get("value", 0):
            state.update(bar=(node_id, total), tenth=-1)
        state["value"] = value
        width = 30
        filled = int(width * value / total)
        text = f"    [{'#' * filled}{'.' * (width - filled)}] {value}/{total}"
        if interactive:
            stream.write("\r" + text + ("\n" if value >= total else ""))
            stream.flush()
            return
        tenth = min(10, int(10 * value / total))
        if tenth > state["tenth"] and value > 0:
            state["tenth"] = tenth
            stream.write(text + "\n")
            stream.flush()
    return hook


def _format_validation(error: dict, node_errors: dict, prompt: dict, demo: bool) -> str:
    lines = [f"the workflow did not pass ComfyUI's validation: {error.get('message', error)}"
             + (f" ({error['details']})" if error.get("details") else "")]
    for node_id, entry in (node_errors or {}).items():
        kind = entry.get("class_type") or prompt.get(node_id, {}).get("class_type")
        for problem in entry.get("errors", []):
            detail = problem.get("details") or ""
            lines.append(f"  node {node_id} ({kind}): {problem.get('message')}" + (f": {detail}" if detail else ""))
            name = (problem.get("extra_info") or {}).get("input_name")
            if name == "ckpt_name":
                lines.append("    -> pass --ckpt FILE (or a name from models/checkpoints), or --demo for tiny "
                             "random models")
            elif name == "control_net_name":
                lines.append("    -> put the ControlNet into models/controlnet (see example_workflows/README.md), "
                             "or use --demo")
            elif kind == "LoadImage":
                lines.append("    -> put the picture into ComfyUI's input folder or pass --input-dir DIR" +
                             ("" if demo else ", or use --demo for a synthetic one"))
    return "\n".join(lines)


def _executor(execution, server):
    """A PromptExecutor without an output cache (one prompt per process), on old and new ComfyUI."""
    none = getattr(getattr(execution, "CacheType", None), "NONE", None)
    if none is None:  # ComfyUI 0.3.x: its default (classic) cache
        return execution.PromptExecutor(server)
    return execution.PromptExecutor(server, cache_type=none, cache_args={"lru": 0, "ram": 0.0, "ram_inactive": 0.0})


def _image_files(executed: list[tuple[str, dict]]):
    import folder_paths
    for node_id, output in executed:
        for index, image in enumerate(output.get("images") or []):
            if not isinstance(image, dict) or "filename" not in image:
                continue
            base = folder_paths.get_directory_by_type(image.get("type", "output"))
            if base is None:
                continue
            yield node_id, index, image.get("type", "output"), Path(base) / image.get("subfolder", "") / image[
                "filename"]


def run(options, say) -> RunResult:
    """Runs the workflow file, or every workflow of a folder, given to `run`. The input is read and checked
    before ComfyUI boots, so a wrong path is said at once."""
    sources = collect_workflows(options.workflow, say)
    check_paths(options)
    comfyui = find_host(options.comfyui)
    out = Path(options.out).expanduser().resolve() if options.out else None
    if out is not None:
        refuse_custom_nodes_out(out, comfyui)
    say(f"ComfyUI: {comfyui}")
    boot_host(comfyui, force_cpu=options.cpu, verbose=options.verbose)
    import comfy.model_management
    say(f"device: {comfy.model_management.get_torch_device()}")
    if out is None:
        out = default_out_dir()
    if not Path(options.workflow).expanduser().is_dir():
        return RunResult(run_workflow(sources[0], options, out, say), out, [], 1)
    written, failed = [], []
    for number, (source, folder) in enumerate(zip(sources, _subfolders(sources)), 1):
        say(f"\n=== workflow {number}/{len(sources)}: {source.path.name} -> {out / folder}")
        try:
            written += run_workflow(source, copy.copy(options), out / folder, say)
        except CliError as error:
            say(f"error: {source.path.name}: {error}", err=True)
            failed.append(source.path.name)
    return RunResult(written, out, failed, len(sources))


class RunResult(NamedTuple):
    written: list[Path]
    out: Path
    failed: list[str]  # the file names of the workflows that failed (a folder's run goes on after one fails)
    count: int


def collect_workflows(path_text: str, say) -> list:
    """The workflows `run` was given, read without the host: a file (a workflow JSON, or a PNG that holds one)
    or a folder: each of its .json and .png files that holds a workflow, in name order (others are skipped
    with a note)."""
    from . import workflow_convert
    path = Path(path_text).expanduser()
    if not path.exists():
        where = "" if path.is_absolute() else f" (relative to the current folder, {Path.cwd()})"
        raise CliError(f"{path_text!r} does not exist{where}")
    if not path.is_dir():
        try:
            return [workflow_convert.read_workflow(path)]
        except workflow_convert.ConversionError as error:
            raise CliError(str(error)) from None
    sources, skipped = [], []
    for candidate in sorted(path.iterdir()):
        if not candidate.is_file() or candidate.suffix.lower() not in WORKFLOW_SUFFIXES:
            continue
        try:
            sources.append(workflow_convert.read_workflow(candidate))
        except workflow_convert.ConversionError as error:
            skipped.append(f"{candidate.name}: {error}")
    if not sources:
        raise CliError(f"the folder {path_text!r} holds no workflow (a .json workflow, or a .png with an embedded "
                       "one)" + "".join(f"\n  {line}" for line in skipped))
    say(f"folder {path}: {len(sources)} workflow(s): {', '.join(s.path.name for s in sources)}")
    for line in skipped:
        say(f"  note: skipping {line}")
    return sources


def _subfolders(sources: list) -> list[str]:
    """One output folder per workflow of a folder run, named after its file (a.json and a.png: a, a_png)."""
    stems = [source.path.stem for source in sources]
    return [stem if stems.count(stem) == 1 or source.path.suffix.lower() == ".json"
            else f"{stem}_{source.path.suffix.lower().lstrip('.')}" for stem, source in zip(stems, sources)]


def check_paths(options) -> None:
    """The paths the options name, checked before the host boots."""
    if options.input_dir and not Path(options.input_dir).expanduser().is_dir():
        raise CliError(f"--input-dir {options.input_dir!r} is not a folder")
    if options.out and Path(options.out).expanduser().is_file():
        raise CliError(f"--out {options.out!r} is a file; give a folder")


def default_out_dir() -> Path:
    """Where `run` writes without --out: a folder in ComfyUI's output folder (the host must be booted)."""
    import folder_paths
    return Path(folder_paths.get_output_directory()).resolve() / DEFAULT_OUT_FOLDER


def refuse_custom_nodes_out(out: Path, comfyui: Path) -> None:
    """ComfyUI imports every folder in custom_nodes/ as a node pack at start: an output folder there fails
    to import at every start."""
    folders = {(comfyui / "custom_nodes").resolve()}
    if PACK_DIR.parent.name == "custom_nodes":
        folders.add(PACK_DIR.parent.resolve())
    if out.parent in folders:
        raise CliError(f"--out {str(out)!r} is in ComfyUI's custom_nodes folder, where ComfyUI imports every folder "
                       "as a node pack at start (and reports it as IMPORT FAILED); choose another folder, or leave "
                       f"out --out: the default is ComfyUI's output folder (output/{DEFAULT_OUT_FOLDER})")


class _QuietNodeErrors(logging.Filter):
    """Drops ComfyUI's own report of a failed node (its message, then its traceback): the runner says the
    node's message once. With --verbose nothing is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or record.module != "execution":
            return True
        return not str(record.msg).startswith(("!!! Exception during processing", "Traceback (most recent call"))


def _node_failure(error: dict, prompt: dict, verbose: bool) -> str:
    node_id = str(error.get("node_id"))
    kind = error.get("node_type") or prompt.get(node_id, {}).get("class_type", "?")
    title = prompt.get(node_id, {}).get("_meta", {}).get("title")
    label = kind + (f" {title!r}" if title and title != kind else "")
    message = str(error.get("exception_message", "")).strip()
    exception_type = str(error.get("exception_type", "")).rsplit(".", 1)[-1]
    if exception_type and exception_type != "ValueError":  # the nodes' own input errors are ValueErrors
        message = f"{exception_type}: {message}"
    hint = "" if verbose else "\n  (run with --verbose for ComfyUI's log and the traceback)"
    return f"node {node_id} ({label}) failed: {message}{hint}"


def _changed_widgets(before: dict, after: dict) -> dict[str, dict]:
    """node id -> {input: value} of the widget values that differ (links are not widget values)."""
    changes = {}
    for node_id, node in after.items():
        old = before.get(node_id, {}).get("inputs", {})
        changed = {name: value for name, value in node["inputs"].items()
                   if not isinstance(value, list) and (name not in old or old[name] != value)}
        if changed:
            changes[node_id] = changed
    return changes


def run_workflow(source, options, out: Path, say) -> list[Path]:
    """Runs one read workflow on the booted host; the files written into `out`."""
    import comfy.model_management
    import comfy.utils
    import execution
    import folder_paths
    import nodes
    import torch

    from . import workflow_convert
    warnings: list[str] = []
    try:
        prompt, ui_workflow = workflow_convert.source_prompt(source, nodes.NODE_CLASS_MAPPINGS, warnings)
    except workflow_convert.ConversionError as error:
        raise CliError(str(error)) from None
    for warning in warnings:
        say(f"  note: {warning}")
    origin = "" if source.origin == "JSON" else f", {source.origin}"
    say(f"workflow: {source.path.name} ({len(prompt)} nodes, {'UI' if ui_workflow else 'API'} format{origin})")

    scratch = Path(tempfile.mkdtemp(prefix="attn_guide_run_"))
    # the host's folders as they were, for the next workflow of a folder run (the demo's input folder goes)
    folders = (folder_paths.get_output_directory(), folder_paths.get_temp_directory(),
               folder_paths.get_input_directory())
    threads = torch.get_num_threads()
    try:
        folder_paths.set_output_directory(str(out))
        folder_paths.set_temp_directory(str(scratch / "temp"))
        if options.input_dir:
            folder_paths.set_input_directory(str(Path(options.input_dir).expanduser().resolve()))
        if options.demo:
            register_demo_nodes()
            demo_inputs = scratch / "input"
            demo_inputs.mkdir()
            folder_paths.set_input_directory(str(demo_inputs))
            if apply_demo(prompt, options.family, demo_inputs, say) == "world":
                if comfy.model_management.get_torch_device().type == "cpu" and threads != WORLD_DEMO_THREADS:
                    torch.set_num_threads(WORLD_DEMO_THREADS)
                    say(f"  demo: {WORLD_DEMO_THREADS} CPU thread, as the example's pictures were made: guidance's "
                        "gradient steps amplify the order in which floats are summed, so another thread count can "
                        "draw another picture for the same seed")
            else:
                # tiny random models, kept quick; the world model runs at the settings the workflow saved
                random_runs = getattr(options, "random_models", None)
                if random_runs is not None:  # shared by a folder run's copies of the options
                    random_runs.append(source.path.name)
                if options.size is None:
                    options.size = (DEMO_SIZE, DEMO_SIZE)
                    say(f"  demo: images at {DEMO_SIZE}x{DEMO_SIZE} (--size to change)")
                if options.steps is None:
                    options.steps = DEMO_STEPS
                    say(f"  demo: {DEMO_STEPS} steps (--steps to change; the guided range and refinement points are "
                        "fractions of the steps)")
                if options.max_refinement is None and any(n["class_type"] == GUIDANCE for n in prompt.values()):
                    options.max_refinement = DEMO_MAX_REFINEMENT
                    say(f"  demo: at most {DEMO_MAX_REFINEMENT} refinement iterations per refinement step: random "
                        "weights never reach the thresholds, so refinement would always run to its cap "
                        "(--max-refinement to change)")
        before_overrides = copy.deepcopy(prompt)
        apply_overrides(prompt, options, say)

        prompt_id = str(uuid.uuid4())
        quiet = not options.verbose  # ComfyUI logs validation failures itself; ours below says more
        if quiet:
            logging.disable(logging.ERROR)
        try:
            valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        finally:
            logging.disable(logging.NOTSET)
        if not valid[0]:
            raise CliError(_format_validation(valid[1], valid[3], prompt, options.demo))
        server = _ConsoleServer(prompt, say)
        comfy.utils.set_progress_bar_enabled(False)  # our own bar below instead of tqdm's
        comfy.utils.set_progress_bar_global_hook(_progress_hook(sys.stdout))
        extra_data = {"client_id": "attn-guide-cli"}  # without a client id the executor reports no node events
        if ui_workflow is not None:
            # SaveImage embeds it, so the PNG opens in the editor: the workflow as it ran (the overrides
            # written into its widgets; --demo's model swaps are in the embedded prompt only)
            ran = workflow_convert.set_widget_values(ui_workflow, _changed_widgets(before_overrides, prompt),
                                                     nodes.NODE_CLASS_MAPPINGS)
            extra_data["extra_pnginfo"] = {"workflow": ran}
        executor = _executor(execution, server)
        started = time.perf_counter()
        quiet_filter = _QuietNodeErrors()
        if quiet:
            logging.getLogger().addFilter(quiet_filter)
        try:
            executor.execute(prompt, prompt_id, extra_data, valid[2])
        finally:
            logging.getLogger().removeFilter(quiet_filter)
        if not executor.success:
            errors = [data for event, data in executor.status_messages if event == "execution_error"]
            if errors:
                raise CliError(_node_failure(errors[0], prompt, options.verbose))
            raise CliError(f"the run did not finish: {executor.status_messages[-1:]}")
        say(f"finished in {time.perf_counter() - started:.1f} s")

        out.mkdir(parents=True, exist_ok=True)  # only now: a run that fails leaves no empty folder
        written = []
        for node_id, index, kind, image_path in _image_files(server.executed):
            if kind == "output":
                written.append(image_path)
                continue
            class_type = prompt.get(node_id, {}).get("class_type", "")
            if class_type == VISUALISER:
                mode = str(prompt[node_id]["inputs"].get("mode", "")).replace(" ", "_")
                name = f"attention_{node_id}_{mode}_{index:02d}{image_path.suffix}"
            else:
                name = f"preview_{node_id}_{index:02d}{image_path.suffix}"
            shutil.copyfile(image_path, out / name)
            written.append(out / name)
        return written
    finally:
        torch.set_num_threads(threads)
        folder_paths.set_output_directory(folders[0])
        folder_paths.set_temp_directory(folders[1])
        folder_paths.set_input_directory(folders[2])
        shutil.rmtree(scratch, ignore_errors=True)


def convert(options, say) -> None:
    from . import workflow_convert
    try:
        source = workflow_convert.read_workflow(Path(options.workflow).expanduser())
    except workflow_convert.ConversionError as error:
        raise CliError(str(error)) from None
    boot_host(find_host(options.comfyui), force_cpu=True, verbose=options.verbose)
    import nodes
    warnings: list[str] = []
    try:
        prompt, _ = workflow_convert.source_prompt(source, nodes.NODE_CLASS_MAPPINGS, warnings)
    except workflow_convert.ConversionError as error:
        raise CliError(str(error)) from None
    for warning in warnings:
        say(f"note: {warning}", err=True)
    text = json.dumps(prompt, indent=2)
    if options.output:
        Path(options.output).write_text(text + "\n", encoding="utf-8")
        say(f"wrote {options.output}", err=True)
    else:
        print(text)


# ---------------------------------------------------------------- entry point

def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    prog = prog or f"python -m {PACK_DIR.name}"
    parser = argparse.ArgumentParser(prog=prog, description="Attention guidance (Attend-and-Excite, A-STAR) for "
                                     "ComfyUI, from the command line.")
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub):
        sub.add_argument("--comfyui", metavar="DIR", help="the ComfyUI folder (default: COMFYUI_PATH, the ComfyUI "
                         "that holds this pack, else ~/comfy/ComfyUI)")
        sub.add_argument("--verbose", action="store_true", help="show ComfyUI's log")

    run_parser = commands.add_parser(
        "run", help="run a workflow headlessly", description="Run a workflow (UI or API format, or a PNG that "
        "holds one) through ComfyUI's own validation and executor; write its images and attention maps into "
        "--out. Given a folder, run each workflow in it (its .json files and the .png files that hold a "
        "workflow, in name order), each into a subfolder of --out named after the file.",
        epilog=f"example: {prog} run {PACK_DIR.name}/example_workflows/attend_and_excite_sd15.json --demo")
    run_parser.add_argument("workflow", help="a workflow JSON file (as the editor saves it, or 'Export (API)'), a "
                            "PNG with an embedded workflow (as ComfyUI saves pictures), or a folder of them")
    run_parser.add_argument("--out", metavar="DIR", help="where images and attention maps go (default: "
                            f"ComfyUI's output folder, in {DEFAULT_OUT_FOLDER}/)")
    run_parser.add_argument("--ckpt", metavar="FILE", help="checkpoint for every checkpoint loader: a file path, "
                            "or a name in ComfyUI's models/checkpoints")
    run_parser.add_argument("--demo", action="store_true", help="tiny built-in models with RANDOM weights instead "
                            "of the checkpoints (and ControlNets) the workflow names; synthetic LoadImage pictures")
    run_parser.add_argument("--family", choices=FAMILIES, help="with --demo: the tiny model family (default: "
                            "guessed from the checkpoint name)")
    run_parser.add_argument("--steps", type=int, metavar="N", help="override the sampling steps of every sampler")
    run_parser.add_argument("--size", type=_parse_size, metavar="PX|WxH", help="override the empty latent's size")
    run_parser.add_argument("--seed", type=int, metavar="N", help="override every seed")
    run_parser.add_argument("--max-refinement", type=int, metavar="N", help="override max_refinement_steps of "
                            "the Attention Guidance Losses nodes")
    run_parser.add_argument("--input-dir", metavar="DIR", help="where LoadImage looks (default: ComfyUI's input)")
    run_parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is available")
    common(run_parser)

    convert_parser = commands.add_parser("convert", help="print a UI-format workflow as an API-format prompt")
    convert_parser.add_argument("workflow", help="a workflow JSON file, or a PNG with an embedded workflow")
    convert_parser.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    common(convert_parser)

    from .bench import add_parser as add_bench_parser  # standard library only at import
    add_bench_parser(commands, common, prog)
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    options = build_parser(prog).parse_args(argv)

    def say(message: str, err: bool = False) -> None:
        stream = sys.stderr if err else sys.stdout
        stream.write(message + "\n")
        stream.flush()

    if options.command == "bench":
        from .bench import main as bench_main
        return bench_main(options, say)
    try:
        if options.command == "run":
            if options.steps is not None and options.steps < 1:
                raise CliError("--steps must be at least 1")
            if options.max_refinement is not None and options.max_refinement < 0:
                raise CliError("--max-refinement must be 0 or more")
            options.random_models = []  # the workflows that ran on tiny random models (--demo)
            result = run(options, say)
            say(f"wrote {len(result.written)} file(s) into {result.out}:")
            for path in result.written:
                say(f"  {path}")
            if options.random_models:
                say(DEMO_BANNER)
            if result.failed:
                raise CliError(f"{len(result.failed)} of {result.count} workflows failed: {', '.join(result.failed)}")
        else:
            convert(options, say)
    except CliError as error:
        say(f"error: {error}", err=True)
        return 1
    return 0
