"""Test harness: a real ComfyUI host, the pack loaded the way ComfyUI loads custom nodes, tiny models.

The host is found through COMFYUI_PATH, else the ComfyUI whose custom_nodes/ holds this pack, else
~/comfy/ComfyUI (comfy-cli's default workspace).
"""
from __future__ import annotations

import asyncio
import importlib
import os
import sys
from pathlib import Path

import pytest

PACK_DIR = Path(__file__).resolve().parent.parent


def find_host() -> Path:
    candidates = []
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(Path(os.environ["COMFYUI_PATH"]).expanduser())
    if PACK_DIR.parent.name == "custom_nodes":
        candidates.append(PACK_DIR.parent.parent)
    candidates.append(Path.home() / "comfy" / "ComfyUI")
    for candidate in candidates:
        if (candidate / "comfy" / "model_patcher.py").is_file():
            return candidate.resolve()
    raise pytest.UsageError(
        "No ComfyUI host found (looked at: " + ", ".join(str(c) for c in candidates) + "). The tests run against a "
        "real ComfyUI: clone https://github.com/comfyanonymous/ComfyUI, install its requirements into this Python, "
        "and set COMFYUI_PATH to it (or clone this pack into ComfyUI/custom_nodes/).")


HOST = find_host()


def _boot_host():
    sys.path.insert(0, str(HOST))
    saved_argv = sys.argv
    sys.argv = [sys.argv[0]]  # ComfyUI parses the command line at import
    try:
        from comfy.cli_args import args
    finally:
        sys.argv = saved_argv
    args.cpu = True  # before comfy.model_management is imported
    import utils  # noqa: F401  (ComfyUI's top-level utils must come before nodes)
    import comfy.model_management  # noqa: F401
    import nodes
    module_name = str(PACK_DIR).replace(".", "_x_")
    if module_name not in sys.modules:
        assert asyncio.run(nodes.load_custom_node(str(PACK_DIR))), "ComfyUI failed to load the pack"
    return sys.modules[module_name], module_name


PACK, PACK_MODULE = _boot_host()


def pack_module(name: str):
    """A submodule of the pack as ComfyUI loaded it, e.g. pack_module('guidance.losses')."""
    return importlib.import_module(f"{PACK_MODULE}.{name}")


@pytest.fixture(scope="session")
def tiny():
    return pack_module("tiny_models")


@pytest.fixture(scope="session")
def sd15(tiny):
    return tiny.make_model("sd15"), tiny.make_clip("sd15")


@pytest.fixture(scope="session")
def sd2(tiny):
    return tiny.make_model("sd2"), tiny.make_clip("sd2")


@pytest.fixture(scope="session")
def sdxl(tiny):
    return tiny.make_model("sdxl"), tiny.make_clip("sdxl")


@pytest.fixture(scope="session")
def families(sd15, sd2, sdxl):
    return {"sd15": sd15, "sd2": sd2, "sdxl": sdxl}
