"""The procedural world (issue 16): scenes, captions, held-out splits, the detector, the fixed VAE, the world
model's checkpoint through Load Checkpoint, and the training script (a few batches)."""
import dataclasses
import io
import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import nodes
from harness import PACK_DIR, Server, get_json, pack_module, run_node

scenes = pack_module("world.scenes")
detector = pack_module("world.detector")
world_model = pack_module("world.model")
train = pack_module("world.train")
convert = pack_module("runner.workflow_convert")


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


def test_off_palette_pixels_are_specks_of_no_palette_colour_and_clean_renders_have_none():
    drawn = scenes.sample_scenes(14, 200, split="any")
    image, _ = scenes.render(drawn)
    noisy = image + np.random.default_rng(1).normal(0, 0.04, image.shape).astype(np.float32)
    drifted = image * 0.8 + np.asarray([0.2, 0.04, 0.04], np.float32)
    for variant in (image, noisy, drifted):  # anti-aliased edges are mixes of the background and their colour
        assert [detector.off_palette_pixels(picture) for picture in variant] == [0] * len(drawn)
    rng = np.random.default_rng(2)
    specked, counts = image[:20].copy(), []
    for picture in specked:
        count = int(rng.integers(1, 9))
        spots = rng.choice(scenes.GRID * scenes.GRID, count, replace=False)
        picture.reshape(-1, 3)[spots] = [(1.0, 0.0, 1.0), (0.0, 1.0, 1.0)][count % 2]  # magenta, cyan: on no mix
        counts.append(count)
    assert [detector.off_palette_pixels(picture) for picture in specked] == counts
    # the specks are read as background: the objects found stay the scene's
    assert [sorted(d.pair for d in f) for f in detector.detect_batch(specked)] == [_pairs(s) for s in drawn[:20]]
    big = np.repeat(np.repeat(specked[:2], 8, axis=1), 8, axis=2)  # a 256 px picture is read on the grid
    assert [detector.off_palette_pixels(picture) for picture in big] == counts[:2]


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
    assert [detector.off_palette_pixels(picture) for picture in decoded.numpy()] == [0] * len(drawn)


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


def test_frozen_text_encoder_stays_as_it_started_and_the_unet_trains():
    trainer = train.make_trainer(_config(freeze_text=True, shape_weight=0.05, shape_min_sigma=0.0))
    text = {k: v.clone() for k, v in trainer.clip.cond_stage_model.state_dict().items()}
    unet = {k: v.clone() for k, v in trainer.model.diffusion_model.state_dict().items()}
    trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not trained & {id(p) for p in trainer.clip.cond_stage_model.parameters()}
    for _ in range(2):
        train.step(trainer)
    assert all(torch.equal(v, text[k]) for k, v in trainer.clip.cond_stage_model.state_dict().items())
    assert any(not torch.equal(v, unet[k]) for k, v in trainer.model.diffusion_model.state_dict().items())


def test_eps_loss_weight_is_p2_and_weighs_the_objects():
    """P2's 1 / (1 + SNR)^gamma from SD1.x's alphas_cumprod (SNR = a / (1 - a)), and the object weight: mean
    1, the same on every background pixel, higher on an object and its one-pixel ring."""
    sampling = world_model.make_unet_model(0).model_sampling
    steps = torch.tensor([0, 250, 500, 999])
    sigma = sampling.sigmas[steps].float()
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2  # SD1.x's scaled linear
    alpha = torch.cumprod(1 - betas, 0)[steps].float()
    cover = torch.zeros(4, 3, 32, 32)
    for gamma in (0.5, 1.0):
        weight = train.eps_loss_weight(sigma, cover, p2_gamma=gamma)
        assert torch.allclose(weight[:, 0, 0, 0], (1 / (1 + alpha / (1 - alpha))) ** gamma, rtol=1e-4)
    assert torch.equal(train.eps_loss_weight(sigma, cover), torch.ones(4, 1, 32, 32))
    drawn = scenes.sample_scenes(3, 4, split="any")
    cover = torch.from_numpy(scenes.render(drawn)[1])
    weight = train.eps_loss_weight(sigma, cover, object_weight=4.0)[:, 0]
    assert abs(float(weight.mean()) - 1) < 1e-5
    on = torch.nn.functional.max_pool2d(cover.sum(1, keepdim=True).clamp(max=1), 3, 1, 1)[:, 0] > 0
    assert float(weight[~on].max()) == float(weight[~on].min()) < float(weight[on].min())
    ring = on & (cover.sum(1) == 0)
    assert ring.any() and float(weight[ring].min()) > float(weight[~on].max())


def test_shape_word_term_is_the_margin_on_a_wrong_shape_caption():
    """The term by hand: the EPS loss with another shape named, against the right caption's, through the hinge."""
    config = _config(freeze_text=True, shape_weight=1.0, shape_margin=0.1, shape_min_sigma=0.0)
    trainer = train.make_trainer(config)
    for _ in range(2):
        train.step(trainer)
    data = train.batch_data(trainer, 77)
    torch.manual_seed(0)
    x0 = data["latent"]
    timesteps = torch.tensor([800, 600, 400, 200])
    sigma = trainer.model.model_sampling.sigmas[timesteps].float()
    noise = torch.randn(x0.shape)
    x_in = (x0 + sigma.reshape(-1, 1, 1, 1) * noise) / torch.sqrt(1 + sigma.reshape(-1, 1, 1, 1) ** 2)
    one = torch.tensor([len(s.objects) == 1 for s in data["scenes"]]) & data["kept"]
    one[0] = True
    data["scenes"][0] = scenes.sample_scene(0, 0, pairs=[("red", "square")])
    data["tokens"][0] = world_model.tokenize(trainer.clip, ["a red square"])[0]
    diffusion_model = trainer.model.diffusion_model
    with torch.no_grad():
        eps = diffusion_model(x_in, timesteps.float(), context=world_model.encode_tokens(trainer.clip, data["tokens"]))
        term = train.shape_word_term(trainer, data, x_in, timesteps, sigma, eps, noise, one)
        expected = []
        for row in one.nonzero().flatten().tolist():
            colour, shape = data["scenes"][row].objects[0].pair
            wrong_shape = scenes.other_shape(shape, 1 + row % 2)  # the next, or the one after
            assert wrong_shape != shape
            wrong = scenes.caption([(colour, wrong_shape)])
            context = world_model.encode_tokens(trainer.clip, world_model.tokenize(trainer.clip, [wrong]))
            wrong_loss = ((diffusion_model(x_in[row:row + 1], timesteps[row:row + 1].float(), context=context)
                           - noise[row]) ** 2).mean()
            right = ((eps[row] - noise[row]) ** 2).mean()
            expected.append(torch.relu(0.1 - (wrong_loss - right) / right))
    assert torch.allclose(term, torch.stack(expected).mean(), rtol=1e-4), (term, expected)
    no_rows = torch.zeros_like(one)
    assert float(train.shape_word_term(trainer, data, x_in, timesteps, sigma, eps, noise, no_rows)) == 0.0


@pytest.mark.parametrize("value, parsed", [("true", True), ("False", False), ("1", True), ("off", False)])
def test_boolean_training_options_parse(value, parsed):
    assert train._flag(value) is parsed


def test_a_boolean_training_option_that_is_not_one_is_refused():
    with pytest.raises(SystemExit):
        train.main(["--out", "unused", "--freeze-text", "maybe"])


def _vae_shows_clean_renders(vae, seed):
    drawn = scenes.sample_scenes(seed, 3, split="any")
    image, _ = scenes.render(drawn)
    decoded = vae.decode(torch.from_numpy(scenes.rgb_to_latent(image)) / world_model.LATENT_SCALE).detach()
    assert [sorted(d.pair for d in f) for f in detector.detect_batch(decoded.numpy())] == [_pairs(s) for s in drawn]
    assert [detector.off_palette_pixels(picture) for picture in decoded.numpy()] == [0] * len(drawn)


@pytest.mark.parametrize("widths", [{}, {"model_channels": 32, "channel_mult": "1,3,3"}], ids=["shipped", "first"])
def test_checkpoint_loads_through_load_checkpoint_and_samples(tmp_path, widths):
    """At the shipped UNet widths and at the first world model's narrower ones (world/README.md): a saved checkpoint is detected and
    loaded by Load Checkpoint with its widths, and samples."""
    trainer = train.make_trainer(dataclasses.replace(_config(), **widths))
    train.step(trainer)
    train.save(trainer, tmp_path)
    path = tmp_path / train.CHECKPOINT_NAME
    assert path.stat().st_size < 25_000_000
    model, clip, vae = world_model.load_checkpoint(path)
    assert isinstance(model.model.model_config, world_model.WorldSD15)
    detected = model.model.model_config.unet_config
    assert (detected["model_channels"], tuple(detected["channel_mult"])) == \
        (trainer.model.diffusion_model.model_channels, tuple(trainer.model.diffusion_model.channel_mult))
    # the training defaults, make_unet_model's and the shipped checkpoint's widths are one: SHIPPED_WIDTHS
    expected_widths = world_model.FIRST_MODEL_WIDTHS if widths else world_model.SHIPPED_WIDTHS
    assert (detected["model_channels"], tuple(detected["channel_mult"])) == expected_widths
    default = world_model.make_unet_model().diffusion_model
    assert (default.model_channels, tuple(default.channel_mult)) == world_model.SHIPPED_WIDTHS
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


@pytest.mark.parametrize("model_channels, channel_mult", [(48, "1,2,2"), (64, "2,2,2"), (64, "1,x,2"), (64, "1,2")])
def test_unusable_unet_widths_are_refused_with_what_would_do(model_channels, channel_mult):
    with pytest.raises(ValueError, match="multiple of 32.*starting with 1"):
        train.make_trainer(dataclasses.replace(_config(), model_channels=model_channels, channel_mult=channel_mult))


SHIPPED = Path(train.PACK_DIR) / "world" / train.CHECKPOINT_NAME


@pytest.mark.skipif(not SHIPPED.is_file(), reason="no shipped world checkpoint")
def test_shipped_checkpoint_loads_and_shows_the_scene():
    assert SHIPPED.stat().st_size < 25_000_000
    model, clip, vae = world_model.load_checkpoint(SHIPPED)
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


# ---------------------------------------------------------------- the shipped example, where plain drops a subject

WORLD_EXAMPLE = Path(train.PACK_DIR) / "example_workflows" / "attend_and_excite_world.json"


def _example_case():
    """The example's prompt and subjects (its text node), as (colour, shape) pairs."""
    workflow = json.loads(WORLD_EXAMPLE.read_text())
    text, subjects = next(n["widgets_values"] for n in workflow["nodes"] if n["type"] == "AttnGuideTextEncode")
    pairs = [tuple(entry.strip().split()) for entry in subjects.split(",")]
    return workflow, text, pairs


def _judge(pictures: dict, pairs) -> dict:
    """prefix -> (every subject's shape present, every subject in its own colour), by the detector."""
    outcome = {}
    for prefix, picture in pictures.items():
        found = detector.detect(np.asarray(picture.convert("RGB"), dtype=np.float64) / 255.0)
        shapes = {d.shape for d in found}
        outcome[prefix] = (all(shape in shapes for _colour, shape in pairs),
                           all(pair in {d.pair for d in found} for pair in pairs))
    return outcome


@pytest.mark.skipif(not SHIPPED.is_file(), reason="no shipped world checkpoint")
def test_world_example_on_a_real_server_plain_drops_a_subject_and_guidance_brings_it_back(tmp_path):
    """ComfyUI's main.py with the pack, the shipped checkpoint in its checkpoints folders (through an
    extra_model_paths entry): Load Checkpoint loads it, the example runs as queued from the editor, and the
    detector reads its two saved pictures: the plain KSampler misses a subject for the example's seed, the
    Attention KSampler with A&E draws both objects in their own colours."""
    workflow, _text, pairs = _example_case()
    server = Server(tmp_path / "server", checkpoints=SHIPPED.parent).wait("AttnGuideKSampler")
    try:
        assert train.CHECKPOINT_NAME in get_json(f"{server.url}/object_info/CheckpointLoaderSimple")[
            "CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
        prompt = convert.to_api(workflow)
        request = urllib.request.Request(f"{server.url}/prompt", data=json.dumps({"prompt": prompt}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            prompt_id = json.loads(answer.read())["prompt_id"]
        deadline = time.monotonic() + 300
        while prompt_id not in (history := get_json(f"{server.url}/history/{prompt_id}")):
            assert time.monotonic() < deadline and server.process.poll() is None, server.log_path.read_text()[-3000:]
            time.sleep(0.5)
        entry = history[prompt_id]
        assert entry["status"]["status_str"] == "success", entry["status"]
        pictures = {}
        for output in entry["outputs"].values():
            for image in output.get("images", []):
                if image["type"] != "output":
                    continue
                query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
                with urllib.request.urlopen(f"{server.url}/view?{query}", timeout=30) as data:
                    pictures[image["filename"].rsplit("_", 2)[0]] = Image.open(io.BytesIO(data.read())).copy()
    finally:
        server.stop()
    assert set(pictures) == {"world_plain", "world_guided"} and pictures["world_plain"].size == (256, 256)
    outcome = _judge(pictures, pairs)
    assert not outcome["world_plain"][0], outcome  # a subject's shape is missing without guidance
    assert outcome["world_guided"] == (True, True), outcome
    # and the guided picture is not a broken one: no speck of a colour no object has
    assert {name: detector.off_palette_pixels(np.asarray(picture.convert("RGB"), dtype=np.float64) / 255.0)
            for name, picture in pictures.items()} == {"world_plain": 0, "world_guided": 0}


@pytest.mark.skipif(not SHIPPED.is_file(), reason="no shipped world checkpoint")
def test_run_demo_loads_the_world_model_for_its_example(tmp_path):
    """`run --demo` keeps the world example's checkpoint (the shipped model, not a random one), at the
    example's own settings and on one CPU thread whatever the machine's count (the guided picture depends on the
    summation order), and gives the pictures the real server gives."""
    _workflow, _text, pairs = _example_case()
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="2")  # a machine with more threads: the demo must pin one
    result = subprocess.run([sys.executable, "-m", PACK_DIR.name, "run", str(WORLD_EXAMPLE), "--demo", "--out",
                             str(out)], cwd=PACK_DIR.parent, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "RANDOM WEIGHTS" not in result.stdout and "the pack's own world model" in result.stdout
    assert "demo: 20 steps" not in result.stdout  # the trained model runs the workflow as saved
    assert "demo: 1 CPU thread" in result.stdout
    pictures = {p.name.rsplit("_", 2)[0]: Image.open(p).copy() for p in (out / "AttnGuide").glob("*.png")}
    outcome = _judge(pictures, pairs)
    assert not outcome["world_plain"][0] and outcome["world_guided"] == (True, True), outcome
