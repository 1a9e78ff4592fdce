"""Finding and booting the ComfyUI host from outside a running ComfyUI: the tests, the command line and the
benchmarks start here. Standard library only at import, so scripts outside the pack load it by file path
before the host exists (the pack's own command line imports it as `.host`).

The host is --comfyui DIR where given, else COMFYUI_PATH, else the ComfyUI whose custom_nodes/ holds the
pack, else ~/comfy/ComfyUI (comfy-cli's default workspace).
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent


class HostNotFound(RuntimeError):
    """No ComfyUI where we looked; the message lists the places and how to get one."""


def host_candidates(explicit: str | None = None) -> list[Path]:
    candidates = []
    if explicit:
        candidates.append(Path(explicit).expanduser())
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(Path(os.environ["COMFYUI_PATH"]).expanduser())
    if PACK_DIR.parent.name == "custom_nodes":
        candidates.append(PACK_DIR.parent.parent)
    candidates.append(Path.home() / "comfy" / "ComfyUI")
    return candidates


def find_host(explicit: str | None = None) -> Path:
    candidates = host_candidates(explicit)
    for candidate in candidates:
        if (candidate / "comfy" / "model_patcher.py").is_file():
            return candidate.resolve()
    raise HostNotFound(
        "no ComfyUI host found (looked at: " + ", ".join(str(c) for c in candidates) + "). Clone ComfyUI "
        "(https://github.com/Comfy-Org/ComfyUI), install its requirements into this Python, and set "
        "COMFYUI_PATH to it, or put this pack into ComfyUI/custom_nodes/.")


def pack_module_name() -> str:
    """The name ComfyUI's loader gives the pack's package (its path, dots replaced)."""
    return str(PACK_DIR).replace(".", "_x_")


def boot_host(host: Path, cpu: bool = True, torch_attention: bool = False, log_level: int | None = logging.WARNING,
              extra_nodes: bool = True, host_argv: tuple[str, ...] = ()) -> str:
    """Imports ComfyUI from `host` as its main.py does (device settings first, `utils` before `nodes`),
    loads the built-in extra nodes (SamplerCustomAdvanced, ...) and this pack through ComfyUI's own
    `load_custom_node`, and returns the pack's module name. A second call only returns the name.

    cpu: ComfyUI's --cpu (set before comfy.model_management is imported). torch_attention: its
    --use-pytorch-cross-attention (on the CPU its default is the slower sub-quadratic attention).
    host_argv: ComfyUI command-line options (e.g. --lowvram, --reserve-vram 20)."""
    name = pack_module_name()
    if name in sys.modules:
        return name
    if str(host) not in sys.path:
        sys.path.insert(0, str(host))
    saved_argv = sys.argv
    sys.argv = [sys.argv[0], *host_argv]  # ComfyUI parses the command line at import: give it none of ours
    try:
        from comfy.cli_args import args
    finally:
        sys.argv = saved_argv
    if cpu:
        args.cpu = True
    if torch_attention:
        args.use_pytorch_cross_attention = True
    if log_level is not None:
        logging.getLogger().setLevel(log_level)
    import utils  # noqa: F401  (ComfyUI's top-level utils package must come before nodes)
    import comfy.model_management  # noqa: F401

    import nodes
    if extra_nodes:
        asyncio.run(nodes.init_builtin_extra_nodes())
    if not asyncio.run(nodes.load_custom_node(str(PACK_DIR))) or name not in sys.modules:
        raise RuntimeError(f"ComfyUI failed to load the node pack at {PACK_DIR}")
    return name

