"""`python -m <pack> run`: the command-line runner, end to end in a subprocess, and its pieces in process."""
from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

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
        embedded, ran = json.loads(picture.info["workflow"]), json.loads(picture.info["prompt"])
    # the workflow as it ran (opens in the editor): the example with the overrides in its widgets; the demo's
    # model swap is in the prompt only, so the workflow keeps the real loader
    assert ran["1"]["class_type"] == cli.DEMO_CHECKPOINT
    expected = convert.to_api(json.loads(EXAMPLE.read_text()))
    expected["6"]["inputs"]["steps"] = 3
    expected["4"]["inputs"].update(width=128, height=128)
    expected["5"]["inputs"]["max_refinement_steps"] = cli.DEMO_MAX_REFINEMENT
    assert convert.to_api(embedded) == expected
    assert {k: v for k, v in embedded.items() if k != "nodes"} == {
        k: v for k, v in json.loads(EXAMPLE.read_text()).items() if k != "nodes"}
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
    assert len(said) == 4 and said[1] == cli.DEMO_BANNER
    sdxl = convert.to_api(json.loads((PACK_DIR / "example_workflows" / "astar_sdxl.json").read_text()))
    assert cli.apply_demo(sdxl, None, tmp_path, said.append) == "sdxl"
    assert cli.apply_demo(convert.to_api(workflow), "sd2", tmp_path, said.append) == "sd2"


@pytest.mark.parametrize("name, family", [
    ("v1-5-pruned-emaonly.safetensors", "sd15"), ("sd_xl_base_1.0.safetensors", "sdxl"),
    ("v2-1_768-ema-pruned.safetensors", "sd2"), ("sd2.1/512-base-ema.ckpt", "sd2"),
    ("dreamshaper_8.safetensors", "sd15"), ("juggernautXL_v9.safetensors", "sdxl"),
    ("flux1-dev-fp8.safetensors", "flux"), ("flux1-schnell.safetensors", "flux_schnell"),
    ("sd3.5_large_fp8_scaled.safetensors", "sd35m"), ("sd3_medium_incl_clips.safetensors", "sd3"),
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


# ---------------------------------------------------------------- what `run` accepts, and how it fails

def _png_with(path, **texts):
    """A picture with text chunks, as ComfyUI's SaveImage writes them (PngInfo.add_text)."""
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    for key, value in texts.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    Image.new("RGB", (16, 16), "gray").save(path, pnginfo=info)
    return path


def _bad_subject_workflow():
    workflow = json.loads(EXAMPLE.read_text())
    next(n for n in workflow["nodes"] if n["type"] == "AttnGuideTextEncode")["widgets_values"][1] = "cat, dog"
    return workflow


def test_a_folder_runs_each_workflow_in_it_pngs_included(tmp_path):
    """A folder: its workflow JSON files and the PNGs that hold one run in name order, each into its own
    subfolder; a picture without a workflow is skipped with a note; a failing workflow is reported by the
    node's message, once, without ComfyUI's traceback, and the others still run (the ControlNet one after
    the others: its Load Image lists ComfyUI's input folder, which each demo run sets and restores)."""
    folder = tmp_path / "workflows"
    folder.mkdir()
    example = json.loads(EXAMPLE.read_text())
    _png_with(folder / "a_shared.png", workflow=example, prompt=convert.to_api(example))
    (folder / "b_bad_subject.json").write_text(json.dumps(_bad_subject_workflow()))
    _png_with(folder / "c_thumbnail.png")
    (folder / "notes.txt").write_text("not a workflow")
    controlnet = PACK_DIR / "example_workflows" / "attend_and_excite_controlnet_sd15.json"
    (folder / "d_controlnet.json").write_text(controlnet.read_text())
    out = tmp_path / "out"
    result = _run_cli("run", str(folder), "--demo", "--out", str(out), "--steps", "2", "--size", "64")
    _check_started(result)
    log = result.stdout + result.stderr
    assert result.returncode == 1, log
    assert "3 workflow(s): a_shared.png, b_bad_subject.json, d_controlnet.json" in result.stdout
    assert "note: skipping c_thumbnail.png: the PNG" in result.stdout and "holds no workflow" in result.stdout
    assert "workflow: a_shared.png (10 nodes, UI format, the PNG's embedded workflow)" in result.stdout
    saved = out / "a_shared" / "AttnGuide" / "attend_and_excite_00001_.png"
    with Image.open(saved) as picture:
        assert picture.size == (64, 64)
        assert convert.to_api(json.loads(picture.info["workflow"]))["6"]["inputs"]["steps"] == 2
    assert (out / "a_shared" / "attention_10_loss_plot_00.png").is_file()
    assert log.count("subject 'dog' is not in the prompt") == 1, log
    assert "error: b_bad_subject.json: node 2 (AttnGuideTextEncode 'Positive prompt + subjects') failed: " \
           "Attention Text Encode: subject 'dog'" in result.stderr
    assert "Traceback" not in log and "!!! Exception" not in log
    assert "--verbose" in result.stderr
    assert "1 of 3 workflows failed: b_bad_subject.json" in result.stderr
    assert not (out / "b_bad_subject" / "AttnGuide").exists()
    assert (out / "d_controlnet" / "AttnGuide" / "controlnet_00001_.png").is_file(), log


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.json", "'{path}' does not exist"),
    (lambda d: (d / "x.json").write_bytes(b"\xff\xfe\x00binary") and d / "x.json",
     "is neither a workflow JSON file nor a PNG with an embedded workflow"),
    (lambda d: _png_with(d / "thumb.png", parameters="a cat"),
     "holds no workflow: ComfyUI embeds one (text chunks 'workflow' and 'prompt') in the pictures it saves"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "the folder '{path}' holds no workflow"),
    (lambda d: (d / "x.json").write_text('{"a": 1}') and d / "x.json", "is neither a UI-format workflow"),
])
def test_a_wrong_input_is_said_before_comfyui_boots(tmp_path, make, message):
    path = make(tmp_path)
    result = _run_cli("run", str(path), "--demo", timeout=120)
    _check_started(result)
    assert result.returncode == 1
    assert message.format(path=path) in result.stderr, result.stderr
    assert "ComfyUI:" not in result.stdout and "device:" not in result.stdout  # the host was not booted
    assert "Traceback" not in result.stderr


def test_convert_reads_its_input_before_booting_too(tmp_path):
    result = _run_cli("convert", str(_png_with(tmp_path / "thumb.png")), timeout=120)
    assert result.returncode == 1 and "holds no workflow" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_out_in_custom_nodes_is_refused_before_booting(tmp_path):
    """ComfyUI imports every folder of custom_nodes/ as a node pack: an output folder there fails at each start."""
    target = HOST / "custom_nodes" / "attn_guide_test_out"
    result = _run_cli("run", str(EXAMPLE), "--demo", "--out", str(target), timeout=120)
    assert result.returncode == 1 and "is in ComfyUI's custom_nodes folder" in result.stderr, result.stderr
    assert "device:" not in result.stdout and not target.exists()
    with pytest.raises(cli.CliError, match="custom_nodes folder"):
        cli.refuse_custom_nodes_out((HOST / "custom_nodes" / "out").resolve(), HOST)
    cli.refuse_custom_nodes_out((HOST / "output" / "mine").resolve(), HOST)
    cli.refuse_custom_nodes_out((HOST / "custom_nodes" / "x" / "out").resolve(), HOST)


def test_default_output_is_in_comfyuis_output_folder():
    assert cli.default_out_dir() == Path(folder_paths.get_output_directory()).resolve() / cli.DEFAULT_OUT_FOLDER
    assert cli.build_parser().parse_args(["run", "w.json"]).out is None


def test_png_workflow_chunks_of_every_kind(tmp_path):
    """tEXt (ComfyUI's), zTXt and iTXt (non-Latin-1 text) chunks; the editor's graph before the prompt."""
    from PIL.PngImagePlugin import PngInfo
    workflow = json.loads(EXAMPLE.read_text())
    next(n for n in workflow["nodes"] if n["id"] == 1)["title"] = "modèle ☕"  # not Latin-1: Pillow writes iTXt
    prompt = convert.to_api(json.loads(EXAMPLE.read_text()))
    info = PngInfo()
    info.add_text("prompt", json.dumps(prompt), zip=True)
    info.add_text("workflow", json.dumps(workflow, ensure_ascii=False))
    Image.new("RGB", (8, 8)).save(tmp_path / "both.png", pnginfo=info)
    source = convert.read_workflow(tmp_path / "both.png")
    assert source.data == workflow and source.alternative == prompt and source.format == "UI"
    assert source.origin == "the PNG's embedded workflow"
    assert convert.load_prompt(tmp_path / "both.png")["1"]["_meta"]["title"] == "modèle ☕"
    only_prompt = convert.read_workflow(_png_with(tmp_path / "prompt.png", prompt=prompt))
    assert only_prompt.format == "API" and only_prompt.data == prompt
    assert convert.source_prompt(only_prompt) == (prompt, None)


def test_an_unconvertible_png_workflow_gives_way_to_its_prompt(tmp_path):
    workflow = json.loads(EXAMPLE.read_text())
    next(n for n in workflow["nodes"] if n["id"] == 7)["type"] = "SomePackNode"
    prompt = convert.to_api(json.loads(EXAMPLE.read_text()))
    source = convert.read_workflow(_png_with(tmp_path / "p.png", workflow=workflow, prompt=prompt))
    warnings = []
    assert convert.source_prompt(source, warnings=warnings) == (prompt, None)
    assert "running its embedded prompt" in warnings[0] and "SomePackNode" in warnings[0]
    with pytest.raises(convert.ConversionError, match="SomePackNode"):
        convert.load_prompt(_png_with(tmp_path / "w.png", workflow=workflow))


@pytest.mark.parametrize("name", sorted(p.name for p in (PACK_DIR / "example_workflows").glob("*.json")))
def test_the_embedded_workflow_converts_to_the_prompt_that_ran(name):
    workflow = json.loads((PACK_DIR / "example_workflows" / name).read_text())
    prompt = convert.to_api(workflow)
    before = copy.deepcopy(prompt)
    options = _options(steps=3, size=(64, 128), seed=11,
                       max_refinement=1 if any(n["class_type"] == cli.GUIDANCE for n in prompt.values()) else None)
    cli.apply_overrides(prompt, options, lambda _: None)
    changes = cli._changed_widgets(before, prompt)
    assert changes and all(not isinstance(v, list) for values in changes.values() for v in values.values())
    ran = convert.set_widget_values(workflow, changes)
    assert convert.to_api(ran) == prompt
    assert convert.to_api(workflow) == before  # the input is not changed


def test_written_values_reach_primitives_and_missing_slots():
    workflow = json.loads(EXAMPLE.read_text())
    sampler = next(n for n in workflow["nodes"] if n["id"] == 6)
    # the sampler's seed converted to an input, fed by a PrimitiveNode through a Reroute
    workflow["nodes"] += [
        {"id": 98, "type": "Reroute", "inputs": [{"name": "", "type": "*", "link": 98}],
         "outputs": [{"name": "", "type": "INT", "links": [99]}], "mode": 0},
        {"id": 97, "type": "PrimitiveNode", "outputs": [{"name": "INT", "type": "INT", "links": [98]}],
         "widgets_values": [123, "fixed"], "mode": 0}]
    workflow["links"] += [[98, 97, 0, 98, 0, "INT"], [99, 98, 0, 6, len(sampler["inputs"]), "INT"]]
    sampler["inputs"].append({"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": 99})
    assert convert.to_api(workflow)["6"]["inputs"]["seed"] == 123
    guidance = next(n for n in workflow["nodes"] if n["id"] == 5)
    stored = len(guidance["widgets_values"])
    ran = convert.set_widget_values(workflow, {"6": {"seed": 5, "steps": 2}, "5": {"conform_weight": 0.25}})
    assert next(n for n in ran["nodes"] if n["id"] == 97)["widgets_values"] == [5, "fixed"]
    prompt = convert.to_api(ran)
    assert (prompt["6"]["inputs"]["seed"], prompt["6"]["inputs"]["steps"]) == (5, 2)
    assert prompt["5"]["inputs"]["conform_weight"] == 0.25  # after values the workflow had not stored
    assert len(next(n for n in ran["nodes"] if n["id"] == 5)["widgets_values"]) > stored
    as_object = copy.deepcopy(workflow)
    next(n for n in as_object["nodes"] if n["id"] == 4)["widgets_values"] = {"width": 512, "height": 512,
                                                                            "batch_size": 1}
    ran = convert.set_widget_values(as_object, {"4": {"width": 320}, "404": {"x": 1}})
    assert convert.to_api(ran)["4"]["inputs"] == {"width": 320, "height": 512, "batch_size": 1}


def test_comfyuis_report_of_a_failed_node_is_left_out():
    def record(message, level=logging.ERROR, path="/host/execution.py"):
        return logging.LogRecord("root", level, path, 1, message, None, None)
    quiet = cli._QuietNodeErrors()
    assert not quiet.filter(record("!!! Exception during processing !!! subject 'dog' is not in the prompt"))
    assert not quiet.filter(record("Traceback (most recent call last):\n  File ..."))
    assert quiet.filter(record("Got an OOM, unloading all loaded models."))
    assert quiet.filter(record("Traceback (most recent call last):", path="/host/other.py"))
    assert quiet.filter(record("!!! Exception during processing !!!", level=logging.WARNING))
    prompt = {"2": {"class_type": "AttnGuideTextEncode", "inputs": {}, "_meta": {"title": "Positive"}}}
    error = {"node_id": "2", "node_type": "AttnGuideTextEncode", "exception_message": "subject 'dog' ...\n",
             "exception_type": "ValueError"}
    assert cli._node_failure(error, prompt, verbose=True) == \
        "node 2 (AttnGuideTextEncode 'Positive') failed: subject 'dog' ..."
    shape = dict(error, exception_message="shapes do not match", exception_type="RuntimeError")
    assert "failed: RuntimeError: shapes do not match\n  (run with --verbose" in cli._node_failure(shape, prompt, False)
