"""Test harness (shared by conftest.py and the tests): a real ComfyUI host, the pack loaded the way ComfyUI loads custom nodes, tiny models.

The host is found through COMFYUI_PATH, else the ComfyUI whose custom_nodes/ holds this pack, else
~/comfy/ComfyUI (comfy-cli's default workspace).
"""
from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

PACK_DIR = Path(__file__).resolve().parent.parent


_spec = importlib.util.spec_from_file_location("attn_guide_host", PACK_DIR / "runner" / "host.py")  # before the host exists
_host = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_host)


def find_host() -> Path:
    try:
        return _host.find_host()
    except _host.HostNotFound as error:
        raise pytest.UsageError(f"The tests run against a real ComfyUI, and there is {error}") from None


HOST = find_host()
PACK_MODULE = _host.boot_host(HOST, cpu=True, log_level=None)
PACK = sys.modules[PACK_MODULE]


def run_node(node_class, **inputs):
    """The outputs of one of ComfyUI's nodes, called as the executor calls it, whether the host defines it as a
    V3 node (classmethod execute) or a V1 node (FUNCTION): nodes moved between the two across host versions."""
    if hasattr(node_class, "execute") and not hasattr(node_class, "FUNCTION"):
        return tuple(node_class.execute(**inputs).args)
    return tuple(getattr(node_class(), node_class.FUNCTION)(**inputs))


def pack_module(name: str):
    """A submodule of the pack as ComfyUI loaded it, e.g. pack_module('guidance.losses')."""
    return importlib.import_module(f"{PACK_MODULE}.{name}")


@pytest.fixture(scope="session")
def tiny():
    return pack_module("runner.tiny_models")


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
def sd3(tiny):
    """The tiny SD3-medium-shaped MMDiT and its CLIP-L + CLIP-G + T5 text encoder."""
    return tiny.make_model("sd3"), tiny.make_clip("sd3")


@pytest.fixture(scope="session")
def flux(tiny):
    """The tiny Flux.1-dev-shaped model (guidance embedding) and its CLIP-L + T5 text encoder."""
    return tiny.make_model("flux"), tiny.make_clip("flux")


@pytest.fixture(scope="session")
def families(sd15, sd2, sdxl):
    return {"sd15": sd15, "sd2": sd2, "sdxl": sdxl}


# ---------------------------------------------------------------- whole workflows through ComfyUI's executor

class _HeadlessServer:
    """What PromptExecutor needs of a server when no web server runs: a place to send messages."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


CAPTURED: dict = {}  # what the TestCapture node saw, by label


# Test loader: the tiny random model of a family, as CheckpointLoaderSimple would return it (the command
# line's --demo loader).
TinyCheckpointLoader = pack_module("runner.cli").DemoCheckpointLoader


class TestCapture:
    """Test output node: keeps whatever it is given, by label, for the test to inspect."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"label": ("STRING", {"default": "out"})},
                "optional": {"value": ("*",), "model": ("MODEL",)}}

    @classmethod
    def VALIDATE_INPUTS(cls, input_types):
        return True

    RETURN_TYPES = ()
    FUNCTION = "keep"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def keep(self, label, value=None, model=None):
        CAPTURED[label] = value if value is not None else model
        return {}


def _register_test_nodes():
    import nodes
    nodes.NODE_CLASS_MAPPINGS.setdefault("TinyCheckpointLoader", TinyCheckpointLoader)
    nodes.NODE_CLASS_MAPPINGS.setdefault("TestCapture", TestCapture)


class WorkflowRunner:
    """Runs API-format prompts through ComfyUI's own PromptExecutor (validation included).

    No output cache: every queued prompt executes every node, as a changed input would force."""

    def __init__(self):
        _register_test_nodes()
        self.server = _HeadlessServer()
        self.executor = None
        self.last_executor = None  # the executor of the last run (its history_result has the UI outputs)
        self._count = 0

    def _executor(self):
        import execution
        none = getattr(execution.CacheType, "NONE", None)
        if none is None:  # ComfyUI 0.3.x has no cache-less executor: a new one per prompt starts empty
            return execution.PromptExecutor(self.server)
        if self.executor is None:
            self.executor = execution.PromptExecutor(self.server, cache_type=none,
                                                     cache_args={"lru": 0, "ram": 0.0, "ram_inactive": 0.0})
        return self.executor

    def run(self, prompt: dict) -> dict:
        import execution
        self._count += 1
        prompt_id = f"test-{self._count}"
        valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not valid[0]:
            raise AssertionError(f"prompt failed validation: {valid[1]} {valid[3]}")
        CAPTURED.clear()
        executor = self.last_executor = self._executor()
        executor.execute(prompt, prompt_id, {}, valid[2])
        if not executor.success:
            errors = [d for e, d in executor.status_messages if e == "execution_error"]
            raise WorkflowError(errors[0] if errors else executor.status_messages)
        return dict(CAPTURED)


class WorkflowError(Exception):
    @property
    def message(self) -> str:
        detail = self.args[0]
        return detail.get("exception_message", str(detail)) if isinstance(detail, dict) else str(detail)


@pytest.fixture(scope="session")
def runner():
    return WorkflowRunner()


# ---------------------------------------------------------------- real ComfyUI servers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read() or b"null")


class Server:
    """ComfyUI's main.py on a free loopback port, with a private base directory; the pack and `extra_nodes`
    come in through an extra_model_paths YAML's custom_nodes entry, `checkpoints` (a folder) through its
    checkpoints entry."""

    def __init__(self, root: Path, with_pack: bool = True, extra_nodes=(), checkpoints: Path | None = None):
        self.root = root
        nodes_dir = root / "extra" / "custom_nodes"
        nodes_dir.mkdir(parents=True)
        if with_pack:
            (nodes_dir / "comfyui-attention-guidance").symlink_to(PACK_DIR, target_is_directory=True)
        for folder in extra_nodes:
            (nodes_dir / Path(folder).name).symlink_to(folder, target_is_directory=True)
        config = root / "extra_model_paths.yaml"
        config.write_text(f"attn_guide_test:\n  base_path: {json.dumps(str(root / 'extra'))}\n"
                          "  custom_nodes: custom_nodes\n"
                          + (f"  checkpoints: {json.dumps(str(checkpoints))}\n" if checkpoints else ""))
        (root / "base" / "custom_nodes").mkdir(parents=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = root / "server.log"
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(self.port), "--cpu",
             "--base-directory", str(root / "base"), "--extra-model-paths-config", str(config),
             "--database-url", "sqlite:///:memory:", "--disable-auto-launch", "--disable-api-nodes"],
            cwd=HOST, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=dict(os.environ, OMP_NUM_THREADS="1"))

    def wait(self, node: str, timeout: float = 180) -> "Server":
        deadline = time.monotonic() + timeout
        while True:
            try:
                if node in get_json(f"{self.url}/object_info/{node}"):
                    return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ComfyUI did not come up (exit code {self.process.poll()}):\n"
                            + self.log_path.read_text()[-4000:])
            time.sleep(0.3)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
