"""Registry readiness: stable prefixed node ids, tooltips, help pages, [tool.comfy], no eval/exec, ruff."""
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
from harness import PACK, PACK_DIR

EXPECTED_IDS = {"AttnGuideTextEncode", "AttnGuideGuidance", "AttnGuideKSampler", "AttnGuideSampler",
                "AttnGuideSamplerAttention", "AttnGuideVisualize", "AttnGuideInitNO", "AttnGuideMetrics"}


def _schemas():
    import asyncio
    extension = asyncio.run(PACK.comfy_entrypoint())
    return [node.define_schema() for node in asyncio.run(extension.get_node_list())]


def test_node_ids_are_prefixed_and_stable():
    ids = {schema.node_id for schema in _schemas()}
    # saved workflows reference these ids: removing or renaming one breaks them
    assert EXPECTED_IDS <= ids
    for schema in _schemas():
        assert schema.node_id.startswith("AttnGuide")
        assert "(AttnGuide)" in schema.display_name


def test_every_input_has_a_tooltip_and_every_node_a_help_page():
    for schema in _schemas():
        for item in schema.inputs:
            assert item.tooltip, f"{schema.node_id}.{item.id} has no tooltip"
        assert (PACK_DIR / "web" / "docs" / schema.node_id / "en.md").is_file(), f"no help page for {schema.node_id}"


def test_pyproject_is_registry_ready():
    data = tomllib.loads((PACK_DIR / "pyproject.toml").read_text())
    comfy = data["tool"]["comfy"]
    for key in ("PublisherId", "DisplayName", "Icon", "requires-comfyui"):
        assert comfy.get(key), key
    assert (PACK_DIR / "web" / "icon.png").is_file()
    assert data["project"]["name"] and data["project"]["version"]
    requirements = (PACK_DIR / "requirements.txt").read_text()
    assert not re.search(r"^\s*torch", requirements, re.M)


def test_no_eval_or_exec_and_no_machine_paths():
    for path in PACK_DIR.rglob("*.py"):
        if any(part.startswith(".") for part in path.relative_to(PACK_DIR).parts):
            continue
        text = path.read_text()
        assert not re.search(r"(?<![\w.])(eval|exec)\(", text), f"eval/exec in {path}"
        for machine_path in ("/" + "root/", "/" + "work/"):  # split so that this file does not match itself
            assert machine_path not in text, f"machine path {machine_path!r} in {path}"


@pytest.mark.skipif(shutil.which("ruff") is None and subprocess.run([sys.executable, "-m", "ruff", "--version"],
                    capture_output=True).returncode != 0, reason="ruff is not installed (requirements-test.txt)")
def test_ruff_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", str(PACK_DIR)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
