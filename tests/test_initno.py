"""InitNO (initial noise optimisation): its scores on hand-made maps, and the stage on the tiny model."""
import comfy.sample
import comfy.samplers
import pytest
import torch
from harness import pack_module

initno = pack_module("guidance.initno")
sampler_mod = pack_module("guidance.sampler")
text_encode = pack_module("nodes.text_encode")

CONFIG = initno.InitNOConfig(rounds=2, iterations=4, final_iterations=4, learning_rate=0.05)


def test_kl_to_standard_normal():
    zero = torch.zeros(4, 3)
    assert float(initno.kl_to_standard_normal(zero, zero)) == 0.0
    mu, log_var = torch.full((2,), 0.5), torch.full((2,), 0.2)
    expected = -0.5 * (1 + 0.2 - 0.25 - torch.exp(torch.tensor(0.2)))
    assert torch.allclose(initno.kl_to_standard_normal(mu, log_var), expected)


def _blob(height, width, y, x):
    grid = torch.zeros(height, width)
    grid[y, x] = 1.0
    return grid


def test_conflict_score_reads_the_self_attention_of_each_peak():
    """Two subjects peaking at different pixels: the score compares those pixels' self-attention rows."""
    h = w = 4
    maps = torch.stack([_blob(h, w, 0, 0), _blob(h, w, 3, 3)])[None]  # [1, 2, 4, 4]
    self_maps = torch.zeros(1, h * w, h * w)
    self_maps[0, 0] = _blob(h, w, 0, 1).flatten()    # pixel (0,0) attends to (0,1)
    self_maps[0, 15] = _blob(h, w, 3, 2).flatten()   # pixel (3,3) attends to (3,2)
    rows = initno.peak_self_attention(self_maps, maps, smoothing_sigma=0.5)
    assert torch.equal(rows[0, 0], _blob(h, w, 0, 1)) and torch.equal(rows[0, 1], _blob(h, w, 3, 2))
    apart = initno.conflict_score(self_maps, maps)
    self_maps[0, 15] = self_maps[0, 0]  # both peaks attend to the same pixel: full conflict
    together = initno.conflict_score(self_maps, maps)
    assert float(apart) < 1e-3 and float(together) == pytest.approx(0.5, abs=1e-6)


def test_joint_score_counts_the_conflict_only_once_subjects_respond():
    response, conflict = torch.tensor([0.6, 0.3]), torch.tensor([0.4, 0.4])
    assert torch.allclose(initno.joint_score(response, conflict), torch.tensor([0.6, 0.7]))


def _toy_scores(weights):
    """Per-image scores of a toy objective (image i's depend on z[i] only): the response falls as z aligns with
    `weights`, the conflict as z's two halves differ."""
    def scores(z):
        alignment = (z * weights).flatten(1).mean(-1)
        halves = z[..., :4].flatten(1).mean(-1) - z[..., 4:].flatten(1).mean(-1)
        return 1 - torch.sigmoid(4 * alignment), torch.exp(-4 * halves.abs())
    return scores


def test_each_image_of_a_batch_is_optimised_as_if_alone():
    """A batch's images keep their own successes, restarts and best rounds: each comes out as it does alone."""
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(4, 8, 8, generator=generator)
    halves = torch.cat([torch.ones(4, 8, 4), -torch.ones(4, 8, 4)], dim=-1)
    # image 0 starts solved, image 1 far from it (it needs the restarts), image 2 in between
    noise = torch.stack([2 * weights + halves, -3 * weights, torch.randn(4, 8, 8, generator=generator)])
    fresh = {r: torch.randn(3, 4, 8, 8, generator=generator) for r in range(1, 5)}
    config = initno.InitNOConfig(rounds=3, iterations=6, final_iterations=8, learning_rate=0.1)
    scores = _toy_scores(weights)
    batch = initno.optimise_noise(scores, noise, fresh.__getitem__, config)
    alone = [initno.optimise_noise(scores, noise[i:i + 1], lambda r, i=i: fresh[r][i:i + 1], config)
             for i in range(3)]
    rounds = batch.column("round")
    assert batch.images[0].succeeded and not batch.images[1].succeeded
    assert len(set(rounds)) == 3  # each image kept another round (a batch-wide choice would keep one)
    assert rounds[0] == 0 and torch.equal(batch.noise[0], noise[0])  # solved at once: kept untouched
    for image, single in zip(batch.images, alone):
        (kept,) = single.images
        assert torch.allclose(image.noise, kept.noise, atol=1e-6)
        assert (image.succeeded, image.round) == (kept.succeeded, kept.round)
        assert image.response == pytest.approx(kept.response, abs=1e-6)
        assert image.kl == pytest.approx(kept.kl, abs=1e-7) and image.kl <= config.kl_bound
    # the failed image ran every round and the final optimisation of its best one
    assert sum(1 for entry in batch.history if entry[0] == config.rounds) == config.final_iterations + 1
    assert len(batch.history) == config.rounds * (config.iterations + 1) + config.final_iterations + 1
    # its best round is the one that ended with the lowest S_res + S_con (alone, the history is that image's),
    # and the final optimisation from that round's start ends below where that round ended
    ends = {rnd: r + c for rnd, i, r, c in alone[1].history if i == config.iterations and rnd < config.rounds}
    assert len(ends) == config.rounds and rounds[1] == min(ends, key=ends.get)
    failed = batch.images[1]
    assert failed.response + failed.conflict < ends[rounds[1]]


def _sample(model, clip, sampler_name="euler", config=CONFIG, seed=3, steps=4, denoise=1.0, latent=None):
    positive, subjects = text_encode.AttentionTextEncode.execute(clip, "a cat and a frog", "cat, frog").args
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    latent = torch.zeros(1, 4, 16, 16) if latent is None else latent
    noise = comfy.sample.prepare_noise(latent, seed)
    sampler = sampler_mod.AttentionSampler(comfy.samplers.sampler_object(sampler_name), subjects, None,
                                           initno=config)
    with torch.inference_mode():  # sigmas too, as ComfyUI's KSampler makes them: inference tensors
        sigmas = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                         scheduler="normal", denoise=denoise, model_options=model.model_options).sigmas
        out = comfy.sample.sample_custom(model, noise, 7.5, sampler, sigmas, positive, negative, latent,
                                         disable_pbar=True, seed=seed)
        plain = comfy.sample.sample_custom(model, noise, 7.5, comfy.samplers.sampler_object(sampler_name), sigmas,
                                           positive, negative, latent, disable_pbar=True, seed=seed)
    return out, plain, sampler.last_record


def test_stage_lowers_its_scores_keeps_the_noise_standard_and_is_reproducible(sd15, monkeypatch):
    model, clip = sd15
    optimised = []
    original = initno.optimise_noise

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        optimised.append(result.noise.clone())
        return result
    monkeypatch.setattr(initno, "optimise_noise", spy)
    out, plain, record = _sample(model, clip)
    again, _plain, _record = _sample(model, clip)
    assert torch.equal(out, again)  # deterministic for a seed
    assert not torch.equal(out, plain) and torch.isfinite(out).all()
    history = record.initno["history"]
    first_round = [entry for entry in history if entry[0] == 0]
    assert first_round[-1][2] < first_round[0][2]  # the response score falls over the iterations
    noise = optimised[0]
    assert abs(float(noise.mean())) < 0.15 and 0.85 < float(noise.std()) < 1.15
    assert 0.0 <= record.initno["kl"][0] <= CONFIG.kl_bound  # the reparameterisation stays near N(0, 1)
    assert len(history) >= CONFIG.rounds * 2


def test_every_kind_of_sampler_runs_from_the_optimised_noise(sd15):
    model, clip = sd15
    for name in ("dpmpp_2m", "euler_ancestral", "uni_pc"):
        out, plain, record = _sample(model, clip, name, initno.InitNOConfig(rounds=1, iterations=2, final_iterations=1))
        assert torch.isfinite(out).all() and not torch.equal(out, plain) and record.initno is not None


def test_stage_runs_on_a_partial_denoise(sd15):
    """img2img (denoise < 1): the stage noises the given latent at a sigma_0 below sigma_max, where the noise is
    scaled by the host's sigma itself, an inference tensor as ComfyUI's KSampler makes it (autograd refused it)."""
    model, clip = sd15
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    config = initno.InitNOConfig(rounds=1, iterations=3, final_iterations=1)
    out, plain, record = _sample(model, clip, config=config, denoise=0.6, latent=latent)
    assert torch.isfinite(out).all() and not torch.equal(out, plain)
    history = record.initno["history"]
    assert history[-1][2] <= history[0][2] + 1e-6  # the kept noise scores no worse than the start


def test_kl_bound_limits_how_far_each_image_moves():
    """The node's kl_bound reaches the stage: every image's KL ends at or below it, and a looser bound lets an
    image that has not succeeded move further from its start."""
    generator = torch.Generator().manual_seed(1)
    weights = torch.randn(4, 8, 8, generator=generator)
    noise = -0.3 * weights.unsqueeze(0)  # short of success, with a gradient: the bound decides how far it moves
    fresh = {r: torch.randn(1, 4, 8, 8, generator=generator) for r in range(1, 3)}
    moved = {}
    for bound in (1e-3, 1e-2):
        config = pack_module("nodes.initno").AttentionInitNO.execute(
            rounds=1, iterations=8, final_iterations=4, learning_rate=0.1, kl_bound=bound).args[0]
        assert config.kl_bound == bound
        result = initno.optimise_noise(_toy_scores(weights), noise, fresh.__getitem__, config)
        assert 0.0 < result.images[0].kl <= bound
        moved[bound] = float((result.noise - noise).pow(2).mean().sqrt())
    assert moved[1e-2] > 1.5 * moved[1e-3], moved
