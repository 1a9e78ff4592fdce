"""The procedural world (issue 16): scenes, captions, held-out splits, the detector, the fixed VAE, the world
model's checkpoint through Load Checkpoint, and the training script (a few batches)."""
import copy
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch

import folder_paths
import nodes
from harness import pack_module, run_node

scenes = pack_module("world.scenes")
detector = pack_module("world.detector")
world_model = pack_module("world.model")
train = pack_module("world.train")


def _pairs(scene):
    return sorted(obj.pair for obj in scene.objects)


# ---------------------------------------------------------------- scenes, captions, splits

def test_scenes_are_deterministic_for_a_seed():
    first = scenes.sample_scenes(7, 200)
    assert first == scenes.sample_scenes(7, 200)
    assert [s.caption for s in first] == [s.caption for s in scenes.sample_scenes(7, 200)]
    assert first[50:60] == scenes.sample_scenes(7, 10, start=50)  # a scene depends on (seed, index) only
    assert first != scenes.sample_scenes(8, 200)
    image, cover = scenes.render(first[:20])
    again, cover_again = scenes.render(scenes.sample_scenes(7, 20))
    assert np.array_equal(image, again) and np.array_equal(cover, cover_again)


def test_scenes_follow_the_world_rules():
    drawn = scenes.sample_scenes(0, 2000, split="any")
    counts = {n: sum(len(s.objects) == n for s in drawn) for n in (1, 2, 3)}
    assert all(counts[n] > 50 for n in counts), counts
    for scene in drawn:
        objects = scene.objects
        assert len({o.colour for o in objects}) == len(objects) and len({o.shape for o in objects}) == len(objects)
        for o in objects:
            assert scenes.MIN_HALF <= o.half <= scenes.MAX_HALF
            assert scenes.MARGIN + o.half - 1e-9 <= o.cx <= scenes.GRID - scenes.MARGIN - o.half + 1e-9
        for a, b in combinations(objects, 2):  # bounding boxes apart: no overlap, no touching
            gap = scenes.MIN_GAP + a.half + b.half
            assert abs(a.cx - b.cx) >= gap or abs(a.cy - b.cy) >= gap
    assert {o.colour for s in drawn for o in s.objects} == set(scenes.COLOURS)
    assert {o.shape for s in drawn for o in s.objects} == set(scenes.SHAPES)


def test_training_scenes_hold_out_pairs_and_combinations():
    drawn = scenes.sample_scenes(3, 3000)
    for scene in drawn:
        pairs = [o.pair for o in scene.objects]
        assert not set(pairs) & scenes.HELD_OUT_PAIRS
        assert not any(frozenset(two) in scenes.HELD_OUT_COMBOS for two in combinations(pairs, 2))
    splits = scenes.two_object_prompts()
    assert splits == scenes.two_object_prompts()
    assert {k: len(v) for k, v in splits.items()} == {"seen": 21, "held_out_combo": 4, "held_out_pair": 11}
    assert not set(splits["seen"]) & set(splits["held_out_combo"])
    for a, b in splits["held_out_combo"]:
        assert a not in scenes.HELD_OUT_PAIRS and b not in scenes.HELD_OUT_PAIRS
    seen_combos = {frozenset(two) for s in drawn for two in combinations([o.pair for o in s.objects], 2)}
    assert {frozenset(p) for p in splits["seen"]} <= seen_combos  # every seen prompt occurs in training


def test_captions_and_token_positions_match_the_clip_tokenizer():
    clip = world_model.make_clip()
    vocab = clip.tokenizer.clip_l.tokenizer.get_vocab()
    assert scenes.caption([("red", "circle"), ("blue", "square")]) == "a red circle and a blue square"
    for scene in scenes.sample_scenes(1, 60, split="any"):
        tokens = world_model.tokenize(clip, [scene.caption])[0]
        for obj, (colour_at, shape_at) in zip(scene.objects, scene.token_positions()):
            assert int(tokens[colour_at]) == vocab[obj.colour + "</w>"], scene.caption
            assert int(tokens[shape_at]) == vocab[obj.shape + "</w>"], scene.caption


# ---------------------------------------------------------------- detector

def test_detector_is_exact_on_1000_clean_renders():
    drawn = scenes.sample_scenes(11, 1000, split="any")
    image, _ = scenes.render(drawn)
    found = detector.detect_batch(image)
    wrong = [(s.caption, [d.pair for d in f]) for s, f in zip(drawn, found) if sorted(d.pair for d in f) != _pairs(s)]
    assert not wrong, wrong[:5]


def test_detector_finds_the_background_first():
    drawn = scenes.sample_scenes(12, 40, split="any")
    image, _ = scenes.render(drawn)
    drifted = image * 0.8 + np.asarray([0.2, 0.04, 0.04], np.float32)  # background (and all) drifts towards red
    noisy = image + np.random.default_rng(0).normal(0, 0.04, image.shape).astype(np.float32)  # speckle
    empty = np.broadcast_to(np.asarray([0.75, 0.4, 0.4], np.float32), image.shape)  # a reddish background only
    for variant in (drifted, noisy):
        assert [sorted(d.pair for d in f) for f in detector.detect_batch(variant)] == [_pairs(s) for s in drawn]
    assert all(f == [] for f in detector.detect_batch(empty))
    big = np.repeat(np.repeat(image[:3], 8, axis=1), 8, axis=2)  # a 256 px picture is read on the grid
    assert [sorted(d.pair for d in f) for f in detector.detect_batch(big)] == [_pairs(s) for s in drawn[:3]]


# ---------------------------------------------------------------- the fixed VAE

def test_vae_round_trip_shows_the_scene():
    vae = world_model.make_vae()
    drawn = scenes.sample_scenes(13, 6, split="any")
    image, _ = scenes.render(drawn)
    pixels = torch.from_numpy(np.repeat(np.repeat(image, 8, axis=1), 8, axis=2))
    latent = vae.encode(pixels)
    expected = torch.from_numpy(scenes.rgb_to_latent(image)) / world_model.LATENT_SCALE
    assert torch.allclose(latent, expected, atol=1e-3)
    decoded = vae.decode(latent)
    assert decoded.shape == pixels.shape and (decoded - pixels).abs().max() < 1e-3
    assert [sorted(d.pair for d in f) for f in detector.detect_batch(decoded.numpy())] == [_pairs(s) for s in drawn]


# ---------------------------------------------------------------- training and the checkpoint

def _config(**changes):
    return train.TrainConfig(**{"batch_size": 4, "lr": 2e-3, "warmup": 1, **changes})


def test_training_runs_loss_falls_and_a_save_resumes(tmp_path):
    trainer = train.make_trainer(_config())
    probe_batch = 10_000
    data = train.batch_data(trainer, probe_batch)
    with torch.no_grad():
        before = float(train.losses(trainer, data, probe_batch)["diffusion"])
    for _ in range(6):
        train.step(trainer)
    with torch.no_grad():
        after = float(train.losses(trainer, data, probe_batch)["diffusion"])
    assert after < before * 0.9, (before, after)
    assert all(np.isfinite(list(v.values())).all() for v in trainer.log)

    out = tmp_path / "run"
    train.save(trainer, out)
    resumed = train.load(out)
    assert resumed.batch == 6 and resumed.log == trainer.log
    train.step(trainer)
    train.step(resumed)
    assert trainer.log[-1] == resumed.log[-1]
    for a, b in zip(trainer.parameters, resumed.parameters):
        assert torch.equal(a, b)
    # the command line carries on from the last save
    train.main(["--out", str(out), "--batches", "8", "--threads", "1"])
    assert train.load(out).batch == 8


def _load_checkpoint(path):
    world_model.register()
    saved = copy.deepcopy(folder_paths.folder_names_and_paths["checkpoints"])
    try:
        folder_paths.add_model_folder_path("checkpoints", str(path.parent))
        folder_paths.filename_list_cache.pop("checkpoints", None)
        return run_node(nodes.CheckpointLoaderSimple, ckpt_name=path.name)[:3]
    finally:
        folder_paths.folder_names_and_paths["checkpoints"] = saved
        folder_paths.filename_list_cache.pop("checkpoints", None)


def _vae_shows_clean_renders(vae, seed):
    drawn = scenes.sample_scenes(seed, 3, split="any")
    image, _ = scenes.render(drawn)
    decoded = vae.decode(torch.from_numpy(scenes.rgb_to_latent(image)) / world_model.LATENT_SCALE).detach()
    assert [sorted(d.pair for d in f) for f in detector.detect_batch(decoded.numpy())] == [_pairs(s) for s in drawn]


def test_checkpoint_loads_through_load_checkpoint_and_samples(tmp_path):
    trainer = train.make_trainer(_config())
    train.step(trainer)
    train.save(trainer, tmp_path)
    path = tmp_path / train.CHECKPOINT_NAME
    assert path.stat().st_size < 25_000_000
    model, clip, vae = _load_checkpoint(path)
    assert isinstance(model.model.model_config, world_model.WorldSD15)
    unet = model.model.diffusion_model.state_dict()
    for name, value in trainer.model.diffusion_model.state_dict().items():
        assert torch.allclose(unet[name].float(), value.half().float()), name
    (positive,) = run_node(nodes.CLIPTextEncode, clip=clip, text="a red circle and a blue square")[:1]
    (negative,) = run_node(nodes.CLIPTextEncode, clip=clip, text="")[:1]
    expected = world_model.encode_tokens(trainer.clip, world_model.tokenize(trainer.clip, ["a red circle and a blue square"]))
    assert torch.allclose(positive[0][0].float(), expected.detach(), atol=2e-2)
    (latent,) = run_node(nodes.EmptyLatentImage, width=256, height=256, batch_size=1)
    (sampled,) = run_node(nodes.KSampler, model=model, seed=0, steps=2, cfg=7.5, sampler_name="euler",
                          scheduler="normal", positive=positive, negative=negative, latent_image=latent, denoise=1.0)
    assert sampled["samples"].shape == (1, 4, 32, 32) and torch.isfinite(sampled["samples"]).all()
    (picture,) = run_node(nodes.VAEDecode, vae=vae, samples=sampled)
    assert picture.shape == (1, 256, 256, 3)
    _vae_shows_clean_renders(vae, 14)


SHIPPED = Path(train.PACK_DIR) / "world" / train.CHECKPOINT_NAME


@pytest.mark.skipif(not SHIPPED.is_file(), reason="no shipped world checkpoint")
def test_shipped_checkpoint_loads_and_shows_the_scene():
    assert SHIPPED.stat().st_size < 25_000_000
    model, clip, vae = _load_checkpoint(SHIPPED)
    assert isinstance(model.model.model_config, world_model.WorldSD15)
    _vae_shows_clean_renders(vae, 15)
    (positive,) = run_node(nodes.CLIPTextEncode, clip=clip, text="a red circle")[:1]
    (latent,) = run_node(nodes.EmptyLatentImage, width=256, height=256, batch_size=1)
    (sampled,) = run_node(nodes.KSampler, model=model, seed=0, steps=2, cfg=1.0, sampler_name="euler",
                          scheduler="normal", positive=positive, negative=positive, latent_image=latent, denoise=1.0)
    assert torch.isfinite(sampled["samples"]).all()


@pytest.mark.parametrize("text", ["a red circle and a blue square", ""])
def test_training_text_forward_equals_comfyui_encoder(text):
    clip = world_model.make_clip(5)
    ours = world_model.encode_tokens(clip, world_model.tokenize(clip, [text]))
    theirs = clip.encode_from_tokens(clip.tokenize(text))
    assert torch.allclose(ours, theirs.float(), atol=1e-5)
