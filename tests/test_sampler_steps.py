"""The guided sampler's bookkeeping: which model call begins a step, which cond the SUBJECTS belong to,
the size a layer's maps really have."""
import logging
import types

import comfy.samplers
import nodes
import pytest
import torch
from harness import pack_module

sampler_mod = pack_module("guidance.sampler")
capture_mod = pack_module("attention_patch.capture")
subjects_mod = pack_module("text.subjects")
text_encode = pack_module("nodes.text_encode")

SIGMAS = torch.tensor([14.6, 6.0, 2.5, 1.0, 0.3, 0.0])


def _model_k(patcher):
    """What samplers read of their model besides calling it (the model_sampling object), as KSamplerX0Inpaint
    over a CFGGuider has it."""
    if patcher is None:
        return object()
    return types.SimpleNamespace(inner_model=types.SimpleNamespace(inner_model=patcher.model, model_patcher=patcher))


def _plan(name, model=None):
    sampler = comfy.samplers.sampler_object(name)
    x = torch.randn(1, 4, 8, 8)
    return sampler_mod.plan_steps(sampler.sampler_function, _model_k(model), x, SIGMAS, {"seed": 1, "model_options": {}},
                                  sampler.extra_options)


def test_dry_run_finds_step_starts_not_corrections(sd15):
    # heun: one call per step plus a correction at the next sigma, except on the last step (to sigma 0)
    assert _plan("heun").first_calls == {0: 0, 2: 1, 4: 2, 6: 3, 8: 4}
    assert _plan("euler").first_calls == {i: i for i in range(5)}
    # dpm_2 evaluates a midpoint after each callback; sa_solver_pece the corrected state at the same sigma
    assert _plan("dpm_2").first_calls == {0: 0, 2: 1, 4: 2, 6: 3, 8: 4}
    plan = _plan("sa_solver_pece", sd15[0])
    assert sorted(plan.first_calls.values()) == [0, 1, 2, 3, 4] and not plan.online


def test_dry_run_of_uni_pc_and_adaptive_samplers():
    plan = _plan("uni_pc")  # the model gets a rescaled copy: the window's last call begins the step
    assert sorted(plan.first_calls.values()) == [0, 1, 2, 3, 4]
    assert _plan("dpm_adaptive").online  # its calls depend on the model's values


def test_dry_run_does_not_move_the_global_rng(sd15):
    sampler = comfy.samplers.sampler_object("euler_ancestral")
    x = torch.randn(1, 4, 8, 8)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    plan = sampler_mod.plan_steps(sampler.sampler_function, _model_k(sd15[0]), x, SIGMAS, {"model_options": {}},
                                  sampler.extra_options)  # no seed: the sampler draws global noise
    assert plan.first_calls and torch.equal(torch.rand(3), expected)


def test_schedule_step():
    assert [sampler_mod.schedule_step(SIGMAS, float(s)) for s in SIGMAS[:-1]] == [0, 1, 2, 3, 4]
    assert sampler_mod.schedule_step(SIGMAS, 4.0) == 1  # between sigma_1 and sigma_2: interval 1
    assert sampler_mod.schedule_step(SIGMAS, 20.0) == 0


def _encode(clip, text, subjects="cat, frog"):
    return text_encode.AttentionTextEncode.execute(clip, text, subjects)


def _processed(conditioning):
    """As the sampler sees a positive: a list of cond dicts with model_conds (through ComfyUI's own code)."""
    import comfy.sampler_helpers
    conds = comfy.sampler_helpers.convert_cond(conditioning)
    for cond in conds:
        cond["model_conds"] = {"c_crossattn": comfy.conds.CONDCrossAttn(cond["cross_attn"])}
    return conds


def test_subjects_bind_to_their_text_in_combined_and_concatenated_conds(sd15):
    import comfy.conds  # noqa: F401
    _model, clip = sd15
    subject_cond, subjects = _encode(clip, "a cat and a frog").args
    other_cond, _other = _encode(clip, "a dog and a bird", "dog").args
    combined = nodes.ConditioningCombine().combine(other_cond, subject_cond)[0]
    binding = sampler_mod.bind_subjects(subjects, {"positive": _processed(combined)})
    assert binding.token_offset == 0 and torch.equal(binding.cond["cross_attn"], subject_cond[0][0])
    concatenated = nodes.ConditioningConcat().concat(other_cond, subject_cond)[0]
    binding = sampler_mod.bind_subjects(subjects, {"positive": _processed(concatenated)})
    assert binding.token_offset == 77
    maps = torch.arange(2 * 154, dtype=torch.float32).reshape(1, 2, 154)
    assert torch.equal(binding.own_tokens(maps), maps[:, :, 77:])


def test_subjects_of_another_text_are_a_clear_error(sd15):
    _model, clip = sd15
    positive, _subjects = _encode(clip, "a cat and a frog").args
    negative, negative_subjects = _encode(clip, "a cat and a frog, blurry").args
    with pytest.raises(ValueError, match="negative prompt's"):
        sampler_mod.bind_subjects(negative_subjects, {"positive": _processed(positive),
                                                      "negative": _processed(negative)})
    with pytest.raises(ValueError, match="no positive cond's"):
        sampler_mod.bind_subjects(negative_subjects, {"positive": _processed(positive), "negative": []})


def test_area_and_timestep_range_of_the_bound_cond(sd15):
    _model, clip = sd15
    positive, subjects = _encode(clip, "a cat and a frog").args
    conds = _processed(positive)
    conds[0].update(area=(8, 16, 4, 0), timestep_start=10.0, timestep_end=2.0)
    binding = sampler_mod.bind_subjects(subjects, {"positive": conds})
    assert binding.area((1, 4, 32, 32)) == (4 / 32, 0.0, 8 / 32, 16 / 32)
    assert [binding.active(s) for s in (14.6, 10.0, 5.0, 2.0, 1.0)] == [False, True, True, True, False]


def test_no_guided_step_says_nothing_is_guided(sd15, caplog):
    import test_guided
    model, clip = sd15
    config = sampler_mod.GuidanceConfig(guidance_end=0.05, refinement=())
    with caplog.at_level(logging.WARNING):
        _out, record = test_guided._run(model, clip, config=config, steps=6)
    assert "nothing is guided" in caplog.text and record.losses == []


@pytest.mark.parametrize("tokens, shape, expected", [(12, (64, 48), (4, 3)), (16, (64, 64), (4, 4)),
                                                     (8, (32, 64), (2, 4)), (6, (16, 32), (2, 3))])
def test_layer_size_from_tokens_and_aspect(tokens, shape, expected):
    assert capture_mod._solve_grid(tokens, *shape) == expected
    actual, nominal = capture_mod.layer_grid({"original_shape": [1, 4, *shape]}, tokens, 4)
    assert actual == expected and nominal == (-(-shape[0] // 4), -(-shape[1] // 4))


def test_maps_resized_to_the_grid_stay_distributions():
    probs = torch.rand(2, 3, 4 * 6, 5).softmax(dim=-1)
    resized = capture_mod.resize_maps(probs, (4, 6), (8, 12))
    assert resized.shape == (2, 3, 96, 5)
    assert torch.allclose(resized.sum(-1), torch.ones(2, 3, 96), atol=1e-6)
    assert capture_mod.resize_maps(probs, (4, 6), (4, 6)) is probs
