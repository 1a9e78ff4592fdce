"""`python -m <pack> bench`: guidance methods compared at the paper's scale, on ComfyUI itself.

    python -m <pack> bench --ckpt sd-v1-4.ckpt                         # 276 A&E prompts x 64 seeds x 4 methods
    python -m <pack> bench --ckpt NAME --server http://gpu1:8188 --server http://gpu2:8188
    python -m <pack> bench report --out attn_guide_bench

Every job (prompt, seed, method) is one ComfyUI prompt: by default it runs in this process through ComfyUI's own
executor (as `run` does), with --server on running ComfyUI servers through their HTTP API (/prompt, /queue,
/history, /view, /interrupt, /object_info), several jobs in flight per server. Results go into a store (--out):
bench.sqlite and the images. The same command again resumes. Pieces: prompts.py (prompt sets), methods.py
(presets, workflows, the job's graph), store.py, backends.py, run.py (the scheduler), metrics.py, report.py.
Nothing imports ComfyUI at module level.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path


def _size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: give PX or WIDTHxHEIGHT")
    width, height = int(match.group(1)), int(match.group(2) or match.group(1))
    if width % 8 or height % 8 or not (64 <= width <= 16384 and 64 <= height <= 16384):
        raise argparse.ArgumentTypeError(f"size {width}x{height}: both sides must be multiples of 8 in 64..16384")
    return width, height


def add_parser(commands, common, prog: str) -> argparse.ArgumentParser:
    """The `bench` subcommand (and `bench report`) on the command line's subparsers."""
    bench = commands.add_parser(
        "bench", help="compare guidance methods over a prompt set (the A&E benchmark by default)",
        description="Run prompts x seeds x methods through ComfyUI (this process, or --server URLs), store "
        "images and per-image metrics in --out, and resume when run again. `bench report` summarises the store.",
        epilog=f"examples: {prog} bench --demo --seeds 0-1 --num-prompts 3 --steps 4 --size 64  |  "
               f"{prog} bench --ckpt v1-5-pruned-emaonly.safetensors --server http://127.0.0.1:8188  |  "
               f"{prog} bench report")
    bench.add_argument("--out", default=None, metavar="DIR",
                       help="the store: bench.sqlite and images/ (default: attn_guide_bench in ComfyUI's output "
                            "folder, else in the current folder)")
    bench.add_argument("--prompts", metavar="FILE", help="prompt set: JSON ({category: [...]} or a list; entries "
                       "'prompt' or {prompt, subjects, category}) or TXT ('prompt' or 'prompt | subjects' a line); "
                       "default: the A&E paper's 276 prompts (data/attend_and_excite_prompts.json)")
    bench.add_argument("--categories", metavar="A,B", help="only these categories of the prompt set")
    bench.add_argument("--num-prompts", type=int, metavar="N", help="the first N prompts, taken in turn from "
                       "each category")
    bench.add_argument("--seeds", default="0-63", help="seeds: 0-63, 0,5,7 or 0-3,10 (default 0-63)")
    bench.add_argument("--method", action="append", metavar="M", help="repeatable; default: plain, A&E, A-STAR, "
                       "A&E+A-STAR. A preset (also every loss of the Guidance node by name), 'NAME: loss=weight; "
                       "input=value' (a custom loss set), or a workflow file ([NAME=]FILE.json) whose nodes are "
                       "marked #prompt, #subjects, #seed, #image in their titles")
    bench.add_argument("--guidance", action="append", metavar="KEY=VALUE", help="repeatable: an input of the "
                       "Attention Guidance node for every guided method, e.g. max_refinement_steps=5")
    model = bench.add_argument_group("model and sampling (the presets' graph)")
    model.add_argument("--ckpt", metavar="NAME", help="checkpoint for CheckpointLoaderSimple: a name in ComfyUI's "
                       "models/checkpoints (on every server), or a file path when jobs run in this process")
    model.add_argument("--loader", metavar="NODE", help="a loader node type without required inputs that outputs "
                       "MODEL, CLIP, VAE (instead of --ckpt)")
    model.add_argument("--demo", action="store_true", help="tiny built-in models with RANDOM weights (this "
                       "process only)")
    model.add_argument("--family", choices=("sd15", "sd2", "sdxl"), help="with --demo: the tiny model family")
    model.add_argument("--steps", type=int, metavar="N", help="sampling steps (default 50, the paper's)")
    model.add_argument("--size", type=_size, metavar="PX|WxH", help="image size (default 512)")
    model.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    model.add_argument("--sampler", default="euler", help="sampler name (default euler)")
    model.add_argument("--scheduler", default="normal", help="scheduler (default normal)")
    model.add_argument("--negative", default="", help="negative prompt (default empty)")
    model.add_argument("--retention-from", type=float, default=0.25, metavar="F", help="the retention metric "
                       "compares the maps at this fraction of the schedule with the last step's (default 0.25)")
    where = bench.add_argument_group("where the jobs run")
    where.add_argument("--server", action="append", metavar="URL", help="repeatable: a running ComfyUI with this "
                       "pack installed (e.g. http://127.0.0.1:8188); without it, jobs run in this process")
    where.add_argument("--jobs-per-server", type=int, default=2, metavar="N", help="our jobs in a server's queue "
                       "at once (default 2: one running, the next waiting)")
    where.add_argument("--dead-after", type=float, default=20.0, metavar="S", help="a server that does not answer "
                       "for S seconds is given up and its jobs go to the others (default 20)")
    where.add_argument("--poll", type=float, default=0.25, metavar="S", help="how often servers are asked "
                       "(default 0.25 s)")
    where.add_argument("--no-steal", action="store_true", help="never move a job waiting in a server's queue to an "
                       "idle server")
    where.add_argument("--cpu", action="store_true", help="this process: run on the CPU even with a GPU")
    bench.add_argument("--clip", metavar="DIR", help="a local CLIP model (transformers' CLIPModel folder): adds the "
                       "paper's CLIP text-image similarities (full prompt, minimum of the two halves)")
    bench.add_argument("--progress-interval", type=float, default=15.0, metavar="S", help="without a terminal: "
                       "print the progress line every S seconds (default 15)")
    common(bench)
    actions = bench.add_subparsers(dest="bench_command", metavar="{report}")
    report = actions.add_parser("report", help="summarise a store: Markdown table, bar charts, contact sheets",
                                description="Per method x category: mean ± standard error and the paired change "
                                "against plain, as report.md with PNG bar charts, and a contact sheet per prompt.")
    report.add_argument("--out", dest="report_store", metavar="DIR", help="the store (default: bench's --out)")
    report.add_argument("--report-dir", metavar="DIR", help="where the report goes (default: <store>/report)")
    report.add_argument("--sheet-seeds", type=int, default=8, metavar="N", help="seeds per contact sheet (default 8)")
    report.add_argument("--max-sheets", type=int, metavar="N", help="contact sheets for the first N prompts only")
    report.add_argument("--clip", dest="report_clip", metavar="DIR", help="first add CLIP metrics to stored images "
                        "that lack them")
    return bench


def main(options, say) -> int:
    """Runs `bench` or `bench report`; the exit status (1 with a message for a problem the user can fix)."""
    from . import run as run_module
    try:
        options.out = str(store_folder(options.out, getattr(options, "comfyui", None)))
        if getattr(options, "bench_command", None) == "report":
            return _report(options, say)
        if options.steps is not None and options.steps < 1:
            raise run_module.BenchError("--steps must be at least 1")
        if options.jobs_per_server < 1:
            raise run_module.BenchError("--jobs-per-server must be at least 1")
        return run_module.run(options, say)
    except run_module.BenchError as error:
        say(f"error: {error}", err=True)
        return 1


def store_folder(out, comfyui=None) -> Path:
    """--out, else attn_guide_bench in the local ComfyUI's output folder (else in the current folder). Never a
    folder directly in custom_nodes/: ComfyUI imports every folder there as a node pack at each start."""
    from .. import host
    from .run import BenchError
    if out:
        folder = Path(out).expanduser().resolve()
    else:
        try:
            folder = host.find_host(comfyui) / "output" / "attn_guide_bench"
        except host.HostNotFound:
            folder = Path.cwd().resolve() / "attn_guide_bench"
    if folder.parent.name == "custom_nodes":
        raise BenchError(f"the store {str(folder)!r} would be a folder in ComfyUI's custom_nodes, which ComfyUI "
                         "imports as a node pack at every start (IMPORT FAILED): give --out a folder elsewhere")
    return folder


def _report(options, say) -> int:
    from . import run as run_module
    from .report import report
    folder = options.report_store or options.out
    clip = options.report_clip or options.clip
    if clip:
        from .metrics import ClipError, ClipScorer
        from .store import STORE_FILE, Store
        if not (Path(folder).expanduser() / STORE_FILE).is_file():
            raise run_module.BenchError(f"no bench store in {folder}")
        try:
            scorer = ClipScorer(clip)
        except ClipError as error:
            raise run_module.BenchError(str(error)) from None
        store = Store(folder)
        try:
            run_module.score_missing(store, scorer, None, say)
        finally:
            store.close()
    try:
        report(folder, options.report_dir, options.sheet_seeds, options.max_sheets, say)
    except FileNotFoundError as error:
        raise run_module.BenchError(str(error)) from None
    return 0
