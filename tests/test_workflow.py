"""Whole workflows (API format) through ComfyUI's PromptExecutor, the pack loaded as ComfyUI loads it."""
import gc

import pytest
import torch
from harness import WorkflowError, pack_module


def _workflow(family="sd15", sampler="euler", subjects="cat, frog", guidance=False, steps=4, size=256,
              text="a cat and a frog", batch=1):
    prompt = {
        "1": {"class_type": "TinyCheckpointLoader", "inputs": {"family": family, "seed": 0}},
        "2": {"class_type": "AttnGuideTextEncode", "inputs": {"clip": ["1", 1], "text": text, "subjects": subjects}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": batch}},
        "5": {"class_type": "AttnGuideKSampler", "inputs": {
            "model": ["1", 0], "seed": 3, "steps": steps, "cfg": 7.5, "sampler_name": sampler, "scheduler": "normal",
            "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0,
            "subjects": ["2", 1], "attention_resolution": 0, "record_maps": True}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": 3, "steps": steps, "cfg": 7.5, "sampler_name": sampler, "scheduler": "normal",
            "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "10": {"class_type": "TestCapture", "inputs": {"label": "guided", "value": ["5", 0]}},
        "11": {"class_type": "TestCapture", "inputs": {"label": "attention", "value": ["5", 1]}},
        "12": {"class_type": "TestCapture", "inputs": {"label": "plain", "value": ["6", 0]}},
        "13": {"class_type": "TestCapture", "inputs": {"label": "model", "model": ["1", 0]}},
    }
    if guidance:
        prompt["7"] = {"class_type": "AttnGuideGuidance", "inputs": {
            "attend_and_excite_weight": 1.0, "segregation_weight": 0.0, "retention_weight": 0.0,
            "attendance_weight": 0.0, "scale_factor": 20.0, "guidance_start": 0.0, "guidance_end": 0.5,
            "refinement": "0.0:0.05", "max_refinement_steps": 2, "softmax_temperature": 100.0,
            "exclude_padding": False, "smoothing_sigma": 0.5, "retention_threshold": 0.5, "truncate_pass": True}}
        prompt["5"]["inputs"]["guidance"] = ["7", 0]
    return prompt


def test_capture_only_workflow_equals_ksampler(runner):
    out = runner.run(_workflow())
    assert torch.equal(out["guided"]["samples"], out["plain"]["samples"])
    record = out["attention"]
    assert record.steps == [0, 1, 2, 3]
    assert record.resolution == (8, 8)
    assert record.subjects.labels == ["cat", "frog"]
    assert torch.allclose(record.maps[0].sum(-1), torch.ones(1, 64), atol=1e-5)


def test_guided_workflow_under_inference_mode_and_model_untouched(runner):
    """Prompts execute under inference_mode with inference-tensor weights: the guided pass must still work,
    change the latent, leave the input MODEL without patches, and leave later plain runs unchanged."""
    before = runner.run(_workflow(steps=4))
    model = before["model"]
    assert next(model.model.diffusion_model.parameters()).is_inference()
    guided = runner.run(_workflow(guidance=True, steps=4))
    assert not torch.equal(guided["guided"]["samples"], guided["plain"]["samples"])
    assert torch.isfinite(guided["guided"]["samples"]).all()
    losses = guided["attention"].losses
    assert [entry.step for entry in losses] == [0, 1]
    # the MODEL that went into the sampler carries no patch of ours
    assert "patches_replace" not in guided["model"].model_options.get("transformer_options", {})
    assert next(guided["model"].model.diffusion_model.parameters()).is_inference()
    after = runner.run(_workflow(steps=4))
    assert torch.equal(after["plain"]["samples"], before["plain"]["samples"])
    assert torch.equal(after["guided"]["samples"], before["guided"]["samples"])


def test_requeue_is_stable(runner):
    """The same workflow queued repeatedly gives the same result and does not grow what is stored."""
    prompt = _workflow(guidance=True, steps=4, sampler="euler_ancestral")
    capture_type = pack_module("attention_patch.capture").AttentionCapture
    first = runner.run(prompt)
    gc.collect()
    live_after_first = sum(type(o) is capture_type for o in gc.get_objects())
    results = []
    for _ in range(2):  # the runner keeps no output cache: every run executes every node
        results.append(runner.run(prompt))
    assert torch.equal(results[0]["guided"]["samples"], first["guided"]["samples"])
    assert torch.equal(results[0]["guided"]["samples"], results[1]["guided"]["samples"])
    assert len(results[1]["attention"].maps) == len(first["attention"].maps) == 4
    assert len(results[1]["attention"].losses) == len(first["attention"].losses)
    gc.collect()
    assert sum(type(o) is capture_type for o in gc.get_objects()) <= live_after_first


def test_bad_subject_is_a_clear_error(runner):
    with pytest.raises(WorkflowError) as error:
        runner.run(_workflow(subjects="dog"))
    assert "'dog' is not in the prompt" in error.value.message
    assert "'cat'" in error.value.message and "'frog'" in error.value.message


def test_sampler_form_in_sampler_custom_advanced(runner):
    """The SAMPLER form guides inside SamplerCustomAdvanced; Attention From Sampler hands out its maps."""
    prompt = _workflow(guidance=True, steps=4)
    prompt.update({
        "20": {"class_type": "AttnGuideSampler", "inputs": {
            "sampler_name": "euler", "subjects": ["2", 1], "guidance": ["7", 0], "attention_resolution": 0,
            "record_maps": True}},
        "21": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 4,
                                                          "denoise": 1.0}},
        "22": {"class_type": "RandomNoise", "inputs": {"noise_seed": 3}},
        "23": {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                     "cfg": 7.5}},
        "24": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["22", 0], "guider": ["23", 0],
                                                                 "sampler": ["20", 0], "sigmas": ["21", 0],
                                                                 "latent_image": ["4", 0]}},
        "25": {"class_type": "AttnGuideSamplerAttention", "inputs": {"sampler": ["20", 0], "latent": ["24", 0]}},
        "26": {"class_type": "TestCapture", "inputs": {"label": "custom", "value": ["24", 0]}},
        "27": {"class_type": "TestCapture", "inputs": {"label": "custom_attention", "value": ["25", 0]}},
    })
    out = runner.run(prompt)
    # same noise, sigmas, cfg and guidance as the Attention KSampler: the same latent
    assert torch.allclose(out["custom"]["samples"], out["guided"]["samples"], rtol=1e-5, atol=1e-5)
    assert [e.step for e in out["custom_attention"].losses] == [0, 1]
    assert out["custom_attention"].steps == [0, 1, 2, 3]


@pytest.mark.parametrize("value, expected", [
    ("auto", (None, None)), ("on", (True, True)), ("off", (False, False)),
    (True, (None, None)), (False, (False, False)),  # as workflows saved before DiT support hold it
])
def test_recompute_choice_and_saved_booleans(runner, value, expected):
    """recompute_feedforward is a choice (auto = the model family's); a saved workflow's boolean still validates
    through ComfyUI's executor and means what it meant where it meant anything (true, the old default: auto)."""
    prompt = _workflow(guidance=True)
    prompt["7"]["inputs"]["recompute_feedforward"] = value
    config = runner.run({"7": prompt["7"], "10": {"class_type": "TestCapture",
                                                  "inputs": {"label": "guidance", "value": ["7", 0]}}})["guidance"]
    assert (config.recompute_feedforward, config.recompute_attention) == expected


def test_bad_recompute_choice_is_a_clear_validation_error(runner):
    prompt = _workflow(guidance=True)
    prompt["7"]["inputs"]["recompute_feedforward"] = "fast"
    with pytest.raises(AssertionError, match=r"recompute_feedforward 'fast' is not one of auto, on, off"):
        runner.run({"7": prompt["7"], "10": {"class_type": "TestCapture",
                                             "inputs": {"label": "guidance", "value": ["7", 0]}}})
