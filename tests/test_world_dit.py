"""The DiT world model (issue 16's DiT rows): the narrow MMDiT of `world.dit`, its checkpoint through Load
Checkpoint, and its training forms in `world.train` (--family sd3)."""
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import comfy.supported_models
import nodes
from harness import pack_module, run_node

scenes = pack_module("world.scenes")
detector = pack_module("world.detector")
world_model = pack_module("world.model")
dit = pack_module("world.dit")
train = pack_module("world.train")
capture_dit = pack_module("attention_patch.dit")


def _config(**changes):
    return train.TrainConfig(**{"family": "sd3", "batch_size": 4, "lr": 2e-3, "warmup": 1, "depth": 1,
                                "ground_log": True, **changes})


def test_noised_input_and_target_are_what_comfyui_samples_with():
    """Both families' training input and target, against ComfyUI's own model sampling: the denoised prediction
    from the target is x0, and the input is what the model sees at that sigma."""
    x0 = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    for family in ("sd15", "sd3"):
        trainer = train.make_trainer(dataclasses.replace(_config(), family=family))
        sampling = trainer.model.model_sampling
        sigma = sampling.sigmas[torch.tensor([100, 500, 900])].float().reshape(-1, 1, 1, 1)
        x_in, target, level = train.noised(family, x0, sigma, noise)
        noisy = sampling.noise_scaling(sigma, noise, x0)        # what the sampler starts from at sigma
        assert torch.allclose(sampling.calculate_input(sigma, noisy), x_in, atol=1e-6)
        assert torch.allclose(sampling.calculate_denoised(sigma, target, noisy), x0, atol=1e-5)
        # the EPS-equivalent level: the same signal-to-noise ratio as SD1.x's sigma
        snr = (x_in.new_ones(()) / level.flatten() ** 2)
        if family == "sd3":
            assert torch.allclose(snr, ((1 - sigma) / sigma).flatten() ** 2)
            assert torch.allclose(train.flow_sigma(level), sigma)
        else:
            assert torch.equal(level, sigma)


def test_probe_keeps_the_forward_and_reads_the_captures_slice():
    """The training probe computes the joint attention itself: the MMDiT's output is the host attention's, and
    its maps are the image-query x text-key slice of the softmax over all keys that the pack's DiT capture reads
    (`key_probabilities`, mean over heads), recomputed here from the block's q and k."""
    model = dit.make_model(3, depth=2)
    with torch.no_grad():  # a trained-like model: the adaLN gates and the output are not 0
        for name, p in model.diffusion_model.named_parameters():
            if "adaLN_modulation" in name or name.startswith("final_layer.linear."):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    clip = dit.make_clip(1)
    context, pooled = dit.TextCache(clip)(["a red circle and a blue square", "a green triangle"])
    x = torch.randn(2, 16, 32, 32, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([900.0, 300.0])
    diffusion_model = model.diffusion_model
    seen = []

    def keep_qk(func, *args, **kwargs):
        seen.append((args[0], args[1], args[3] if len(args) > 3 else kwargs["heads"]))
        return func(*args, **kwargs)

    with torch.no_grad():
        host = diffusion_model(x, t, context=context, y=pooled, transformer_options={"optimized_attention_override": keep_qk})
        probe = dit.JointAttentionProbe(77)
        ours = diffusion_model(x, t, context=context, y=pooled, transformer_options=probe.transformer_options())
    assert torch.allclose(ours, host, atol=1e-4), (ours - host).abs().max()
    assert len(probe.maps) == len(seen) == 2
    for maps, (q, k, heads) in zip(probe.maps, seen):
        q4 = q.reshape(q.shape[0], q.shape[1], heads, -1).transpose(1, 2)
        k4 = k.reshape(k.shape[0], k.shape[1], heads, -1).transpose(1, 2)
        expected = capture_dit.text_image_probabilities(q4[:, :, 77:], k4, 77) / heads
        assert maps.shape == (2, 256, 77)
        assert torch.allclose(maps, expected, atol=1e-5)
        assert float(maps.sum(-1).max()) <= 1 + 1e-5 and float(maps.sum(-1).min()) > 0


def test_log_grounding_terms_by_hand():
    share = torch.tensor([0.3, 0.15, 0.015, 0.0])
    assert math.isclose(float(train.grounding_shortfall(share, 0.15)), (0 + 0 + 0.135 + 0.15) / 4, rel_tol=1e-6)
    expected = (0 + 0 + math.log(10) + (math.log(0.15) - math.log(1e-8))) / 4
    assert math.isclose(float(train.grounding_shortfall(share, 0.15, log=True)), expected, rel_tol=1e-6)
    assert math.isclose(float(train.grounding_excess(share, 0.015)), float(share.mean()), rel_tol=1e-6)
    expected = (math.log(20) + math.log(10) + 0 + 0) / 4
    assert math.isclose(float(train.grounding_excess(share, 0.015, log=True)), expected, rel_tol=1e-6)
    # the log form's gradient does not vanish as the share does: 1 / share, not 1
    small = torch.tensor([1e-4], requires_grad=True)
    train.grounding_shortfall(small, 0.15, log=True).backward()
    assert math.isclose(float(small.grad), -1e4, rel_tol=1e-4)


def test_dit_training_runs_loss_falls_and_its_checkpoint_loads(tmp_path):
    """A few batches of --family sd3: the flow loss falls on a held batch, a save resumes exactly, and the
    checkpoint (SD3's key layout) is detected by Load Checkpoint as the world MMDiT, reads the training text
    features, samples, and its VAE shows the scene."""
    trainer = train.make_trainer(_config())
    probe_batch = 10_000
    data = train.batch_data(trainer, probe_batch)
    assert data["latent"].shape == (4, 16, 32, 32) and float(data["latent"][:, 3:].abs().max()) == 0.0
    with torch.no_grad():
        before = float(train.losses(trainer, data, probe_batch)["diffusion"])
    for _ in range(20):
        values = train.step(trainer)
    assert all(math.isfinite(v) for v in values.values())
    with torch.no_grad():
        after = float(train.losses(trainer, data, probe_batch)["diffusion"])
    assert after < 0.6 * before, (before, after)
    train.save(trainer, tmp_path)
    saved = {name: value.clone() for name, value in trainer.model.diffusion_model.state_dict().items()}
    resumed = train.load(tmp_path)
    assert resumed.config == trainer.config and resumed.batch == 20
    a, b = train.step(trainer), train.step(resumed)
    assert a == b

    path = tmp_path / train.CHECKPOINT_NAMES["sd3"]
    assert path.stat().st_size < 25_000_000
    model, clip, vae = world_model.load_checkpoint(path)
    assert type(model.model.model_config).__name__ == "WorldSD3"
    assert type(model.model).__name__ == "SD3" and model.model.diffusion_model.depth == 1
    loaded = model.model.diffusion_model.state_dict()
    for name, value in saved.items():
        assert torch.allclose(loaded[name].float(), value.half().float()), name
    text = "a red circle and a blue square"
    (positive,) = run_node(nodes.CLIPTextEncode, clip=clip, text=text)[:1]
    context, pooled = trainer.family.text([text])
    assert torch.allclose(positive[0][0].float(), context, atol=2e-2)
    assert torch.allclose(positive[0][1]["pooled_output"].float(), pooled, atol=2e-2)
    (negative,) = run_node(nodes.CLIPTextEncode, clip=clip, text="")[:1]
    latent = {"samples": torch.zeros(1, 16, 32, 32)}
    (sampled,) = run_node(nodes.KSampler, model=model, seed=0, steps=2, cfg=4.0, sampler_name="euler",
                          scheduler="simple", positive=positive, negative=negative, latent_image=latent, denoise=1.0)
    assert sampled["samples"].shape == (1, 16, 32, 32) and torch.isfinite(sampled["samples"]).all()
    drawn = scenes.sample_scenes(21, 4, split="any")
    image, _ = scenes.render(drawn)
    pixels = torch.from_numpy(np.repeat(np.repeat(image, 8, axis=1), 8, axis=2))
    with torch.no_grad():
        encoded = vae.encode(pixels)
        decoded = vae.decode(encoded)
    model_latent = model.model.latent_format.process_in(encoded)
    assert torch.allclose(model_latent, dit.to_model_latent(torch.from_numpy(scenes.rgb_to_latent(image))), atol=1e-2)
    assert [sorted(d.pair for d in f) for f in detector.detect_batch(decoded.numpy())] == \
        [sorted(o.pair for o in s.objects) for s in drawn]


def test_detection_tells_the_world_mmdit_from_sd3():
    """The world MMDiT is registered before SD3 (which matches it too), and SD3's own checkpoints (CLIP-L + G
    pooled, 2048) still load as SD3."""
    world_model.register()
    world_model.register()  # idempotent
    models = comfy.supported_models.models
    assert sum(m is dit.WorldSD3 for m in models) == 1
    assert models.index(dit.WorldSD3) < models.index(comfy.supported_models.SD3)
    ours = {**dit.unet_config(), "dtype": torch.float32}
    sd3 = {**ours, "adm_in_channels": 2048}
    assert dit.WorldSD3.matches(ours) and not dit.WorldSD3.matches(sd3)
    assert comfy.supported_models.SD3.matches(sd3)


def test_sd3_family_needs_the_text_encoder_frozen():
    with pytest.raises(ValueError, match="frozen"):
        train.make_trainer(_config(freeze_text=False))
    with pytest.raises(ValueError, match="valid: sd15, sd3"):
        train.make_trainer(_config(family="flux"))


SHIPPED = Path(train.PACK_DIR) / "world" / train.CHECKPOINT_NAMES["sd3"]


@pytest.mark.skipif(not SHIPPED.is_file(), reason="no shipped DiT world checkpoint")
def test_shipped_dit_checkpoint_loads_and_shows_the_scene():
    assert SHIPPED.stat().st_size < 25_000_000
    model, clip, vae = world_model.load_checkpoint(SHIPPED)
    assert type(model.model.model_config).__name__ == "WorldSD3"
    drawn = scenes.sample_scenes(15, 6, split="any")
    image, _ = scenes.render(drawn)
    with torch.no_grad():
        decoded = vae.decode(vae.encode(torch.from_numpy(np.repeat(np.repeat(image, 8, axis=1), 8, axis=2))))
    assert [sorted(d.pair for d in f) for f in detector.detect_batch(decoded.numpy())] == \
        [sorted(o.pair for o in s.objects) for s in drawn]
    (positive,) = run_node(nodes.CLIPTextEncode, clip=clip, text="a red circle")[:1]
    latent = {"samples": torch.zeros(1, 16, 32, 32)}
    (sampled,) = run_node(nodes.KSampler, model=model, seed=0, steps=2, cfg=1.0, sampler_name="euler",
                          scheduler="normal", positive=positive, negative=positive, latent_image=latent, denoise=1.0)
    assert torch.isfinite(sampled["samples"]).all()
    # its image attention learnt neighbourhoods (the first run's stayed as wide as uniform, 8.4 tokens, and drew
    # speckle): the first block's heads attend within a few tokens on average
    context, pooled = dit.TextCache(clip)(["a red circle and a blue square", "a green triangle"])
    spread, _ = dit.attention_spread(_image_attention(model.model, context, pooled)[0], 16)
    assert float(spread.mean()) < 6.0, spread


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    config = _config(lr=1e-3, warmup=10, lr_decay_start=100, lr_decay_end=200)
    assert math.isclose(train.learning_rate(config, 0), 1e-4)
    assert math.isclose(train.learning_rate(config, 9), 1e-3) and math.isclose(train.learning_rate(config, 100), 1e-3)
    assert math.isclose(train.learning_rate(config, 150), 1e-3 * 0.55)
    assert math.isclose(train.learning_rate(config, 200), 1e-4) and math.isclose(train.learning_rate(config, 900), 1e-4)
    constant = _config(lr=1e-3, warmup=10)
    assert math.isclose(train.learning_rate(constant, 5000), 1e-3)  # the SD1.x recipe: constant after warm-up
    trainer = train.make_trainer(_config(lr=1e-3, warmup=1, lr_decay_start=1, lr_decay_end=3))
    for batch in range(4):
        train.step(trainer)
        assert math.isclose(trainer.optimizer.param_groups[0]["lr"], train.learning_rate(trainer.config, batch))


def _image_attention(model, context, pooled):
    x = torch.randn(2, 16, 32, 32, generator=torch.Generator().manual_seed(5))
    return dit.image_attention(model.diffusion_model, x, torch.tensor([900.0, 300.0]), context, pooled)[0]


def test_local_attention_start_is_local_multi_scale_and_leaves_the_text_a_share():
    """`local_attention_init_`: the image queries attend to their neighbourhood at the start (the generic start
    spreads over the whole grid), each head at its own width, and the text keys keep a share; nothing but the
    patch embedding's and the image attention's q / k rows and biases differs from the generic start."""
    clip = dit.make_clip(1)
    context, pooled = dit.TextCache(clip)(["a red circle and a blue square", "a green triangle"])
    plain, local = dit.make_model(0, 3), dit.make_model(0, 3, local_attention=8.0)
    for model, is_local in ((plain, False), (local, True)):
        for probs in _image_attention(model, context, pooled):
            spread, text = dit.attention_spread(probs, 16)  # per head, in tokens; the text's share
            if is_local:
                assert float(spread.max()) < 5.0 and torch.all(spread[1:] > spread[:-1]), spread
                assert float(text.min()) > 0.1, text
            else:
                assert float(spread.min()) > 7.5, spread  # uniform over the 16 x 16 grid: 8.4
    changed = {name for (name, a), b in zip(plain.diffusion_model.named_parameters(),
                                            local.diffusion_model.parameters()) if not torch.equal(a, b)}
    assert changed == {"x_embedder.proj.weight"} | {
        f"joint_blocks.{i}.x_block.attn.qkv.{kind}" for i in range(3) for kind in ("weight", "bias")}
    trainer = train.make_trainer(_config(depth=3, local_attention=8.0))
    assert torch.equal(trainer.model.diffusion_model.joint_blocks[0].x_block.attn.qkv.weight,
                       local.diffusion_model.joint_blocks[0].x_block.attn.qkv.weight)
    with pytest.raises(ValueError, match="local_attention"):
        dit.make_model(0, 3, local_attention=-1.0)
