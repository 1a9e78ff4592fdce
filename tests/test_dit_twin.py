"""The tiny SD3/SD3.5 (MMDiT) and Flux models: what ComfyUI makes of them (flow sampling, text encoders, KSampler,
VAE Decode), and their diffusers twins (same output as ComfyUI's model, text attention from diffusers' own q/k).

The twins are the reference the DiT attention capture is tested against (tests/reference/diffusers_dit_twin.py)."""
import pytest
import torch

pytest.importorskip("diffusers", reason="the twins come from diffusers (pip install -r requirements-test.txt)")

import comfy.latent_formats  # noqa: E402
import comfy.model_sampling  # noqa: E402
import nodes  # noqa: E402
from harness import run_node  # noqa: E402
from reference.diffusers_dit_twin import (  # noqa: E402
    flux_twin,
    joint_blocks,
    record_text_attention,
    relative_error,
    sd3_twin,
    twin_forward,
    twin_text_attention,
    twin_velocity,
)

PROMPTS = ("a red cat and a blue frog", "a photo of a dog")
LATENT = (2, 16, 12, 16)  # non-square (6 x 8 patches), so rows and columns cannot be swapped unnoticed
SIGMAS = torch.tensor([0.83, 0.31])
SHIFT = {"sd3": 3.0, "sd35m": 3.0, "flux": 1.15, "flux_schnell": 1.0}
CLIP_OF = {"sd3": "sd3", "sd35m": "sd3", "flux": "flux", "flux_schnell": "flux"}


@pytest.fixture(scope="module")
def dit(tiny, sd3, flux):
    """family -> (MODEL, CLIP, twin); sd35m shares SD3's text encoder, flux_schnell Flux's."""
    clips = {"sd3": sd3[1], "flux": flux[1]}
    models = {"sd3": sd3[0], "flux": flux[0]}
    built = {}

    def get(family):
        if family not in built:
            model = models.get(family) or tiny.make_model(family)
            twin = (sd3_twin if family.startswith("sd3") else flux_twin)(model)
            built[family] = model, clips[CLIP_OF[family]], twin
        return built[family]
    return get


def _encode(clip, prompts=PROMPTS):
    conds, pooleds = zip(*(clip.encode_from_tokens(clip.tokenize(text), return_pooled=True) for text in prompts))
    return torch.cat(conds), torch.cat(pooleds)


def _inputs(family, clip):
    context, pooled = _encode(clip)
    latent = torch.randn(LATENT, generator=torch.Generator().manual_seed(7))
    guidance = torch.tensor([3.5, 2.0]) if family == "flux" else None
    return latent, context, pooled, guidance


def _comfy_apply(model, latent, context, pooled, guidance):
    extra = {"guidance": guidance} if guidance is not None else {}
    with torch.no_grad():
        return model.model.apply_model(latent, SIGMAS, c_crossattn=context, y=pooled, **extra)


# ---------------------------------------------------------------- the tiny models as ComfyUI sees them

@pytest.mark.parametrize("family", ["sd3", "sd35m", "flux", "flux_schnell"])
def test_model_is_the_family_flow_model(dit, family):
    model, _, _ = dit(family)
    sampling = model.model.model_sampling
    assert isinstance(sampling, comfy.model_sampling.CONST)
    assert sampling.shift == pytest.approx(SHIFT[family])
    noise, x0 = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    assert torch.allclose(sampling.noise_scaling(SIGMAS, noise, x0),
                          SIGMAS.view(-1, 1, 1, 1) * noise + (1 - SIGMAS.view(-1, 1, 1, 1)) * x0)
    expected_timestep = SIGMAS * 1000 if family.startswith("sd3") else SIGMAS
    assert torch.allclose(sampling.timestep(SIGMAS), expected_timestep)
    latent_format = comfy.latent_formats.SD3 if family.startswith("sd3") else comfy.latent_formats.Flux
    assert isinstance(model.model.latent_format, latent_format)
    assert model.model.latent_format.latent_channels == 16
    for name, buffer in model.model.diffusion_model.named_buffers():
        assert torch.isfinite(buffer).all(), name
    if family == "sd35m":
        blocks = model.model.diffusion_model.joint_blocks
        assert [hasattr(block.x_block, "attn2") for block in blocks] == [True, True, False]
        assert blocks[0].x_block.attn.ln_q is not None  # RMS q/k norm
    if family.startswith("flux"):
        assert model.model.diffusion_model.params.guidance_embed is (family == "flux")


def test_text_encoders_are_comfyui_own_with_the_real_tokenizers(dit):
    _, sd3_clip, _ = dit("sd3")
    _, flux_clip, _ = dit("flux")
    tokens = sd3_clip.tokenize(PROMPTS[0])
    assert set(tokens) == {"l", "g", "t5xxl"}
    context, pooled = _encode(sd3_clip, PROMPTS[:1])
    # CLIP-L + CLIP-G features padded to 4096, then the T5 tokens (77 + 77), pooled CLIP-L 64 + CLIP-G 96
    assert context.shape == (1, 77 + 77, 4096) and pooled.shape == (1, 160)
    assert torch.all(context[:, :77, 64 + 96:] == 0)
    t5 = sd3_clip.cond_stage_model.t5xxl.transformer
    assert t5.shared.weight.shape == (32128, 4096) and t5.shared.weight.dtype == torch.float16
    context, pooled = _encode(flux_clip, PROMPTS[:1])
    assert context.shape == (1, 256, 64) and pooled.shape == (1, 64)  # T5 (256 tokens at least), CLIP-L pooled
    assert flux_clip.cond_stage_model.t5xxl.transformer.shared.weight.shape[0] == 32128
    # the T5 tokens are the real shipped tokenizer's (the T5 vocabulary stays the real 32128)
    pieces = [token for token, _ in tokens["t5xxl"][0]]
    assert pieces[:8] == sd3_clip.tokenizer.t5xxl.tokenizer(PROMPTS[0])["input_ids"][:8]


# ---------------------------------------------------------------- twins

@pytest.mark.parametrize("family", ["sd3", "sd35m", "flux", "flux_schnell"])
def test_twin_output_equals_comfyui_model(dit, family):
    """diffusers' transformer with ComfyUI's weights (ComfyUI's own key maps) gives ComfyUI's apply_model
    (denoised) and diffusion_model (velocity) outputs, batch of 2 prompts at 2 sigmas (Flux dev: 2 guidances)."""
    model, clip, twin = dit(family)
    latent, context, pooled, guidance = _inputs(family, clip)
    reference = _comfy_apply(model, latent, context, pooled, guidance)
    ours = twin_forward(twin, latent, SIGMAS, context, pooled, guidance)
    assert relative_error(ours, reference) < 1e-4
    timestep = model.model.model_sampling.timestep(SIGMAS)
    extra = {"guidance": guidance} if guidance is not None else {}
    with torch.no_grad():
        velocity = model.model.diffusion_model(latent, timestep, context=context, y=pooled, **extra)
    assert relative_error(twin_velocity(twin, latent, SIGMAS, context, pooled, guidance), velocity) < 1e-4
    if family == "flux":  # the guidance reaches the model
        other = twin_forward(twin, latent, SIGMAS, context, pooled, guidance * 0 + 1.0)
        assert relative_error(other, ours) > 1e-4


@pytest.mark.parametrize("family", ["sd3", "sd35m", "flux"])
def test_twin_text_attention_maps(dit, family):
    """Image-query x text-key probabilities of the softmax over all joint keys: rows sum to at most 1, the full
    rows to 1, recording leaves the twin's output as it is, and the text sits where diffusers puts it."""
    model, clip, twin = dit(family)
    latent, context, pooled, guidance = _inputs(family, clip)
    plain = twin_forward(twin, latent, SIGMAS, context, pooled, guidance)
    record = record_text_attention(twin, latent, SIGMAS, context, pooled, guidance, blocks=joint_blocks(twin))
    assert torch.equal(record.output, plain)
    image_tokens, text_tokens = (LATENT[2] // 2) * (LATENT[3] // 2), context.shape[1]
    assert set(record.maps) == set(joint_blocks(twin))
    for block, maps in record.maps.items():
        assert maps.shape == (2, image_tokens, text_tokens), block
        assert torch.all(maps >= 0)
        assert torch.all(maps.sum(-1) <= 1 + 1e-6), block
        assert torch.all(maps.sum(-1) > 0.01), block  # the text does get attention
        assert torch.allclose(record.full_row_sums[block], torch.ones(()), atol=1e-5), block
        assert record.text_first[block] is family.startswith("flux")   # Flux: [text, image]; SD3: [image, text]
    averaged = twin_text_attention(twin, latent, SIGMAS, context, pooled, guidance)
    doubles = [block for block in joint_blocks(twin) if block[0] == "double_block"]
    assert torch.allclose(averaged, record.mean(doubles))
    one = twin_text_attention(twin, latent, SIGMAS, context, pooled, guidance, blocks=[("double_block", 1)])
    assert torch.equal(one, record.maps[("double_block", 1)])
    with pytest.raises(ValueError, match="no such blocks"):
        twin_text_attention(twin, latent, SIGMAS, context, pooled, guidance, blocks=[("double_block", 9)])
    # the processors are diffusers' own again
    assert not any(type(p).__name__ == "RecordingAttnProcessor" for p in twin.attn_processors.values())


# ---------------------------------------------------------------- ComfyUI's own nodes on them

@pytest.mark.parametrize("family", ["sd3", "sd35m", "flux", "flux_schnell"])
def test_ksampler_node_and_vae_decode(dit, tiny, family):
    import comfy_extras.nodes_flux as nodes_flux
    import comfy_extras.nodes_sd3 as nodes_sd3
    model, clip, _ = dit(family)
    positive = nodes.CLIPTextEncode().encode(clip, PROMPTS[0])[0]
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = run_node(nodes_sd3.EmptySD3LatentImage, width=128, height=96, batch_size=1)[0]
    assert latent["samples"].shape == (1, 16, 12, 16)

    def sample(guidance, cfg):
        conditioning = positive
        if family.startswith("flux"):
            conditioning = run_node(nodes_flux.FluxGuidance, conditioning=positive, guidance=guidance)[0]
        return run_node(nodes.KSampler, model=model, seed=5, steps=2, cfg=cfg, sampler_name="euler",
                        scheduler="simple", positive=conditioning, negative=negative, latent_image=latent,
                        denoise=1.0)[0]["samples"]

    cfg = 4.5 if family.startswith("sd3") else 1.0
    samples = sample(3.5, cfg)
    assert samples.shape == (1, 16, 12, 16) and torch.isfinite(samples).all()
    if family.startswith("flux"):  # Flux dev's guidance is a model input; schnell has none
        assert torch.equal(sample(1.0, cfg), samples) is (family == "flux_schnell")
    vae = tiny.make_vae(family=family)
    assert vae.latent_channels == 16
    image = run_node(nodes.VAEDecode, vae=vae, samples={"samples": samples})[0]
    assert image.shape == (1, 96, 128, 3) and torch.isfinite(image).all()
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
