"""benchmarks/effect.py (issue 16): a small effect run on a world checkpoint completes, is reproducible, and its
plain row is KSampler's."""
import argparse
import dataclasses
import importlib.util
import sys

import pytest
import torch

import nodes
from harness import PACK_DIR, PACK_MODULE, pack_module, run_node

train = pack_module("world.train")
scenes = pack_module("world.scenes")


@pytest.fixture(scope="module")
def effect():
    spec = importlib.util.spec_from_file_location("attn_guide_effect", PACK_DIR / "benchmarks" / "effect.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module._PACK_MODULE = PACK_MODULE
    return module


FAMILY_CONFIG = {"sd15": {}, "sd3": {"family": "sd3", "depth": 1, "ground_log": True}}


@pytest.fixture(scope="module", params=list(FAMILY_CONFIG))
def checkpoint(request, tmp_path_factory):
    """A world checkpoint after a few training batches, of the UNet world model and of the DiT one (the shipped
    ones are used by the demo and the benchmark, not here)."""
    out = tmp_path_factory.mktemp("world")
    trainer = train.make_trainer(train.TrainConfig(batch_size=4, lr=2e-3, warmup=1, **FAMILY_CONFIG[request.param]))
    for _ in range(3):
        train.step(trainer)
    train.save(trainer, out)
    return out / train.CHECKPOINT_NAMES[request.param]


def _args(**changes):
    return argparse.Namespace(**{"steps": 3, "cfg": 7.5, "seeds": 2, **changes})


def test_small_effect_run_is_reproducible(effect, checkpoint, tmp_path):
    model, clip, vae = effect.load_world(checkpoint)
    methods = effect.method_configs(["plain", "attend_and_excite", "A-STAR"], max_refinement_steps=2)
    splits = {k: v[:2] for k, v in scenes.two_object_prompts().items()}
    first = effect.measure(model, clip, methods, splits, _args(), progress=False)
    second = effect.measure(model, clip, methods, splits, _args(), progress=False)
    for name in methods:
        images = first["results"][name]["images"]
        assert len(images) == 12  # 3 splits x 2 prompts x 2 images
        assert {k: (v["both"], v["shapes"], v["clean"], v["aae"]) for k, v in images.items()} == \
            {k: (v["both"], v["shapes"], v["clean"], v["aae"]) for k, v in second["results"][name]["images"].items()}
    for name in methods:
        assert torch.equal(torch.stack(first["grid_latents"][name]), torch.stack(second["grid_latents"][name]))
    guided = first["results"]["attend_and_excite"]["images"]
    assert all(v["aae"] is not None and 0.0 <= v["aae"][0] <= 1.0 for v in guided.values())
    text = effect.report(first["results"], splits, ["header"])
    assert "plain" in text and "held_out_pair" in text and "fixes" in text
    effect.save_grid(tmp_path / "grid.png", vae, first["grid_latents"], first["grid_labels"])
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_a_picture_with_off_palette_specks_counts_as_drawn_but_not_clean(effect):
    pair_a, pair_b = scenes.two_object_prompts()["seen"][0]
    drawn = [scenes.sample_scene(5, i, pairs=[pair_a, pair_b], split="any") for i in range(4)]
    image, _ = scenes.render(drawn)
    image[1, 0, 0] = image[3, 16, 20] = image[3, 16, 21] = (1.0, 0.0, 1.0)  # magenta specks
    latents = torch.from_numpy(scenes.rgb_to_latent(image)) / pack_module("world.model").LATENT_SCALE
    rows = effect.image_results(latents, pair_a, pair_b)
    assert [(r["both"], r["clean"]) for r in rows] == [(True, True), (True, False), (True, True), (True, False)]
    images = {("seen", 0, i): {**row, "seconds": 1.0, "aae": None} for i, row in enumerate(rows)}
    text = effect.report({"plain": {"images": images}}, {"seen": [(pair_a, pair_b)]}, ["header"])
    _, outcome, _ = effect.parse_row(next(line for line in text.splitlines() if line.startswith("plain ")))
    assert [value.split()[0] for value in outcome] == ["1.000", "1.000", "0.500", "0.500", "0", "0"]


def test_plain_row_is_ksampler(effect, checkpoint):
    model, clip, _ = effect.load_world(checkpoint)
    pair_a, pair_b = scenes.two_object_prompts()["seen"][0]
    latents, record, _ = effect.run_batch(model, clip, pair_a, pair_b, 0, 2, None, _args())
    (positive,) = run_node(nodes.CLIPTextEncode, clip=clip, text=scenes.caption([pair_a, pair_b]))[:1]
    (negative,) = run_node(nodes.CLIPTextEncode, clip=clip, text="")[:1]
    latent = {"samples": torch.zeros(2, 16 if checkpoint.name == train.CHECKPOINT_NAMES["sd3"] else 4, 32, 32)}
    (expected,) = run_node(nodes.KSampler, model=model, seed=0, steps=3, cfg=7.5, sampler_name="euler",
                           scheduler="normal", positive=positive, negative=negative, latent_image=latent, denoise=1.0)
    assert torch.equal(latents, expected["samples"])
    assert record.resolution == (16, 16) and len(record.steps) == 3


def test_initno_rows_run_the_initno_node_stage(effect, checkpoint):
    """The InitNO rows sample with the Attention InitNO node's settings (the paper's schedule), alone and before
    A&E; the stage runs (the record says how it ended), changes the noise, and the report's timing line says how
    often it succeeded."""
    methods = effect.method_configs(["plain", "InitNO", "InitNO + A&E"])
    defaults = pack_module("nodes.initno").AttentionInitNO.execute(rounds=5, iterations=10, final_iterations=50).args[0]
    assert methods["InitNO"] == effect.Method(None, defaults)
    assert methods["InitNO + A&E"].initno == defaults
    methods.update(effect.method_configs(["attend_and_excite"]))
    assert methods["InitNO + A&E"].guidance == methods["attend_and_excite"].guidance  # A&E's row's settings
    assert {k: w for k, w in methods["InitNO + A&E"].guidance.loss_weights.items() if w} == {"attend_and_excite": 1.0}
    model, clip, _ = effect.load_world(checkpoint)
    splits = {"seen": scenes.two_object_prompts()["seen"][:1]}
    measured = effect.measure(model, clip, {k: methods[k] for k in ("plain", "InitNO")}, splits, _args(),
                              progress=False)
    (run,) = measured["initno"]["InitNO"]
    assert run["history"] and len(run["history"]) <= 5 * 11 + 51  # rounds of 10 steps (+ the score read), then 50
    assert len(run["succeeded"]) == 2 and len(run["rounds"]) == 2  # per image of the batch
    assert all(run["succeeded"]) or len(run["history"]) == 5 * 11 + 51
    plain, initno = measured["grid_latents"]["plain"], measured["grid_latents"]["InitNO"]
    assert not torch.equal(torch.stack(plain), torch.stack(initno))
    assert effect.initno_line(measured).startswith(f"InitNO: InitNO succeeded for {sum(run['succeeded'])} of 2 images")


def test_set_parses_settings_other_than_the_papers(effect):
    """--set key=value: typed like the papers' default; the papers' own value is no change (the report's header
    calls the rest 'NOT the papers''); a wrong key or value is refused with what would do."""
    assert effect.parse_settings(["scale_factor=5", "exclude_padding=yes"]) == {"scale_factor": 5.0,
                                                                                  "exclude_padding": True}
    assert effect.parse_settings(["scale_factor=20"]) == {}
    with pytest.raises(SystemExit, match="key one of scale_factor"):
        effect.parse_settings(["step=5"])
    with pytest.raises(SystemExit, match="scale_factor takes a float"):
        effect.parse_settings(["scale_factor=big"])
    # the InitNO node's inputs too: they reach the InitNO rows only
    changed = effect.parse_settings(["initno_rounds=1", "initno_final_iterations=50", "scale_factor=10"])
    assert changed == {"initno_rounds": 1, "scale_factor": 10.0}
    with pytest.raises(SystemExit, match="initno_rounds takes a int"):
        effect.parse_settings(["initno_rounds=1.5"])
    methods = effect.method_configs(["InitNO", "InitNO + A&E", "attend_and_excite"], changed=changed)
    assert methods["InitNO"].initno.rounds == 1 and methods["InitNO + A&E"].initno.rounds == 1
    assert methods["InitNO"].initno.final_iterations == 50 and methods["attend_and_excite"].initno is None
    assert methods["InitNO + A&E"].guidance.scale_factor == 10.0 == methods["attend_and_excite"].guidance.scale_factor
    loose = effect.method_configs(["InitNO"], changed=effect.parse_settings(["initno_kl_bound=0.004"]))
    assert loose["InitNO"].initno.kl_bound == 0.004 and methods["InitNO"].initno.kl_bound == 0.001


def test_wilson_interval(effect):
    low, high = effect.wilson(29, 48)
    assert low == pytest.approx(0.4631, abs=1e-4) and high == pytest.approx(0.7298, abs=1e-4)
    assert effect.wilson(0, 10)[0] == 0.0 and effect.wilson(10, 10)[1] == pytest.approx(1.0)


def _world_diagnostics():
    benchmarks = str(PACK_DIR / "benchmarks")
    spec = importlib.util.spec_from_file_location("attn_guide_world_diagnostics", PACK_DIR / "benchmarks" / "world_diagnostics.py")
    diagnostics = importlib.util.module_from_spec(spec)
    sys.path.insert(0, benchmarks)  # it imports effect.py beside it
    try:
        spec.loader.exec_module(diagnostics)
    finally:
        sys.path.remove(benchmarks)
    diagnostics.effect._PACK_MODULE = PACK_MODULE  # the pack as the tests loaded it
    return diagnostics


def test_mcnemar_p_is_the_exact_two_sided_binomial_test(effect):
    from scipy.stats import binomtest
    for fixes, breaks in ((39, 18), (19, 18), (4, 34), (0, 3), (7, 0), (12, 12)):
        assert effect.mcnemar_p(fixes, breaks) == pytest.approx(binomtest(fixes, fixes + breaks).pvalue, rel=1e-9)
    assert effect.mcnemar_p(0, 0) == 1.0


def test_attention_spread_reads_the_mmdits_image_attention(effect):
    """world_diagnostics' attention spread: wide (about uniform's 8.4 tokens) for the generic start, a few tokens
    and widening head by head for the local start (world.dit.local_attention_init_); the text's share; the x0
    error of a fresh MMDiT (its output is 0, so its x0 is the noisy input) is sigma x RMS(noise - x0), by hand."""
    diagnostics = _world_diagnostics()
    dit = pack_module("world.dit")
    scenes = pack_module("world.scenes")
    clip = dit.make_clip(1)
    cache = dit.TextCache(clip)
    found = {local: diagnostics.attention_spread(dit.make_model(0, 3, local).diffusion_model, cache, 0.5, count=2)
             for local in (0.0, 8.0)}
    assert len(found[0.0]["spread"]) == 3 and all(min(heads) > 7.5 for heads in found[0.0]["spread"])
    for heads in found[8.0]["spread"]:
        assert max(heads) < 5.0 and heads == sorted(heads)
    assert all(0.05 < share < 0.95 for heads in found[0.0]["text"] for share in heads), found[0.0]["text"]
    assert all(0.0 <= share <= 1.0 for heads in found[8.0]["text"] for share in heads)
    drawn = scenes.sample_scenes(0, 2, split="any")
    x0 = torch.from_numpy(scenes.rgb_to_latent(scenes.render(drawn)[0]))[:, :3]
    noise = torch.randn(2, 16, 32, 32, generator=torch.Generator().manual_seed(0))[:, :3]
    expected = float((0.5 * (noise - x0)).pow(2).mean().sqrt())
    assert found[0.0]["x0_error"] == pytest.approx(expected, rel=1e-5)


def test_picture_sizes_read_what_the_renders_hold(effect):
    """world_diagnostics --sizes: objects per picture, their area and the share not background, on renders whose
    objects are known (the area against the render's own coverage), and on pictures with objects twice as wide."""
    diagnostics = _world_diagnostics()
    drawn = scenes.sample_scenes(3, 60, split="any")
    image, cover = scenes.render(drawn)
    sizes = diagnostics.picture_sizes(image)
    assert sizes["objects"] == pytest.approx(sum(len(s.objects) for s in drawn) / len(drawn))
    drawn_pixels = (cover.sum(1) >= 0.5).sum(axis=(1, 2))           # what the colour labels take as object
    assert sizes["area"] == pytest.approx(drawn_pixels.sum() / sum(len(s.objects) for s in drawn), rel=0.02)
    assert sizes["covered"] == pytest.approx(float(drawn_pixels.mean()) / scenes.GRID ** 2, rel=0.02)
    one = [s for s in drawn if len(s.objects) == 1][:10]
    wide = [dataclasses.replace(s, objects=tuple(dataclasses.replace(o, cx=16.0, cy=16.0, half=o.half * 1.9)
                                                 for o in s.objects)) for s in one]
    assert diagnostics.picture_sizes(scenes.render(wide)[0])["area"] > 3 * diagnostics.picture_sizes(
        scenes.render(one)[0])["area"]


def test_dc_gain_measures_whether_the_noise_mean_is_predicted(effect):
    """benchmarks/world_diagnostics.py's DC gain: 1 for a denoiser that predicts a blank scene's noise exactly, 0 for one
    that predicts it without its spatial mean (what a first UNet level with one channel per GroupNorm group does),
    0.5 for half the mean."""
    diagnostics = _world_diagnostics()
    sampling = pack_module("world.model").make_unet_model().model_sampling

    def denoiser(mean_kept):
        def predict(x_in, timestep, context):
            sigma = sampling.sigma(timestep).reshape(-1, 1, 1, 1)
            eps = x_in * (1 + sigma ** 2) ** 0.5 / sigma   # a blank scene: x = sigma * eps
            mean = eps.mean((2, 3), keepdim=True)
            return eps - (1 - mean_kept) * mean
        return predict

    context = torch.zeros(1, 77, 64)
    for kept in (1.0, 0.5, 0.0):
        gains = diagnostics.dc_gain(denoiser(kept), sampling, context)
        assert len(gains) == 3 and max(gains) == pytest.approx(float(sampling.sigma_max), abs=0.01)
        # (the schedule's sigma -> timestep -> sigma round trip is exact to about 1e-3)
        assert all(g == pytest.approx(kept, abs=5e-3) for g in gains.values()), gains


def test_reports_of_method_shares_join_into_the_one_table(effect, checkpoint):
    """The full table runs as several processes, each plain and a share of the methods: the joined reports give
    the rows a single run gives (all but the timing), and reports whose plain differs are refused."""
    model, clip, _ = effect.load_world(checkpoint)
    splits = {k: v[:1] for k, v in scenes.two_object_prompts().items()}

    def report(names, **changes):
        methods = effect.method_configs(names, max_refinement_steps=2)
        args = _args(ckpt=checkpoint, max_refinement=2, **changes)
        measured = effect.measure(model, clip, methods, splits, args, progress=False)
        header = [*effect.settings_lines(args, {}), "torch; wall time 1 s", effect.plain_line(measured)]
        return effect.report(measured["results"], splits, header)

    def rows(text):  # split title -> method -> its columns without s/img
        _, sections = effect._sections(text)
        return {s[0]: {name: outcome + rest[1:] for name, outcome, rest in map(effect.parse_row, s[2:])}
                for s in sections}

    def rows_by_name(text):  # the `all` split's rows
        _, sections = effect._sections(text)
        return {row[0]: row for row in map(effect.parse_row, sections[0][2:])}

    whole = report(["plain", "attend_and_excite", "A-STAR"])
    excite, star = report(["plain", "attend_and_excite"]), report(["plain", "A-STAR"])
    joined = effect.join_reports([excite, star])
    assert rows(joined) == rows(whole) and len(rows(whole)) == 4  # all + 3 splits
    assert "joined with another process's report (wall time 1 s)" in joined
    # a joined table joins again (a method added later), keeping the lines of its earlier joins
    again = effect.join_reports([effect.join_reports([excite, excite]), star])
    assert rows(again) == rows(whole) and again.count("joined with another process's report") == 2
    with pytest.raises(ValueError, match="not the same run settings"):
        effect.join_reports([whole, report(["plain", "A-STAR"], cfg=2.0)])
    lines = whole.splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("plain "))
    tokens = lines[row].split()
    tokens[4] = "0.999" if tokens[4] != "0.999" else "0.998"  # plain's 'both' rate
    lines[row] = f"{'plain':<{effect.NAME_WIDTH}} " + " ".join(tokens[1:])
    with pytest.raises(ValueError, match="plain differs"):
        effect.join_reports([whole, "\n".join(lines)])
    # a method measured again replaces its rows: refused while the old ones are in, joined once they are dropped
    lines = star.splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("A-STAR "))
    tokens = lines[row].split()
    tokens[4] = "0.999" if tokens[4] != "0.999" else "0.998"
    lines[row] = f"{'A-STAR':<{effect.NAME_WIDTH}} " + " ".join(tokens[1:])
    remeasured = "\n".join(lines)
    with pytest.raises(ValueError, match="A-STAR differs.*--drop 'A-STAR'"):
        effect.join_reports([whole, remeasured])
    replaced = effect.join_reports([effect.drop_method(whole, "A-STAR"), remeasured])
    assert rows(replaced) != rows(whole) and "rows of an earlier measurement dropped: A-STAR" in replaced
    assert {s: {n: r for n, r in m.items() if n != "A-STAR"} for s, m in rows(replaced).items()} == \
        {s: {n: r for n, r in m.items() if n != "A-STAR"} for s, m in rows(whole).items()}
    # the README's markdown: the `all` rates, the held-out splits' `both`
    table = effect.markdown_table(joined).splitlines()
    assert table[0].startswith("| method | shapes | both | clean | both + clean | fixes / breaks (p) |")
    assert [line.split(" | ")[0] for line in table[2:]] == ["| plain", "| attend_and_excite", "| A-STAR"]
    for line in table[2:]:
        cells = line.strip("| ").split(" | ")
        name, outcome, rest = rows_by_name(joined)[cells[0]]
        assert cells[1:5] == [outcome[0], f"**{outcome[1]}**", *outcome[2:4]] and cells[8] == rest[0]
        assert cells[5] == "-" if name == "plain" else cells[5].startswith(f"{outcome[4]} / {outcome[5]} (")
    # a report from before the clean columns joins with "-" in them; plain keeps the row that measured them
    earlier = effect.join_reports([_earlier_layout(effect, excite), star])
    expected = rows(whole)
    for methods in expected.values():
        methods["attend_and_excite"][2:4] = ["-", "-"]
    assert rows(earlier) == expected
    assert rows(effect.join_reports([star, _earlier_layout(effect, excite)])) == expected
    lines = _earlier_layout(effect, excite).splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("plain "))
    tokens = lines[row].split()
    tokens[4] = "0.999" if tokens[4] != "0.999" else "0.998"
    lines[row] = f"{'plain':<{effect.NAME_WIDTH}} " + " ".join(tokens[1:])
    with pytest.raises(ValueError, match="plain differs"):
        effect.join_reports([star, "\n".join(lines)])
    for name in ("plain", "InitNO"):
        with pytest.raises(ValueError, match="cannot drop .*'A-STAR', 'attend_and_excite'"):
            effect.drop_method(whole, name)
    header = (f"{effect.JOINED} (wall time 9 s; InitNO: InitNO succeeded for 1 of 8 images, kept response 0.5, "
              "conflict 0.4 (mean over images; success: below 0.2 and 0.3); InitNO + A&E: InitNO succeeded for 2 of "
              "8 images, kept response 0.4, conflict 0.3 (mean over images; success: below 0.2 and 0.3))")
    for name, kept in (("InitNO", "; InitNO + A&E: InitNO succeeded for 2"), ("InitNO + A&E", "; InitNO: InitNO")):
        renamed = [f"{name:<{effect.NAME_WIDTH}}" + line[effect.NAME_WIDTH:] if line.startswith("A-STAR ") else line
                   for line in whole.split("\n\n", 1)[1].splitlines()]
        text = header + "\n\n" + "\n".join(renamed)
        dropped = effect.drop_method(text, name).splitlines()[0]
        assert kept in dropped and dropped.endswith(")") and f"; {name}: " not in dropped


def _earlier_layout(effect, text: str) -> str:
    """The report as effect.py wrote it before the clean columns: shapes, both, fixes, breaks, s/img, A&E loss."""
    header, sections = effect._sections(text)
    blocks = [header]
    for section in sections:
        block = [section[0], f"{'method':<{effect.NAME_WIDTH}} {'shapes':>20} {'both (own colours)':>20} {'fixes':>5} "
                             f"{'breaks':>6} {'s/img':>6} {'A&E loss first->last':>21}"]
        for line in section[2:]:
            name, outcome, rest = effect.parse_row(line)
            block.append(f"{name:<{effect.NAME_WIDTH}} {outcome[0]:>20} {outcome[1]:>20} {outcome[4]:>5} "
                         f"{outcome[5]:>6} {float(rest[0]):>6.2f} {' '.join(rest[1:]):>21}")
        blocks.append(block)
    return "\n\n".join("\n".join(block) for block in blocks)
