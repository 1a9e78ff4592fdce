"""`python -m <pack> run`: the command-line runner, end to end in a subprocess, and its pieces in process."""
from __future__ import annotations

import asyncio
import copy
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from harness import HOST, PACK_DIR, pack_module
from PIL import Image

import folder_paths

cli = pack_module("runner.cli")
convert = pack_module("runner.workflow_convert")
EXAMPLE = PACK_DIR / "example_workflows" / "attend_and_excite_sd15.json"


def _run_cli(*args, timeout=600):
    env = dict(os.environ, COMFYUI_PATH=str(HOST), PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", PACK_DIR.name, *args], cwd=PACK_DIR.parent, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _check_started(result):
    """`python -m <pack>` imports the package's __init__.py before __main__.py, with ComfyUI not yet on
    sys.path: __init__.py must not import ComfyUI at module level (cli.py boots the host first)."""
    if result.returncode != 0 and "No module named 'comfy" in result.stderr:
        pytest.fail("python -m <pack> failed while importing the package: its __init__.py imports ComfyUI at "
                    "module level, before the command line can boot the host. Make those imports lazy (inside "
                    "comfy_entrypoint) or guard them.\n" + result.stderr[-2000:])


def test_run_demo_writes_images_and_attention_maps(tmp_path):
    out = tmp_path / "out"
    workflow = f"{PACK_DIR.name}/example_workflows/{EXAMPLE.name}"  # relative to the pack's parent, the cwd
    result = _run_cli("run", workflow, "--demo", "--out", str(out), "--steps", "3", "--size", "128")
    _check_started(result)
    assert result.returncode == 0, result.stdout + result.stderr
    log = result.stdout
    assert log.count("RANDOM WEIGHTS") == 2  # said at the start and again under the list of files
    assert "node 1 CheckpointLoaderSimple ('v1-5-pruned-emaonly.safetensors') -> tiny random sd15 model" in log
    assert "[10/10] node" in log and "node 6: AttnGuideKSampler" in log  # per-node progress
    assert "] 3/3" in log  # the sampler's step progress
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == ["AttnGuide/attend_and_excite_00001_.png", "attention_10_loss_plot_00.png",
                       "attention_9_average_00.png", "attention_9_average_01.png"]
    for name in written:
        assert f"{out / name}" in log
    with Image.open(out / written[0]) as picture:
        assert picture.size == (128, 128)
        assert json.loads(picture.info["workflow"]) == json.loads(EXAMPLE.read_text())  # opens in the editor
        assert json.loads(picture.info["prompt"])["1"]["class_type"] == cli.DEMO_CHECKPOINT
    for name in written[2:]:  # one heat map per subject, over the decoded picture
        with Image.open(out / name) as picture:
            assert picture.size == (128, 128)
            assert len(np.unique(np.asarray(picture.convert("RGB")).reshape(-1, 3), axis=0)) > 50
    with Image.open(out / written[1]) as plot:
        assert plot.size[0] > plot.size[1] > 200


def test_help_needs_no_host():
    result = _run_cli("run", "--help", timeout=120)
    _check_started(result)
    assert result.returncode == 0, result.stderr
    assert "--demo" in result.stdout and "--ckpt" in result.stdout and "--steps" in result.stdout
    assert f"python -m {PACK_DIR.name} run" in result.stdout


# ---------------------------------------------------------------- pieces, in process

def _options(**values):
    defaults = dict(ckpt=None, demo=False, steps=None, size=None, seed=None, max_refinement=None)
    return types.SimpleNamespace(**{**defaults, **values})


def test_overrides_reach_every_matching_widget():
    prompt = convert.to_api(json.loads(EXAMPLE.read_text()))
    said = []
    cli.apply_overrides(prompt, _options(steps=7, size=(192, 128), seed=5, max_refinement=3), said.append)
    assert prompt["6"]["inputs"]["steps"] == 7 and prompt["6"]["inputs"]["seed"] == 5
    assert (prompt["4"]["inputs"]["width"], prompt["4"]["inputs"]["height"]) == (192, 128)
    assert prompt["5"]["inputs"]["max_refinement_steps"] == 3
    assert said == ["  steps: 7", "  size: 192x128", "  max_refinement_steps: 3", "  seed: 5"]
    linked = copy.deepcopy(prompt)
    linked["6"]["inputs"]["steps"] = ["99", 0]  # a linked input is left alone
    with pytest.raises(cli.CliError, match="no node of the workflow has a 'steps' widget"):
        cli.apply_overrides(linked, _options(steps=3), said.append)


def test_checkpoint_override_registers_the_file(tmp_path):
    checkpoint = tmp_path / "my_model.safetensors"
    checkpoint.write_bytes(b"not really a model")
    prompt = convert.to_api(json.loads(EXAMPLE.read_text()))
    saved = copy.deepcopy(folder_paths.folder_names_and_paths["checkpoints"])
    try:
        assert cli.override_checkpoint(prompt, str(checkpoint)) == "my_model.safetensors"
        assert prompt["1"]["inputs"]["ckpt_name"] == "my_model.safetensors"
        assert folder_paths.get_full_path("checkpoints", "my_model.safetensors") == str(checkpoint)
        with pytest.raises(cli.CliError, match="neither a file nor a checkpoint ComfyUI knows"):
            cli.override_checkpoint(prompt, "no_such_model.safetensors")
    finally:
        folder_paths.folder_names_and_paths["checkpoints"] = saved
        folder_paths.filename_list_cache.pop("checkpoints", None)


def test_missing_checkpoint_is_explained():
    """Without --demo the example needs the real SD1.5 file; ComfyUI's validation says so and the CLI
    says what to do."""
    import execution
    prompt = convert.to_api(json.loads(EXAMPLE.read_text()))
    prompt["1"]["inputs"]["ckpt_name"] = "surely_not_installed.safetensors"
    valid = asyncio.run(execution.validate_prompt("cli-test", prompt, None))
    assert not valid[0]
    message = cli._format_validation(valid[1], valid[3], prompt, demo=False)
    assert "node 1 (CheckpointLoaderSimple)" in message and "surely_not_installed" in message
    assert "--ckpt FILE" in message and "--demo" in message


def test_demo_swaps_loaders_and_makes_pictures(tmp_path):
    workflow = json.loads((PACK_DIR / "example_workflows" / "attend_and_excite_controlnet_sd15.json").read_text())
    prompt = convert.to_api(workflow)
    said = []
    assert cli.apply_demo(prompt, None, tmp_path, said.append) == "sd15"
    kinds = {node_id: node["class_type"] for node_id, node in prompt.items()}
    assert kinds["1"] == cli.DEMO_CHECKPOINT and prompt["1"]["inputs"] == {"family": "sd15", "seed": 0}
    assert kinds["12"] == cli.DEMO_CONTROLNET
    with Image.open(tmp_path / "attn_guide_canny_edges.png") as picture:
        assert picture.size == (512, 512)
        assert set(np.unique(np.asarray(picture.convert("L")))) >= {0, 255}
    assert len(said) == 3
    sdxl = convert.to_api(json.loads((PACK_DIR / "example_workflows" / "astar_sdxl.json").read_text()))
    assert cli.apply_demo(sdxl, None, tmp_path, said.append) == "sdxl"
    assert cli.apply_demo(convert.to_api(workflow), "sd2", tmp_path, said.append) == "sd2"


@pytest.mark.parametrize("name, family", [
    ("v1-5-pruned-emaonly.safetensors", "sd15"), ("sd_xl_base_1.0.safetensors", "sdxl"),
    ("v2-1_768-ema-pruned.safetensors", "sd2"), ("sd2.1/512-base-ema.ckpt", "sd2"),
    ("dreamshaper_8.safetensors", "sd15"), ("juggernautXL_v9.safetensors", "sdxl"),
])
def test_family_guess(name, family):
    assert cli.guess_family(name) == family


def test_size_argument():
    assert cli._parse_size("256") == (256, 256) and cli._parse_size("512x768") == (512, 768)
    for bad in ("250", "12x12", "big"):
        with pytest.raises(Exception, match="size"):
            cli._parse_size(bad)


def test_progress_in_a_log_is_a_line_per_tenth():
    import io
    stream = io.StringIO()
    hook = cli._progress_hook(stream)
    for value in range(1, 51):
        hook(value, 50, node_id="6")
    hook(50, 50, node_id="6")  # ComfyUI may report the end twice
    for value in range(1, 4):
        hook(value, 3, node_id="7")
    lines = stream.getvalue().splitlines()
    assert lines[-1].endswith("] 3/3") and lines[-4].endswith("] 50/50")
    assert [line.split()[-1] for line in lines[:-3]] == ["1/50"] + [f"{5 * k}/50" for k in range(1, 11)]
