"""`python -m <pack> bench`: prompt sets, presets, the store, the embedded backend, real ComfyUI servers (two
sharing the work, one killed mid-run, one without the pack, a wrong URL), Ctrl-C and resume, CLIP metrics with a
tiny random CLIPModel, and `bench report`.

The servers are the host's main.py on loopback ports (--cpu), each with a private base directory in a temp
folder; the pack and the browser tests' tiny loader (tests/browser/tiny_nodes) come in through an
extra_model_paths YAML's custom_nodes entry, as in test_browser.py. Jobs are tiny: the random SD1.5-shaped model,
4 steps, 64x64 px, refinement capped at 2 iterations.
"""
from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from harness import HOST, PACK_DIR, Server, free_port, get_json, pack_module
from PIL import Image

cli = pack_module("runner.cli")
bench_prompts = pack_module("runner.bench.prompts")
bench_methods = pack_module("runner.bench.methods")
bench_metrics = pack_module("runner.bench.metrics")
bench_store = pack_module("runner.bench.store")
node_metrics = pack_module("nodes.metrics")
losses = pack_module("guidance.losses")

TINY_NODES = Path(__file__).resolve().parent / "browser" / "tiny_nodes"
LOADER = "AttnGuideTestTinySD15"
JOB_ARGS = ["--loader", LOADER, "--steps", "4", "--size", "64", "--guidance", "max_refinement_steps=2",
            "--progress-interval", "1"]
TWO_PROMPTS = ["--num-prompts", "2", "--seeds", "0-1", "--method", "plain", "--method", "A&E"]


# ---------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Two servers with the pack (a, b) and one without it (bare), started together. The last test kills a."""
    started = {"a": Server(tmp_path_factory.mktemp("server_a"), extra_nodes=[TINY_NODES]),
               "b": Server(tmp_path_factory.mktemp("server_b"), extra_nodes=[TINY_NODES]),
               "bare": Server(tmp_path_factory.mktemp("server_bare"), with_pack=False, extra_nodes=[TINY_NODES])}
    try:
        for server in started.values():
            server.wait(LOADER)
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def tiny_loader():
    """The servers' tiny loader node, loaded into this process too (same weights), as ComfyUI loads packs."""
    import nodes
    if LOADER not in nodes.NODE_CLASS_MAPPINGS:
        assert asyncio.run(nodes.load_custom_node(str(TINY_NODES)))
    return LOADER


def bench(*args) -> tuple[int, str]:
    """`python -m <pack> bench ...` in this process: (exit status, what it printed). One torch thread, as the
    servers run (OMP_NUM_THREADS=1): a guided step's sums in another thread count differ in their last bits,
    and the images of the two backends are compared exactly."""
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdout, sys.stderr, torch.get_num_threads()
    sys.stdout, sys.stderr = out, err
    torch.set_num_threads(1)
    try:
        code = cli.main(["bench", *args])
    finally:
        sys.stdout, sys.stderr = saved[:2]
        torch.set_num_threads(saved[2])
    return code, out.getvalue() + err.getvalue()


def rows(store: Path, sql: str, args=()) -> list[tuple]:
    with sqlite3.connect(store / "bench.sqlite") as db:
        return db.execute(sql, args).fetchall()


def results(store: Path) -> dict:
    """(prompt, seed, method) -> (pixels, metrics, attention JSON) of every done job."""
    out = {}
    for job_id, prompt, seed, method, image, attention in rows(
            store, "SELECT id, prompt, seed, method, image, attention FROM jobs WHERE state = 'done'"):
        with Image.open(store / image) as picture:
            pixels = np.asarray(picture.convert("RGB"))
        metrics = dict(rows(store, "SELECT name, value FROM metrics WHERE job_id = ?", (job_id,)))
        out[prompt, seed, method] = (pixels, metrics, json.loads(attention))
    return out


def done_once(store: Path) -> None:
    """Every job is done, by exactly one of its runs."""
    states = rows(store, "SELECT state, COUNT(*) FROM jobs GROUP BY state")
    assert dict(states).keys() == {"done"}, states
    per_job = rows(store, "SELECT job_id, COUNT(*) FROM runs WHERE outcome = 'done' GROUP BY job_id")
    assert len(per_job) == rows(store, "SELECT COUNT(*) FROM jobs")[0][0]
    assert {count for _job, count in per_job} == {1}, per_job


# ---------------------------------------------------------------- prompt sets, presets, metrics: no run

def test_default_prompt_set_is_the_papers_276_with_their_subjects():
    prompts, problems = bench_prompts.load_prompt_set()
    assert problems == [] and len(prompts) == 276
    counts = {c: sum(p.category == c for p in prompts) for c in ("animals", "animals_objects", "objects")}
    assert counts == {"animals": 66, "animals_objects": 144, "objects": 66}
    by_text = {p.text: p.subjects for p in prompts}
    assert by_text["an elephant and a rabbit"] == "elephant, rabbit"
    assert by_text["a horse with a glasses"] == "horse, glasses"
    assert by_text["a monkey and a red car"] == "monkey, red car"  # noun car, attribute red
    assert by_text["a pink crown and a purple bow"] == "pink crown, purple bow"
    assert "A&E" in bench_prompts.DEFAULT_PROMPTS.parent.joinpath("README.md").read_text().replace(
        "Attend-and-Excite", "A&E")
    picked = bench_prompts.pick(prompts, count=4)
    assert [p.category for p in picked] == ["animals", "animals_objects", "objects", "animals"]
    assert bench_prompts.parse_seeds("0-3,10,2") == [0, 1, 2, 3, 10] and len(bench_prompts.parse_seeds("0-63")) == 64
    with pytest.raises(ValueError, match="runs backwards"):
        bench_prompts.parse_seeds("5-1")


def test_prompt_lists_in_json_and_txt(tmp_path):
    listed = tmp_path / "mine.json"
    listed.write_text(json.dumps(["a cat and a frog", {"prompt": "a photo of a dog", "subjects": ["dog"],
                                                       "category": "pets"}, "a beautiful landscape", 7]))
    prompts, problems = bench_prompts.load_prompt_set(listed)
    assert [(p.text, p.subjects, p.category) for p in prompts] == [("a cat and a frog", "cat, frog", ""),
                                                                    ("a photo of a dog", "dog", "pets")]
    assert len(problems) == 2 and "cannot tell the subjects of 'a beautiful landscape'" in problems[0]
    assert "mine.json [3]" in problems[1]
    text = tmp_path / "mine.txt"
    text.write_text("# comment\na red car with a bench\n\na sunset over the sea | sunset, sea\na red car with a bench\n")
    prompts, problems = bench_prompts.load_prompt_set(text)
    assert [(p.text, p.subjects) for p in prompts] == [("a red car with a bench", "red car, bench"),
                                                       ("a sunset over the sea", "sunset, sea")]
    assert problems == ["mine.txt:5: 'a red car with a bench' is listed twice; kept once"]


def _catalog(extra_loss: str | None = None):
    """This process's node definitions, with an optional made-up loss weight on the Guidance node."""
    local = bench_methods.local_catalog()

    def lookup(class_type):
        spec = local.input_types(class_type)
        if class_type == bench_methods.GUIDANCE and extra_loss and spec:
            spec = json.loads(json.dumps(spec, default=str))
            spec["optional"][f"{extra_loss}_weight"] = ["FLOAT", {"default": 0.0}]
        return spec
    return bench_methods.NodeCatalog(lookup, "test")


def _settings(**changes):
    values = dict(loader={"class_type": LOADER, "inputs": {}}, steps=4, width=64, height=64)
    return bench_methods.RunSettings(**{**values, **changes})


def test_presets_come_from_the_guidance_nodes_losses():
    catalog = _catalog()
    names = bench_methods.preset_names(catalog)
    assert names[:4] == ["plain", "A&E", "A-STAR", "A&E+A-STAR"]
    assert set(losses.LOSSES) - {"attend_and_excite", "segregation", "retention"} <= set(names)
    settings = _settings()
    ae = bench_methods.build_method("ae", settings, catalog)
    guidance = ae.template["5"]["inputs"]
    defaults = catalog.defaults(bench_methods.GUIDANCE, ("required", "optional"))
    assert ae.name == "A&E" and guidance == {**defaults, **{f"{n}_weight": 0.0 for n in losses.LOSSES},
                                             "attend_and_excite_weight": 1.0}
    astar = bench_methods.build_method("A-STAR", settings, catalog).template["5"]["inputs"]
    assert (astar["segregation_weight"], astar["retention_weight"], astar["attend_and_excite_weight"],
            astar["guidance_end"], astar["refinement"]) == (1.0, 1.0, 0.0, 1.0, "")
    plain = bench_methods.build_method("plain", settings, catalog)
    assert "5" not in plain.template and "guidance" not in plain.template["6"]["inputs"]
    assert plain.render("a cat and a frog", "cat, frog", 9)["6"]["inputs"]["seed"] == 9
    assert plain.settings_hash != ae.settings_hash and plain.base_hash == ae.base_hash
    # a loss the node gains is a preset, with no change to the bench
    future = bench_methods.build_method("focus", settings, _catalog("focus"))
    assert future.template["5"]["inputs"]["focus_weight"] == 1.0 and "focus" in bench_methods.preset_names(
        _catalog("focus"))
    custom = bench_methods.build_method("mine: attend_and_excite=1; syngen=0.5; refinement=0.0:0.1, 0.5:0.5",
                                        settings, catalog)
    inputs = custom.template["5"]["inputs"]
    assert custom.name == "mine" and (inputs["syngen_weight"], inputs["refinement"]) == (0.5, "0.0:0.1, 0.5:0.5")
    with pytest.raises(bench_methods.MethodError, match="unknown method 'nope'; presets: plain, A&E"):
        bench_methods.build_method("nope", settings, catalog)
    with pytest.raises(bench_methods.MethodError, match="'scale' is neither a loss"):
        bench_methods.build_method("x: scale=3", settings, catalog)


def test_workflow_methods_are_marked_in_node_titles(tmp_path):
    workflow = json.loads((TINY_NODES.parent / "workflow_api.json").read_text())
    workflow["5"]["inputs"] = {"attend_and_excite_weight": 1.0}
    workflow["9"] = {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "x"},
                     "_meta": {"title": "Save #image"}}
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(workflow))
    method = bench_methods.build_method(str(path), _settings(steps=None), _catalog())
    assert method.name == "mine" and method.image_node == "9"
    assert sorted(method.slots) == [("2", "subjects", "subjects"), ("2", "text", "prompt"), ("6", "seed", "seed")]
    metrics = method.template[method.metrics_node]
    assert metrics["class_type"] == "AttnGuideMetrics" and metrics["inputs"]["attention"] == ["6", 1]
    graph = method.render("a cat and a frog", "cat, frog", 3)
    assert (graph["2"]["inputs"]["text"], graph["2"]["inputs"]["subjects"], graph["6"]["inputs"]["seed"]) == (
        "a cat and a frog", "cat, frog", 3)
    workflow["7b"] = {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}}
    workflow["9"]["_meta"]["title"] = "Save"
    path.write_text(json.dumps(workflow))
    with pytest.raises(bench_methods.MethodError, match="several image outputs .* mark the job's picture with #image"):
        bench_methods.build_method(f"other={path}", _settings(), _catalog())


def test_attention_metrics_on_a_record(sd15):
    """The node's numbers against a direct computation on the record's maps."""
    import nodes
    import torch
    from harness import run_node
    model, clip = sd15
    positive, subjects = run_node(pack_module("nodes.text_encode").AttentionTextEncode, clip=clip,
                                  text="a cat and a frog", subjects="cat, frog")
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    _, record = run_node(pack_module("nodes.sampler").AttentionKSampler, model=model, seed=1, steps=4, cfg=7.5,
                         sampler_name="euler", scheduler="normal", positive=positive, negative=negative,
                         latent_image={"samples": torch.zeros(1, 4, 8, 8)}, denoise=1.0, subjects=subjects,
                         attention_resolution=0, record_maps=True)
    metrics = node_metrics.attention_metrics(record, retention_from=0.25)[0]
    assert metrics["steps"] == [0, 1, 2, 3] and metrics["retention_steps"] == [1, 3]
    maps = losses.subject_attention_maps(record.grid_maps(3), record.subjects, record.resolution)
    assert metrics["min_peak"][-1] == pytest.approx(float(losses.max_attention_per_subject(maps).min()), rel=1e-6)
    smoothed = losses.smooth(maps)
    overlap = float(losses.segregation_loss(maps))  # one pair: the segregation term is the pair's soft IoU
    assert metrics["overlap"][-1] == pytest.approx(overlap, rel=1e-6) and 0 <= overlap <= 0.5
    assert 0 < metrics["retention"] <= 0.5 and smoothed.shape[1] == 2
    scalars = bench_metrics.attention_scalars(metrics)
    assert scalars["min_peak_half"] == metrics["min_peak"][1] and scalars["retention"] == metrics["retention"]
    output = node_metrics.AttentionMetrics.execute(record, 0.25)
    assert json.loads(output.args[0]) == [metrics] and output.ui["attention_metrics"] == [metrics]
    record.maps.clear()
    with pytest.raises(ValueError, match="enable record_maps"):
        node_metrics.attention_metrics(record)


# ---------------------------------------------------------------- runs

@pytest.fixture(scope="module")
def embedded_store(tmp_path_factory, tiny_loader):
    """2 prompts x 2 seeds x (plain, A&E), in this process."""
    store = tmp_path_factory.mktemp("embedded")
    code, log = bench("--out", str(store), *JOB_ARGS, *TWO_PROMPTS)
    assert code == 0, log
    return store, log


def test_embedded_backend_runs_every_job(embedded_store):
    store, log = embedded_store
    assert "8 jobs (2 prompts x 2 seeds x 2 methods): 0 already done, 8 to run on this process" in log
    done_once(store)
    for (prompt, seed, method), (pixels, metrics, attention) in results(store).items():
        assert pixels.shape == (64, 64, 3) and pixels.std() > 5
        assert set(metrics) == set(bench_metrics.ATTENTION_METRICS)
        assert 0 < metrics["min_peak"] <= 1 and 0 <= metrics["overlap"] <= 0.5 and 0 < metrics["retention"] <= 0.5
        assert attention["subjects"] == ["elephant", "rabbit"] if prompt.startswith("an elephant") else True
    # the same command again: nothing to do
    code, again = bench("--out", str(store), *JOB_ARGS, *TWO_PROMPTS)
    assert code == 0 and "8 already done, 0 to run" in again
    assert rows(store, "SELECT COUNT(*) FROM runs")[0][0] == 8


def test_a_workflow_method_runs(tiny_loader, tmp_path):
    workflow = json.loads((TINY_NODES.parent / "workflow_api.json").read_text())
    workflow["5"]["inputs"] = {**bench_methods.local_catalog().defaults(bench_methods.GUIDANCE),
                               "max_refinement_steps": 1}
    workflow["6"]["_meta"] = {"title": "sampler #seed"}
    path = tmp_path / "my_guided.json"
    path.write_text(json.dumps(workflow))
    store = tmp_path / "store"
    code, log = bench("--out", str(store), "--method", str(path), "--num-prompts", "1", "--seeds", "3",
                      "--progress-interval", "1")
    assert code == 0, log
    assert "method my_guided [" in log and "workflow my_guided.json" in log
    done_once(store)
    ((_prompt, seed, method), (pixels, metrics, attention)), = results(store).items()
    assert (seed, method, pixels.shape) == (3, "my_guided", (64, 64, 3))  # the workflow's own 64 px, 2 steps
    assert attention["total_steps"] == 2 and set(metrics) == set(bench_metrics.ATTENTION_METRICS)


def test_two_servers_share_the_jobs_and_match_the_embedded_results(servers, embedded_store, tmp_path):
    store = tmp_path / "two"
    code, log = bench("--out", str(store), *JOB_ARGS, *TWO_PROMPTS, "--server", servers["a"].url,
                      "--server", servers["b"].url)
    assert code == 0, log
    done_once(store)
    per_server = dict(rows(store, "SELECT backend, COUNT(*) FROM runs WHERE outcome = 'done' GROUP BY backend"))
    assert set(per_server) == {servers["a"].url[7:], servers["b"].url[7:]} and sum(per_server.values()) == 8
    assert "jobs/min" in log and "ETA" in log
    local, remote = results(embedded_store[0]), results(store)
    assert local.keys() == remote.keys()
    for key, (pixels, metrics, attention) in local.items():
        assert np.array_equal(pixels, remote[key][0]), key
        assert metrics == pytest.approx(remote[key][1], rel=1e-6, abs=1e-9), key
        assert attention["steps"] == remote[key][2]["steps"]
    # what the servers keep of ours: nothing in the queue, nothing in the history
    for server in (servers["a"], servers["b"]):
        queue = get_json(f"{server.url}/queue")
        assert queue["queue_running"] == [] and queue["queue_pending"] == []
        assert get_json(f"{server.url}/history") == {}


def _bench_process(*args) -> subprocess.Popen:
    env = dict(os.environ, COMFYUI_PATH=str(HOST), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    # SIGINT as a terminal's Ctrl-C meets it: a test run started in the background by a non-interactive shell
    # ignores SIGINT, its children inherit that, and Python then installs no KeyboardInterrupt handler at all
    return subprocess.Popen([sys.executable, "-m", PACK_DIR.name, "bench", *args], cwd=PACK_DIR.parent, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_ctrl_c_stops_cleanly_and_the_next_run_does_only_the_rest(servers, tmp_path):
    store = tmp_path / "interrupted"
    # 40 steps (a few seconds a job here): when Ctrl-C comes after the first job, the second runs, the third waits
    args = ["--out", str(store), *JOB_ARGS, "--steps", "40", "--num-prompts", "1", "--seeds", "0-2", "--method",
            "plain", "--server", servers["a"].url]
    process = _bench_process(*args)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if rows(store, "SELECT COUNT(*) FROM jobs WHERE state = 'done'")[0][0] >= 1:
                    break
            except sqlite3.Error:
                pass
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        log, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, log
    assert "stopping: cancelling the jobs in flight" in log and "run the same command again to resume" in log
    queue = get_json(f"{servers['a'].url}/queue")
    assert queue["queue_running"] == [] and queue["queue_pending"] == []  # ours deleted / interrupted
    states = dict(rows(store, "SELECT state, COUNT(*) FROM jobs GROUP BY state"))
    first_done = {job for (job,) in rows(store, "SELECT id FROM jobs WHERE state = 'done'")}
    assert "sent" not in states and 1 <= len(first_done) < 3, states
    ended = dict(rows(store, "SELECT outcome, COUNT(*) FROM runs GROUP BY outcome"))
    assert ended.keys() == {"done", "interrupted"}, rows(store, "SELECT * FROM runs")  # every run ended

    code, again = bench(*args)
    assert code == 0, again
    assert f"{len(first_done)} already done, {3 - len(first_done)} to run" in again
    done_once(store)
    for job in first_done:  # finished before Ctrl-C: never sent again
        assert rows(store, "SELECT COUNT(*) FROM runs WHERE job_id = ?", (job,))[0][0] == 1


def test_a_killed_bench_resumes_and_runs_no_job_twice(servers, tmp_path):
    """The bench process dies (SIGKILL) with jobs in a server's queue: the next run collects or follows them."""
    store = tmp_path / "crashed"
    args = ["--out", str(store), *JOB_ARGS, "--num-prompts", "1", "--seeds", "0-3", "--method", "A&E",
            "--server", servers["b"].url]
    process = _bench_process(*args)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                states = dict(rows(store, "SELECT state, COUNT(*) FROM jobs GROUP BY state"))
            except sqlite3.Error:
                states = {}
            if states.get("done", 0) >= 1 and states.get("sent", 0) >= 1:
                break
            time.sleep(0.02)
        process.kill()
        process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    in_flight = [job for (job,) in rows(store, "SELECT id FROM jobs WHERE state = 'sent'")]
    assert in_flight
    code, log = bench(*args)
    assert code == 0, log
    assert "resuming: " in log
    done_once(store)
    for job in in_flight:  # what the dead run had sent was collected or followed, not sent again
        assert rows(store, "SELECT COUNT(*) FROM runs WHERE job_id = ?", (job,))[0][0] == 1


def test_unusable_servers_and_unknown_subjects_are_reported_and_the_rest_runs(servers, tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"prompt": "a cat and a frog", "subjects": "cat, dog"},
                                   "a cat and a frog and a dog", "a bird and a bear"]))
    wrong = f"http://127.0.0.1:{free_port()}"
    code, log = bench("--out", str(tmp_path / "store"), *JOB_ARGS, "--prompts", str(prompts), "--seeds", "0-1",
                      "--method", "plain", "--server", servers["bare"].url, "--server", wrong,
                      "--server", servers["b"].url)
    assert code == 1, log
    assert (f"server {servers['bare'].url[7:]} (ComfyUI" in log and "the attention guidance pack is not installed"
            in log and "lacks AttnGuideTextEncode" in log)
    assert f"server {wrong[7:]}: cannot connect (nothing answers there)" in log
    assert "cannot tell the subjects of 'a cat and a frog and a dog'" in log
    assert "failed: 'a cat and a frog' seed 0 plain" in log and "'dog' is not in the prompt" in log
    assert "2 job(s) failed with" in log and "done: 2 of 4 jobs, 2 failed" in log
    store = tmp_path / "store"
    assert dict(rows(store, "SELECT prompt, COUNT(*) FROM jobs WHERE state = 'done' GROUP BY prompt")) == {
        "a bird and a bear": 2}
    code, log = bench("--out", str(store), *JOB_ARGS, "--seeds", "0", "--server", servers["bare"].url)
    assert code == 1 and "error: no usable server" in log


# ---------------------------------------------------------------- CLIP and the report

@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A CLIP model with random weights in transformers' format, with the SD1.5 tokenizer ComfyUI ships."""
    transformers = pytest.importorskip("transformers")
    import torch
    folder = tmp_path_factory.mktemp("tiny_clip")
    config = transformers.CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(folder)
    tokenizer_dir = HOST / "comfy" / "sd1_tokenizer"
    tokenizer = transformers.CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"))
    processor = transformers.CLIPProcessor(
        image_processor=transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                                        crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


def test_clip_metrics_with_a_tiny_random_clip(embedded_store, tiny_clip, tmp_path):
    store = tmp_path / "clip"
    shutil.copytree(embedded_store[0], store)
    code, log = bench("report", "--out", str(store), "--clip", str(tiny_clip))
    assert code == 0, log
    assert "CLIP: scored 8 stored image(s)" in log
    for _key, (_pixels, metrics, _attention) in results(store).items():
        for name in bench_metrics.CLIP_METRICS:
            assert -1.0 <= metrics[name] <= 1.0, (name, metrics)
        assert metrics["clip_min"] == min(metrics["clip_first"], metrics["clip_second"])
        assert len({round(metrics[n], 6) for n in ("clip_full", "clip_first", "clip_second")}) == 3
    scorer = bench_metrics.ClipScorer(tiny_clip, device="cpu")
    one = rows(store, "SELECT prompt, image FROM jobs LIMIT 1")[0]
    assert scorer.score(str(store / one[1]), one[0])["clip_full"] == pytest.approx(
        rows(store, "SELECT value FROM metrics WHERE name = 'clip_full' ORDER BY job_id LIMIT 1")[0][0], rel=1e-5)
    assert bench_metrics.template_texts("a cat")[0] == "a bad photo of a cat."  # 'a a cat' -> 'a cat'
    report = (store / "report" / "report.md").read_text()
    assert "### CLIP full-prompt similarity (`clip_full`" in report and "(`clip_min`" in report
    assert (store / "report" / "clip_min_vs_plain.png").is_file()
    code, again = bench("report", "--out", str(store), "--clip", str(tiny_clip))
    assert code == 0 and "CLIP: scored" not in again  # nothing left to score


def test_report_renders_table_plots_and_contact_sheets(embedded_store, tmp_path):
    out = tmp_path / "report"
    code, log = bench("report", "--out", str(embedded_store[0]), "--report-dir", str(out))
    assert code == 0, log
    text = (out / "report.md").read_text()
    assert "4 steps, 64x64 px" in text and "8 images: 2 prompts, 2 seeds, methods plain, A&E." in text
    assert "| method | animals (n) | animals_objects (n) | all (n) |" in text
    assert "Paired change against plain (same prompt and seed)" in text and "| A&E | " in text
    assert text.count("[") >= 10 and "/2]" in text and "/4]" in text  # [improved / pairs]
    for metric in bench_metrics.ATTENTION_METRICS:
        for name in (f"{metric}.png", f"{metric}_vs_plain.png"):
            with Image.open(out / name) as chart:
                assert chart.size[0] >= 600 and chart.size[1] == 480
                assert len(np.unique(np.asarray(chart.convert("RGB")).reshape(-1, 3), axis=0)) > 5
            assert f"]({name})" in text
    sheets = sorted(p.name for p in (out / "sheets").iterdir())
    assert sheets == ["a_horse_with_a_glasses.png", "an_elephant_and_a_rabbit.png"]
    with Image.open(out / "sheets" / sheets[0]) as sheet:
        assert sheet.size == (70 + 2 * 128 + 8, 30 + 24 + 2 * 128 + 8)
    code, log = bench("report", "--out", str(tmp_path / "nothing"))
    assert code == 1 and "no bench store" in log


# ---------------------------------------------------------------- last: a server dies

def test_a_server_killed_mid_run_loses_no_job(servers, tmp_path):
    """Runs last: it kills server a."""
    doomed = servers["a"]
    store = tmp_path / "killed"
    killed = threading.Event()

    def kill_after_its_first_job():
        # Killed while it holds a job: a server killed between jobs loses nothing and is never noticed, since the
        # other server can finish the queue first.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                done, held = rows(store, "SELECT TOTAL(outcome = 'done'), COUNT(*) - COUNT(ended_at) FROM runs "
                                  "WHERE backend = ?", (doomed.url[7:],))[0]
            except sqlite3.Error:
                done, held = 0, 0
            if done and held:
                doomed.kill()
                killed.set()
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_after_its_first_job, daemon=True)
    watcher.start()
    try:
        code, log = bench("--out", str(store), *JOB_ARGS, "--num-prompts", "2", "--seeds", "0-3", "--method",
                          "plain", "--server", doomed.url, "--server", servers["b"].url, "--dead-after", "2")
    finally:
        watcher.join(timeout=5)
    assert killed.is_set() and code == 0, log
    assert f"server {doomed.url[7:]} stopped answering" in log
    done_once(store)
    lost = rows(store, "SELECT job_id FROM runs WHERE backend = ? AND outcome = 'lost'", (doomed.url[7:],))
    assert lost, rows(store, "SELECT * FROM runs")
    for (job_id,) in lost:  # each job the dead server held was done once, by the other one
        assert rows(store, "SELECT backend FROM runs WHERE job_id = ? AND outcome = 'done'", (job_id,)) == [
            (servers["b"].url[7:],)]


def test_the_store_is_never_a_folder_of_custom_nodes(tmp_path):
    """ComfyUI imports every folder of custom_nodes/ as a node pack: the store goes to ComfyUI's output folder by
    default, and an --out directly in custom_nodes/ is refused."""
    bench_module = pack_module("runner.bench")
    assert bench_module.store_folder(None) == (HOST / "output" / "attn_guide_bench").resolve()
    assert bench_module.store_folder(str(tmp_path / "mine")) == (tmp_path / "mine").resolve()
    (tmp_path / "custom_nodes").mkdir()
    with pytest.raises(pack_module("runner.bench.run").BenchError, match="custom_nodes"):
        bench_module.store_folder(str(tmp_path / "custom_nodes" / "attn_guide_bench"))
