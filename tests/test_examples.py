"""The example workflows: converted from the editor's format by workflow_convert, then executed through
ComfyUI's PromptExecutor on the tiny models; and the converter itself on the cases it claims to handle."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from harness import PACK_DIR, pack_module
from PIL import Image

import folder_paths
import nodes

convert = pack_module("runner.workflow_convert")
EXAMPLES = PACK_DIR / "example_workflows"
STEPS, SIZE, MAX_REFINEMENT = 4, 128, 1


def load(name: str) -> dict:
    return json.loads((EXAMPLES / f"{name}.json").read_text())


class TinyControlNetLoader:
    """Test stand-in for ControlNetLoader: a tiny random ControlNet matching the tiny model family."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (["sd15", "sd2", "sdxl"],)}}

    RETURN_TYPES = ("CONTROL_NET",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, family):
        return (pack_module("runner.tiny_models").make_controlnet(family),)


@pytest.fixture
def host_dirs(tmp_path):
    """ComfyUI's input and output folders pointed at the test's own, restored afterwards."""
    saved = folder_paths.get_input_directory(), folder_paths.get_output_directory()
    (tmp_path / "input").mkdir()
    (tmp_path / "output").mkdir()
    folder_paths.set_input_directory(str(tmp_path / "input"))
    folder_paths.set_output_directory(str(tmp_path / "output"))
    yield tmp_path
    folder_paths.set_input_directory(saved[0])
    folder_paths.set_output_directory(saved[1])


def tiny_prompt(name: str, family: str) -> dict:
    """The example as the server would get it, made small: tiny models, STEPS steps, SIZE px, and test
    captures of the decoded image, the attention record and the visualiser pictures."""
    prompt = convert.to_api(load(name))
    for node_id, node in prompt.items():
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            prompt[node_id] = {"class_type": "TinyCheckpointLoader", "inputs": {"family": family, "seed": 0}}
        elif node["class_type"] == "ControlNetLoader":
            prompt[node_id] = {"class_type": "TinyControlNetLoader", "inputs": {"family": family}}
        elif node["class_type"] in ("EmptyLatentImage", "EmptySD3LatentImage"):
            inputs.update(width=SIZE, height=SIZE)
        elif node["class_type"] in ("AttnGuideKSampler", "BasicScheduler"):
            inputs["steps"] = STEPS
        elif node["class_type"] == "AttnGuideGuidance":
            inputs["max_refinement_steps"] = MAX_REFINEMENT
    nodes.NODE_CLASS_MAPPINGS.setdefault("TinyControlNetLoader", TinyControlNetLoader)
    sampler = next(i for i, n in prompt.items() if n["class_type"] in ("AttnGuideKSampler", "SamplerCustom"))
    attention = next([i, 1] if n["class_type"] == "AttnGuideKSampler" else [i, 0] for i, n in prompt.items()
                     if n["class_type"] in ("AttnGuideKSampler", "AttnGuideSamplerAttention"))
    decode = next(i for i, n in prompt.items() if n["class_type"] == "VAEDecode")
    prompt["90"] = {"class_type": "TestCapture", "inputs": {"label": "image", "value": [decode, 0]}}
    prompt["91"] = {"class_type": "TestCapture", "inputs": {"label": "attention", "value": attention}}
    prompt["92"] = {"class_type": "TestCapture", "inputs": {"label": "positive", "value": prompt[sampler]["inputs"][
        "positive"]}}
    for index, (node_id, node) in enumerate(sorted((i, n) for i, n in prompt.items()
                                                   if n["class_type"] == "AttnGuideVisualize")):
        prompt[f"8{index}"] = {"class_type": "TestCapture",
                               "inputs": {"label": f"visual:{node['inputs']['mode']}", "value": [node_id, 0]}}
    return prompt


def saved_pngs(output: Path) -> list[Path]:
    return sorted(output.rglob("*.png"))


# ---------------------------------------------------------------- the examples, executed

def test_attend_and_excite_example_runs(runner, host_dirs):
    out = runner.run(tiny_prompt("attend_and_excite_sd15", "sd15"))
    assert out["image"].shape == (1, SIZE, SIZE, 3)
    record = out["attention"]
    assert record.subjects.labels == ["cat", "frog"]
    assert record.steps == list(range(STEPS)) and record.resolution == (SIZE // 32, SIZE // 32)
    # A&E: guidance on the first half (steps 0, 1 of 4); refinement at round(0.2*4) = 1 and round(0.4*4) = 2
    # (step 2 is outside the guided range), at most MAX_REFINEMENT iterations each
    assert [entry.step for entry in record.losses] == [0, 1]
    assert set(record.losses[0].terms) == {"attend_and_excite"}
    assert all(0 < len(entry.refinement) <= MAX_REFINEMENT for entry in record.losses)
    assert all(0.0 < entry.total[0] <= 1.0 for entry in record.losses)
    # the visualisers: mean maps over the image (one picture per subject) and the loss plot
    assert out["visual:average"].shape == (2, SIZE, SIZE, 3)
    assert out["visual:loss plot"].shape[0] == 1 and out["visual:loss plot"].shape[-1] == 3
    (png,) = saved_pngs(host_dirs / "output")
    assert png.parent.name == "AttnGuide" and png.name.startswith("attend_and_excite")
    with Image.open(png) as picture:
        assert picture.size == (SIZE, SIZE)
        saved = np.asarray(picture.convert("RGB"))
        assert "prompt" in picture.info  # SaveImage embeds the prompt it ran
    expected = (out["image"][0].numpy() * 255.0).clip(0, 255).astype(np.uint8)
    assert np.array_equal(saved, expected)


def test_astar_sdxl_example_runs(runner, host_dirs):
    out = runner.run(tiny_prompt("astar_sdxl", "sdxl"))
    assert out["image"].shape == (1, SIZE, SIZE, 3)
    record = out["attention"]
    assert record.subjects.labels == ["cat", "dog"]
    assert record.resolution == (SIZE // 32, SIZE // 32)
    # A-STAR: the losses across the whole process (guidance_end 1.0), no A&E loss, no refinement
    assert [entry.step for entry in record.losses] == list(range(STEPS))
    assert "attend_and_excite" not in record.loss_names
    assert set(record.loss_names) == {"segregation", "retention"}
    assert all(entry.refinement == [] for entry in record.losses)
    assert "segregation" in record.losses[0].terms and "retention" in record.losses[-1].terms
    assert out["visual:overlap"].shape == (1, SIZE, SIZE, 3)
    assert out["visual:timeline"].ndim == 4 and out["visual:timeline"].shape[0] == 1
    assert len(saved_pngs(host_dirs / "output")) == 1


def test_controlnet_example_runs(runner, host_dirs):
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8) + 255 * (np.indices((SIZE, SIZE)).sum(0) % 64 < 3)[
        ..., None].astype(np.uint8)).save(host_dirs / "input" / "attn_guide_canny_edges.png")
    out = runner.run(tiny_prompt("attend_and_excite_controlnet_sd15", "sd15"))
    assert out["image"].shape == (1, SIZE, SIZE, 3)
    assert out["attention"].subjects.labels == ["cat", "frog"]
    assert [entry.step for entry in out["attention"].losses] == [0, 1]
    # the sampler got the ControlNet-applied conditioning, with the hint loaded from the input folder
    control = out["positive"][0][1]["control"]
    assert type(control).__name__ == "ControlNet"
    assert tuple(control.cond_hint_original.shape) == (1, 3, SIZE, SIZE)
    assert out["visual:average"].shape == (2, SIZE, SIZE, 3)


def test_sampler_custom_example_runs(runner, host_dirs):
    out = runner.run(tiny_prompt("attend_and_excite_sampler_custom_sd15", "sd15"))
    assert out["image"].shape == (1, SIZE, SIZE, 3)
    record = out["attention"]  # from Attention From Sampler: the Attention Sampler's run inside SamplerCustom
    assert record.subjects.labels == ["cat", "frog"]
    assert record.steps == list(range(STEPS))  # record_maps is on in the example
    assert [entry.step for entry in record.losses] == [0, 1]
    assert out["visual:average"].shape == (2, SIZE, SIZE, 3)
    assert [p.name for p in saved_pngs(host_dirs / "output")] == ["sampler_custom_00001_.png"]


def test_binding_example_runs(runner, host_dirs):
    out = runner.run(tiny_prompt("binding_sd15", "sd15"))
    assert out["image"].shape == (1, SIZE, SIZE, 3)
    record = out["attention"]
    # subject groups: the nouns are the subjects, each with its colour as attribute
    assert record.subjects.labels == ["red car", "blue bench"]
    assert [(owner, attribute.label) for owner, attribute in record.subjects.attributes] == [(0, "red"), (1, "blue")]
    # A&E's schedule (steps 0, 1 of 4, refinement capped), both losses on every guided step
    assert [entry.step for entry in record.losses] == [0, 1]
    assert all(set(entry.terms) == {"attend_and_excite", "syngen"} for entry in record.losses)
    assert all(0 < len(entry.refinement) <= MAX_REFINEMENT for entry in record.losses)
    for entry in record.losses:  # total = 1.0 * A&E + 1.0 * SynGen
        assert entry.total[0] == pytest.approx(entry.terms["attend_and_excite"][0] + entry.terms["syngen"][0],
                                               rel=1e-5, abs=1e-6)
    assert out["visual:average"].shape == (2, SIZE, SIZE, 3)
    assert out["visual:loss plot"].shape[0] == 1 and out["visual:loss plot"].shape[-1] == 3
    # the binding view: one picture, a row of three panels (noun, attribute, where they differ) per attribute
    count, height, width, channels = out["visual:binding"].shape
    assert (count, channels) == (1, 3) and width > height  # two rows of three
    (png,) = saved_pngs(host_dirs / "output")
    assert png.parent.name == "AttnGuide" and png.name.startswith("binding")


def test_attend_and_excite_flux_example_runs(runner, host_dirs):
    """Flux: T5 subjects, FluxGuidance on the positive, cfg 1, maps at the token grid (16 px a token)."""
    out = runner.run(tiny_prompt("attend_and_excite_flux", "flux"))
    assert out["image"].shape == (1, SIZE, SIZE, 3)
    record = out["attention"]
    assert record.subjects.labels == ["cat", "frog"] and record.subjects.segments[0].encoder == "t5"
    assert record.steps == list(range(STEPS)) and record.resolution == (SIZE // 16, SIZE // 16)
    assert [entry.step for entry in record.losses] == [0, 1]
    assert set(record.losses[0].terms) == {"attend_and_excite"}
    assert out["positive"][0][1]["guidance"] == 3.5
    assert out["visual:average"].shape == (2, SIZE, SIZE, 3)
    (png,) = saved_pngs(host_dirs / "output")
    assert png.name.startswith("attend_and_excite_flux")


def test_astar_sd35_example_runs(runner, host_dirs):
    """SD3.5 (the medium shape, MMDiT-X): segregation and retention on every step, subjects with CLIP and T5
    positions."""
    out = runner.run(tiny_prompt("astar_sd35", "sd35m"))
    assert out["image"].shape == (1, SIZE, SIZE, 3)
    record = out["attention"]
    assert record.subjects.labels == ["cat", "dog"]
    assert [segment.encoder for segment in record.subjects.segments] == ["clip", "t5"]
    assert all(len(s.token_positions) >= 2 for s in record.subjects.subjects)  # its CLIP token and T5 piece(s)
    assert record.resolution == (SIZE // 16, SIZE // 16)
    assert [entry.step for entry in record.losses] == list(range(STEPS))
    assert set(record.loss_names) == {"segregation", "retention"}
    assert out["visual:overlap"].shape == (1, SIZE, SIZE, 3)


def test_dit_example_settings():
    flux = {node["class_type"]: node["inputs"] for node in convert.to_api(load("attend_and_excite_flux")).values()}
    assert flux["CheckpointLoaderSimple"]["ckpt_name"] == "flux1-dev-fp8.safetensors"
    assert flux["FluxGuidance"]["guidance"] == 3.5 and flux["FluxGuidance"]["conditioning"] == ["2", 0]
    assert flux["AttnGuideKSampler"]["positive"] == ["12", 0]
    assert (flux["AttnGuideKSampler"]["cfg"], flux["AttnGuideKSampler"]["steps"]) == (1.0, 28)
    assert flux["EmptySD3LatentImage"] == {"width": 1024, "height": 1024, "batch_size": 1}
    assert flux["AttnGuideGuidance"]["attend_and_excite_weight"] == 1.0
    sd35 = {node["class_type"]: node["inputs"] for node in convert.to_api(load("astar_sd35")).values()}
    assert sd35["CheckpointLoaderSimple"]["ckpt_name"] == "sd3.5_large_fp8_scaled.safetensors"
    assert (sd35["AttnGuideKSampler"]["cfg"], sd35["AttnGuideKSampler"]["scheduler"]) == (4.5, "sgm_uniform")
    guidance = sd35["AttnGuideGuidance"]
    assert (guidance["segregation_weight"], guidance["retention_weight"], guidance["guidance_end"]) == (1.0, 1.0, 1.0)


# ---------------------------------------------------------------- the examples, as files

ALL_EXAMPLES = ["attend_and_excite_sd15", "astar_sdxl", "attend_and_excite_controlnet_sd15",
                "attend_and_excite_sampler_custom_sd15", "binding_sd15", "attend_and_excite_flux", "astar_sd35",
                "attend_and_excite_world"]


def test_every_example_is_tested():
    assert sorted(p.stem for p in EXAMPLES.glob("*.json")) == sorted(ALL_EXAMPLES)


@pytest.mark.parametrize("name", ALL_EXAMPLES)
def test_example_files_are_complete(name):
    workflow = load(name)
    assert workflow["version"] == 0.4
    thumbnail_path = EXAMPLES / f"{name}.jpg"  # same basename and .jpg: what the template browser asks for
    assert thumbnail_path.stat().st_size < 200_000
    with Image.open(thumbnail_path) as thumbnail:
        assert max(thumbnail.size) <= 1024
    ids = [node["id"] for node in workflow["nodes"]]
    assert len(ids) == len(set(ids)) and workflow["last_node_id"] == max(ids)
    assert workflow["last_link_id"] == max(link[0] for link in workflow["links"])
    for link_id, origin, origin_slot, target, target_slot, kind in workflow["links"]:
        source = next(n for n in workflow["nodes"] if n["id"] == origin)
        sink = next(n for n in workflow["nodes"] if n["id"] == target)
        assert link_id in source["outputs"][origin_slot]["links"]
        assert sink["inputs"][target_slot]["link"] == link_id and sink["inputs"][target_slot]["type"] == kind


def test_attend_and_excite_example_holds_the_paper_settings():
    prompt = convert.to_api(load("attend_and_excite_sd15"))
    by_type = {node["class_type"]: node["inputs"] for node in prompt.values()}
    assert by_type["CheckpointLoaderSimple"]["ckpt_name"] == "v1-5-pruned-emaonly.safetensors"
    assert by_type["AttnGuideTextEncode"] == {"text": "a cat and a frog", "subjects": "cat, frog", "clip": ["1", 1]}
    guidance = by_type["AttnGuideGuidance"]
    assert guidance["attend_and_excite_weight"] == 1.0 and guidance["segregation_weight"] == 0.0
    assert (guidance["scale_factor"], guidance["guidance_end"], guidance["softmax_temperature"],
            guidance["smoothing_sigma"], guidance["max_refinement_steps"]) == (20.0, 0.5, 100.0, 0.5, 20)
    assert pack_module("nodes.guidance").parse_refinement(guidance["refinement"]) == ((0.0, 0.05), (0.2, 0.5),
                                                                                      (0.4, 0.8))
    sampler = by_type["AttnGuideKSampler"]
    assert (sampler["seed"], sampler["steps"], sampler["cfg"]) == (42, 50, 7.5)  # the "fixed" control is skipped
    assert sampler["guidance"] == ["5", 0] and sampler["subjects"] == ["2", 1]
    assert by_type["EmptyLatentImage"] == {"width": 512, "height": 512, "batch_size": 1}
    assert "MarkdownNote" not in by_type


def test_astar_example_settings():
    prompt = convert.to_api(load("astar_sdxl"))
    by_type = {node["class_type"]: node["inputs"] for node in prompt.values()}
    guidance = by_type["AttnGuideGuidance"]
    assert (guidance["attend_and_excite_weight"], guidance["segregation_weight"], guidance["retention_weight"],
            guidance["guidance_end"], guidance["refinement"]) == (0.0, 1.0, 1.0, 1.0, "")
    assert by_type["EmptyLatentImage"]["width"] == by_type["EmptyLatentImage"]["height"] == 1024
    assert by_type["CheckpointLoaderSimple"]["ckpt_name"] == "sd_xl_base_1.0.safetensors"


def test_binding_example_settings():
    """The binding weights are optional inputs after the node's others (retention_mask last); the editor saves
    widget values by position, so this also checks that each value lands on its name."""
    prompt = convert.to_api(load("binding_sd15"))
    by_type = {node["class_type"]: node["inputs"] for node in prompt.values()}
    assert by_type["AttnGuideTextEncode"] == {"text": "a red car and a blue bench", "subjects": "red car, blue bench",
                                              "clip": ["1", 1]}
    guidance = by_type["AttnGuideGuidance"]
    weights = {name: value for name, value in guidance.items() if name.endswith("_weight")}
    assert weights == {"attend_and_excite_weight": 1.0, "segregation_weight": 0.0, "retention_weight": 0.0,
                       "attendance_weight": 0.0, "divide_and_bind_binding_weight": 0.0, "syngen_weight": 1.0,
                       "conform_weight": 0.0}
    assert (guidance["scale_factor"], guidance["guidance_end"], guidance["max_refinement_steps"],
            guidance["recompute_feedforward"], guidance["retention_mask"]) == (20.0, 0.5, 20, "auto", "half_max")
    assert by_type["CheckpointLoaderSimple"]["ckpt_name"] == "v1-5-pruned-emaonly.safetensors"
    assert by_type["EmptyLatentImage"] == {"width": 512, "height": 512, "batch_size": 1}
    assert (by_type["AttnGuideKSampler"]["steps"], by_type["AttnGuideKSampler"]["cfg"]) == (50, 7.5)


def test_controlnet_example_skips_the_upload_value():
    prompt = convert.to_api(load("attend_and_excite_controlnet_sd15"))
    by_type = {node["class_type"]: node["inputs"] for node in prompt.values()}
    assert by_type["LoadImage"] == {"image": "attn_guide_canny_edges.png"}  # widgets_values [name, "image"]
    assert by_type["ControlNetLoader"] == {"control_net_name": "control_v11p_sd15_canny.safetensors"}
    apply = by_type["ControlNetApplyAdvanced"]
    assert (apply["strength"], apply["start_percent"], apply["end_percent"]) == (0.8, 0.0, 1.0)
    assert apply["image"] == ["13", 0] and apply["vae"] == ["1", 2]


# ---------------------------------------------------------------- the converter on editor features

def _node(workflow, node_id):
    return next(n for n in workflow["nodes"] if n["id"] == node_id)


def _add_link(workflow, origin, origin_slot, target, target_slot, kind):
    link_id = workflow["last_link_id"] = workflow["last_link_id"] + 1
    workflow["links"].append([link_id, origin, origin_slot, target, target_slot, kind])
    _node(workflow, origin)["outputs"][origin_slot]["links"].append(link_id)
    return link_id


def test_primitive_reroute_and_converted_widget():
    workflow = copy.deepcopy(load("attend_and_excite_sd15"))
    # a PrimitiveNode drives the sampler's seed (a widget converted to an input)
    workflow["nodes"].append({"id": 50, "type": "PrimitiveNode", "mode": 0, "inputs": [],
                              "outputs": [{"name": "INT", "type": "INT", "widget": {"name": "seed"}, "links": []}],
                              "widgets_values": [1234, "randomize"]})
    sampler = _node(workflow, 6)
    sampler["inputs"].append({"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": None})
    sampler["inputs"][-1]["link"] = _add_link(workflow, 50, 0, 6, len(sampler["inputs"]) - 1, "INT")
    # a Reroute sits between the checkpoint's CLIP and the negative prompt
    negative = _node(workflow, 3)
    old = negative["inputs"][0]["link"]
    workflow["links"] = [link for link in workflow["links"] if link[0] != old]
    _node(workflow, 1)["outputs"][1]["links"].remove(old)
    workflow["nodes"].append({"id": 51, "type": "Reroute", "mode": 0,
                              "inputs": [{"name": "", "type": "*", "link": None}],
                              "outputs": [{"name": "", "type": "CLIP", "links": []}]})
    _node(workflow, 51)["inputs"][0]["link"] = _add_link(workflow, 1, 1, 51, 0, "CLIP")
    negative["inputs"][0]["link"] = _add_link(workflow, 51, 0, 3, 0, "CLIP")
    # the positive text comes from a converted text widget, linked to a primitive
    workflow["nodes"].append({"id": 52, "type": "PrimitiveNode", "mode": 0, "inputs": [],
                              "outputs": [{"name": "STRING", "type": "STRING", "widget": {"name": "text"},
                                           "links": []}], "widgets_values": ["a dog and a frog"]})
    positive = _node(workflow, 2)
    positive["inputs"].append({"name": "text", "type": "STRING", "widget": {"name": "text"}, "link": None})
    positive["inputs"][-1]["link"] = _add_link(workflow, 52, 0, 2, len(positive["inputs"]) - 1, "STRING")

    prompt = convert.to_api(workflow)
    assert prompt["6"]["inputs"]["seed"] == 1234 and prompt["6"]["inputs"]["steps"] == 50
    assert prompt["3"]["inputs"]["clip"] == ["1", 1]
    assert prompt["2"]["inputs"]["text"] == "a dog and a frog"
    assert not {"50", "51", "52"} & set(prompt)


def test_bypassed_and_muted_nodes():
    workflow = copy.deepcopy(load("attend_and_excite_controlnet_sd15"))
    _node(workflow, 14)["mode"] = 4  # bypass Apply ControlNet: the sampler gets the plain conditionings
    _node(workflow, 9)["mode"] = 2  # mute the visualiser
    prompt = convert.to_api(workflow)
    assert "14" not in prompt and "9" not in prompt
    assert prompt["6"]["inputs"]["positive"] == ["2", 0] and prompt["6"]["inputs"]["negative"] == ["3", 0]
    _node(workflow, 5)["mode"] = 2  # muted guidance: the optional input is left unconnected
    assert "guidance" not in convert.to_api(workflow)["6"]["inputs"]


def test_widgets_values_as_object_and_missing_values():
    workflow = copy.deepcopy(load("attend_and_excite_sd15"))
    _node(workflow, 4)["widgets_values"] = {"width": 640, "height": 384, "batch_size": 2}
    _node(workflow, 8)["widgets_values"] = []
    warnings = []
    prompt = convert.to_api(workflow, warnings=warnings)
    assert prompt["4"]["inputs"] == {"width": 640, "height": 384, "batch_size": 2}
    assert prompt["8"]["inputs"]["filename_prefix"] == "ComfyUI"  # SaveImage's default
    assert any("node 8" in w and "filename_prefix" in w for w in warnings)


def test_api_format_passes_through(tmp_path):
    prompt = convert.to_api(load("attend_and_excite_sd15"))
    path = tmp_path / "api.json"
    path.write_text(json.dumps(prompt))
    assert convert.load_prompt(path) == prompt
    assert convert.load_prompt(EXAMPLES / "attend_and_excite_sd15.json") == prompt


@pytest.mark.parametrize("edit, message", [
    (lambda w: _node(w, 6).update(type="NoSuchSampler"), "NoSuchSampler (node 6)"),
    (lambda w: _node(w, 6).update(widgets_values=["fixed", 42, 50, 7.5, "euler", "normal", 1.0, 0, True]),
     "does not fit widget 'seed' (INT)"),
    (lambda w: _node(w, 5)["widgets_values"].insert(0, "1.0"), "does not fit widget 'attend_and_excite_weight'"),
    (lambda w: w["links"].pop(0), "missing from the workflow's links table"),
    (lambda w: w.setdefault("definitions", {}).setdefault("subgraphs", []).append(
        {"id": "4f7c-sub", "name": "my group"}) or _node(w, 7).update(type="4f7c-sub"), "Unpack Subgraph"),
])
def test_conversion_errors_name_the_problem(edit, message):
    workflow = copy.deepcopy(load("attend_and_excite_sd15"))
    edit(workflow)
    with pytest.raises(convert.ConversionError) as error:
        convert.to_api(workflow)
    assert message in str(error.value)


def test_not_a_workflow(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"hello": 1}))
    with pytest.raises(convert.ConversionError, match="neither a UI-format workflow"):
        convert.load_prompt(path)
    with pytest.raises(convert.ConversionError, match="does not exist"):
        convert.load_prompt(tmp_path / "missing.json")


def test_install_templates_convert_like_the_editor():
    """A workflow the ComfyUI team saved with the editor (shipped with ComfyUI's templates package, if
    installed): PrimitiveNodes feeding converted widgets, seed controls, notes."""
    templates = pytest.importorskip("comfyui_workflow_templates_json")
    path = Path(templates.__file__).parent / "templates" / "sdxl_simple_example.json"
    if not path.is_file():
        pytest.skip("template sdxl_simple_example.json not shipped by this templates package")
    prompt = convert.to_api(json.loads(path.read_text()))
    samplers = sorted((n for n in prompt.values() if n["class_type"] == "KSamplerAdvanced"),
                      key=lambda n: n["inputs"]["start_at_step"])
    base, refiner = (s["inputs"] for s in samplers)
    assert base["steps"] == refiner["steps"] == 25           # one PrimitiveNode feeds both
    assert base["end_at_step"] == refiner["start_at_step"] == 20
    assert base["add_noise"] == "enable" and refiner["add_noise"] == "disable"
    assert isinstance(base["noise_seed"], int) and base["cfg"] == 8
    assert all(not isinstance(v, str) or v not in convert.CONTROL_VALUES for n in prompt.values()
               for v in n["inputs"].values())
