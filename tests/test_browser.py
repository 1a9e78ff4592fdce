"""The token picker: its route (POST /attn_guide/tokenize) and the picker in a real browser.

The first tests call the route's code and its aiohttp handler in-process with ComfyUI's shipped
tokenizer. The browser tests start the real ComfyUI server (main.py of the host, on loopback, --cpu)
with the pack installed through an extra_model_paths YAML's custom_nodes entry, drive headless
Chromium through both node renderers (classic LiteGraph canvas and Vue "Nodes 2.0"), click tokens,
type, queue the prompt and wait for it in /history. They skip where /usr/bin/chromium is absent
(`.ci/install-browser.sh` installs it and playwright).

Set ATTN_GUIDE_SCREENSHOTS=<dir> to keep the screenshots the browser tests take.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import HOST, PACK_DIR, pack_module

routes = pack_module("text.server_routes")
subjects = pack_module("text.subjects")
clip_tokens = pack_module("text.clip_tokens")

CHROMIUM = Path("/usr/bin/chromium")
BROWSER_DIR = Path(__file__).resolve().parent / "browser"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
PROMPT = "a photo of a cat and a tiramisu"


def content_tokens(answer):
    return [t for chunk in answer["chunks"] for t in chunk["tokens"] if not t["special"]]


# --- the route's answer, in-process ------------------------------------------------------------------

def test_tokens_are_the_encoders_tokens_with_global_positions():
    answer = routes.tokenize_response(PROMPT, "cat")
    tokenizer = routes.shipped_tokenizer()
    prompt = clip_tokens.tokenize_prompt(tokenizer.clip_l, PROMPT)
    assert answer["chunk_length"] == 77 and answer["num_tokens"] == 77 and len(answer["chunks"]) == 1
    tokens = answer["chunks"][0]["tokens"]
    assert [t["position"] for t in tokens] == list(range(77))
    assert [t["kind"] for t in tokens[:12]] == ["start"] + ["word"] * 10 + ["end"]
    assert {t["kind"] for t in tokens[12:]} == {"padding"} and answer["chunks"][0]["end_position"] == 11
    assert [t["text"] for t in tokens[1:11]] == ["a", "photo", "of", "a", "cat", "and", "a", "ti", "ram", "isu"]
    assert [t["text"] for t in tokens[1:11]] == list(prompt.words[0][1:11])  # the pack's own decoding
    # tiramisu is three word pieces: each knows its word and the pieces' positions
    assert {t["position"]: (t["word"], t["word_positions"]) for t in tokens[8:11]} == {
        8: ("tiramisu", [8, 9, 10]), 9: ("tiramisu", [8, 9, 10]), 10: ("tiramisu", [8, 9, 10])}
    assert answer["subjects"] == [{"entry": "cat", "positions": [5], "noun": {"word": "cat", "positions": [5]},
                                   "attributes": [], "error": None}]


def test_long_prompt_positions_continue_across_77_token_chunks():
    text = " ".join(["cat"] * 80) + " frog"
    answer = routes.tokenize_response(text, "frog")
    assert len(answer["chunks"]) == 2 and answer["num_tokens"] == 154
    second = answer["chunks"][1]["tokens"]
    assert second[0]["position"] == 77 and second[0]["kind"] == "start"
    words = [t for t in second if not t["special"]]
    # 80 cats + frog = 81 content tokens; the first chunk holds 75 of them
    assert [t["text"] for t in words] == ["cat"] * 5 + ["frog"] and words[0]["position"] == 78
    assert [(s["entry"], s["positions"]) for s in answer["subjects"]] == [("frog", [83])]
    assert subjects.resolve_subjects(routes.shipped_tokenizer(), text, "frog").subjects[0].token_positions == (83,)


@pytest.mark.parametrize("text", [
    PROMPT,
    "a tomcat and a cat",                   # 'cat' alone first matches the tail of 'tomcat' (tom|cat)
    "a cat, a (red cat:1.2); 2 cats and a cat",
    "café au lait, a café and a housecat next to the house",
    " ".join(f"w{i} cat" for i in range(50)),  # two chunks
])
def test_a_click_picks_what_the_node_resolves_to_these_tokens(text):
    """A word's `pick` must make Attention Text Encode select exactly the clicked word's tokens."""
    tokenizer = routes.shipped_tokenizer()
    answer = routes.tokenize_response(text)
    checked = 0
    for token in content_tokens(answer):
        if token["position"] != token["word_positions"][0]:
            continue
        resolved = subjects.resolve_subjects(tokenizer, text, token["pick"]).subjects[0].token_positions
        if token["pick"].isdigit():
            assert resolved == (token["position"],)
        else:
            assert token["pick"] == token["word"] and list(resolved) == token["word_positions"], token
        checked += 1
    assert checked == len({tuple(t["word_positions"]) for t in content_tokens(answer)})


def test_repeated_words_and_separators_are_picked_by_index():
    by_position = {t["position"]: t for t in content_tokens(routes.tokenize_response("a tomcat and a cat, 2 cats"))}
    assert [by_position[p]["text"] for p in range(1, 10)] == ["a", "tom", "cat", "and", "a", "cat", ",", "2", "cats"]
    assert by_position[2]["pick"] == by_position[3]["pick"] == "tomcat"
    assert by_position[6]["pick"] == "cat"    # the node resolves 'cat' to this word, not to the tail of 'tom|cat'
    assert subjects.resolve_subjects(routes.shipped_tokenizer(), "a tomcat and a cat, 2 cats", "cat").subjects[0] \
        .token_positions == (6,)
    assert by_position[5]["pick"] == "5"      # the second 'a'
    assert by_position[7]["pick"] == "7"      # ',' separates subjects
    assert by_position[8]["pick"] == "8"      # '2' would be read as token index 2
    assert by_position[9]["pick"] == "cats"


def test_subjects_are_resolved_one_by_one_with_the_nodes_errors():
    answer = routes.tokenize_response(PROMPT, "cat; dog, 9, 0, tiramisu")
    by_entry = {s["entry"]: s for s in answer["subjects"]}
    assert [s["entry"] for s in answer["subjects"]] == ["cat", "dog", "9", "0", "tiramisu"]
    assert by_entry["cat"]["positions"] == [5] and by_entry["9"]["positions"] == [9]
    assert by_entry["tiramisu"]["positions"] == [8, 9, 10]
    assert by_entry["dog"]["positions"] == [] and "'dog' is not in the prompt" in by_entry["dog"]["error"]
    assert "start token" in by_entry["0"]["error"]
    assert by_entry["9"]["noun"] == {"word": "ram", "positions": [9]}  # an index: its token's text
    assert by_entry["dog"]["noun"] is None and by_entry["dog"]["attributes"] == []


def test_subject_groups_report_the_noun_and_each_attribute():
    """'red car' is noun 'car' with attribute 'red': the picker shows each in its role."""
    text = "a red car and a blue bench, a big old car"
    answer = routes.tokenize_response(text, "red car, blue bench, big old car, green bench")
    tokenizer = routes.shipped_tokenizer()
    for entry in answer["subjects"][:3]:
        subject = subjects.resolve_subjects(tokenizer, text, entry["entry"]).subjects[0]
        assert entry["positions"] == entry["noun"]["positions"] == list(subject.token_positions)
        assert entry["attributes"] == [{"word": a.label, "positions": list(a.token_positions)} for a in subject.attributes]
    assert [(s["noun"]["word"], s["noun"]["positions"], [(a["word"], a["positions"]) for a in s["attributes"]])
            for s in answer["subjects"][:3]] == [
        ("car", [3], [("red", [2])]), ("bench", [7], [("blue", [6])]), ("car", [12], [("big", [10]), ("old", [11])])]
    assert "attribute 'green' is not in the prompt" in answer["subjects"][3]["error"]


def test_a_word_at_a_named_occurrence_is_reported_by_its_word():
    """'red@7 bench': the second 'red' of the prompt, reported as the attribute 'red' at 7 (its chip's pick is 7)."""
    text = "a red car next to a red bench"
    answer = routes.tokenize_response(text, "red@7 bench, red@2 bench, car@3, red@4 bench")
    by_position = {t["position"]: t for t in content_tokens(answer)}
    assert (by_position[2]["pick"], by_position[7]["pick"], by_position[7]["word"]) == ("red", "7", "red")
    assert [(s["noun"]["word"], s["positions"], s["attributes"]) for s in answer["subjects"][:3]] == [
        ("bench", [8], [{"word": "red", "positions": [7]}]), ("bench", [8], [{"word": "red", "positions": [2]}]),
        ("car", [3], [])]
    assert "position 4 holds 'next'" in answer["subjects"][3]["error"]


# --- the DiT families: the tokens of the encoder the model attends -----------------------------------------

FLUX = {"node": "DualCLIPLoader", "widgets": {"type": "flux", "clip_name1": "clip_l.safetensors",
                                               "clip_name2": "t5xxl_fp16.safetensors"}}
SD3 = {"node": "TripleCLIPLoader", "widgets": {"clip_name1": "a", "clip_name2": "b", "clip_name3": "c"}}
TINY_SD15 = {"node": "AttnGuideTestTinySD15", "widgets": {"type": "stable_diffusion"}}


def test_flux_shows_its_t5_pieces():
    """Flux attends the T5 sequence only: the picker shows its pieces, '▁' dropped from a word's first piece and a
    bare '▁' as a space that no word includes (and no click selects)."""
    answer = routes.tokenize_response(PROMPT, "tiramisu", source=FLUX)
    assert answer["family"] == "flux" and answer["note"] is None
    assert answer["chunk_length"] == answer["num_tokens"] == 256 and len(answer["chunks"]) == 1
    (chunk,) = answer["chunks"]
    assert (chunk["encoder"], chunk["start"], chunk["length"], chunk["end_position"]) == ("t5", 0, 256, 14)
    tokens = chunk["tokens"]
    assert [t["piece"] for t in tokens[:15]] == ["▁", "a", "▁photo", "▁of", "▁", "a", "▁cat", "▁and", "▁", "a",
                                                  "▁tir", "ami", "s", "u", "</s>"]
    assert [t["kind"] for t in tokens[:15]] == ["space", "word", "word", "word", "space", "word", "word", "word",
                                                 "space", "word", "word", "word", "word", "word", "end"]
    assert {t["kind"] for t in tokens[15:]} == {"padding"}
    assert [t["text"] for t in content_tokens(answer)] == ["a", "photo", "of", "a", "cat", "and", "a", "tir", "ami",
                                                           "s", "u"]
    assert {t["position"]: (t["word"], t["word_positions"], t["pick"]) for t in tokens[10:14]} == {
        p: ("tiramisu", [10, 11, 12, 13], "tiramisu") for p in range(10, 14)}
    assert answer["subjects"][0]["positions"] == [10, 11, 12, 13]
    assert tokens[6]["pick"] == "cat" and tokens[9]["pick"] == "9"  # the third 'a': only its index


def test_sd3_shows_clip_chunks_then_t5_pieces():
    answer = routes.tokenize_response(PROMPT, "cat", source=SD3)
    assert answer["family"] == "sd3" and answer["chunk_length"] == 77 and answer["num_tokens"] == 154
    clip, t5 = answer["chunks"]
    assert (clip["encoder"], clip["start"], clip["length"]) == ("clip", 0, 77)
    assert (t5["encoder"], t5["start"], t5["length"], t5["end_position"]) == ("t5", 77, 77, 77 + 14)
    assert [t["text"] for t in clip["tokens"][1:11]] == ["a", "photo", "of", "a", "cat", "and", "a", "ti", "ram", "isu"]
    assert t5["tokens"][6]["piece"] == "▁cat" and t5["tokens"][6]["position"] == 83
    # 'cat' is its CLIP token and its T5 piece; a click on either picks the word
    assert answer["subjects"][0]["positions"] == [5, 83]
    assert clip["tokens"][5]["pick"] == t5["tokens"][6]["pick"] == "cat"


@pytest.mark.parametrize("source", [FLUX, SD3])
@pytest.mark.parametrize("text", [
    PROMPT,
    "a tomcat and a cat, cat,frog, a bullfrog",
    "a cat, a (red cat:1.2); 2 cats and a cat",
    "café au lait, a café and a housecat next to the house",
    " ".join(f"w{i} cat" for i in range(80)),   # SD3: two CLIP chunks; Flux: one T5 sequence past 256
])
def test_a_click_picks_what_the_node_resolves_to_these_dit_tokens(source, text):
    """A word's `pick` makes Attention Text Encode select the clicked word's tokens in its encoder's part (SD3: and
    the same word in the other encoder's part)."""
    family, _encoders, _note = routes.clip_family(source)
    tokenizer = routes.shipped_tokenizer(family)
    answer = routes.tokenize_response(text, source=source)
    checked = 0
    for chunk in answer["chunks"]:
        for token in chunk["tokens"]:
            if token["special"] or token["position"] != token["word_positions"][0]:
                continue
            resolved = subjects.resolve_subjects(tokenizer, text, token["pick"])
            positions = resolved.subjects[0].token_positions
            here = [p for p in positions if resolved.segments[resolved.segment_of(p)].encoder == chunk["encoder"]]
            if token["pick"].isdigit():
                assert positions == (token["position"],)
            else:
                assert token["pick"] == token["word"] and here == token["word_positions"], token
            checked += 1
    assert checked == len({tuple(t["word_positions"]) for t in content_tokens(answer)})


def test_the_family_comes_from_the_loader_the_picker_names(tmp_path):
    assert routes.clip_family(FLUX)[0] == "flux"
    assert routes.clip_family({"node": "CLIPLoader", "widgets": {"type": "chroma"}})[0] == "chroma"
    assert routes.clip_family({"node": "DualCLIPLoader", "widgets": {"type": "sdxl"}})[0] == "sdxl"
    assert routes.clip_family(TINY_SD15) == ("sd15", None, None)
    assert routes.clip_family(SD3) == ("sd3", None, None)  # files it cannot read: all three encoders
    family, _encoders, note = routes.clip_family(None)
    assert family == "sd15" and "not linked" in note
    assert "cannot tell" in routes.clip_family({"node": "SomeLoader", "widgets": {}})[2]
    assert "not in the checkpoints folder" in \
        routes.clip_family({"node": "CheckpointLoaderSimple", "widgets": {"ckpt_name": "absent.safetensors"}})[2]
    # a family the pack does not read: the picker says so instead of showing tokens
    answer = routes.tokenize_response(PROMPT, source={"node": "CLIPLoader", "widgets": {"type": "qwen_image"}})
    assert answer["chunks"] == [] and "'qwen_image'" in answer["error"] and "Flux.1" in answer["error"]
    # a checkpoint's family, and SD3's text encoders, from the tensor names of its safetensors header
    from safetensors.torch import save_file
    import torch
    checkpoints = {
        "sd3": ["model.diffusion_model.joint_blocks.0.x", "text_encoders.clip_l.transformer.x",
                "text_encoders.clip_g.transformer.x"],
        "flux": ["model.diffusion_model.double_blocks.0.x", "text_encoders.t5xxl.transformer.x"],
        "sdxl": ["model.diffusion_model.input_blocks.0.x", "conditioner.embedders.1.model.x"],
        "sd15": ["model.diffusion_model.input_blocks.0.x", "cond_stage_model.transformer.x"],
    }
    for family, keys in checkpoints.items():
        path = tmp_path / f"{family}.safetensors"
        save_file({k: torch.zeros(1) for k in keys}, str(path))
        found, encoders = routes.checkpoint_family(routes._safetensors_keys(str(path)))
        assert found == family
        assert encoders == (frozenset({"clip_l", "clip_g"}) if family == "sd3" else None)
    (tmp_path / "old.ckpt").write_bytes(b"\x80\x02not a safetensors file")
    assert routes._safetensors_keys(str(tmp_path / "old.ckpt")) is None
    assert routes.text_encoder_name({"text_model.encoder.layers.0.mlp.fc1.weight"}) == "clip_l"
    assert routes.text_encoder_name({"text_model.encoder.layers.0.mlp.fc1.weight",
                                     "text_model.encoder.layers.30.mlp.fc1.weight"}) == "clip_g"
    assert routes.text_encoder_name({"encoder.block.0.layer.0.SelfAttention.k.weight"}) == "t5xxl"


def test_sd3_without_t5_shows_the_clip_part_only():
    answer = routes.tokenize_response(PROMPT, "cat, 100", tokenizer=routes.shipped_tokenizer("sd3"),
                                      encoders={"clip_l", "clip_g"})
    assert [c["encoder"] for c in answer["chunks"]] == ["clip"] and answer["num_tokens"] == 77
    assert answer["subjects"][0]["positions"] == [5] and "no T5-XXL loaded" in answer["subjects"][1]["error"]


def _post_in_process(body: bytes) -> tuple[int, dict]:
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    async def go():
        table = web.RouteTableDef()
        routes.register(table)
        app = web.Application()
        app.add_routes(table)
        async with TestClient(TestServer(app)) as client:
            response = await client.post(routes.ROUTE, data=body, headers={"Content-Type": "application/json"})
            return response.status, await response.json()
    return asyncio.run(go())


@pytest.mark.parametrize("body, message", [
    (b"a cat", "the body is not JSON"),
    (b'["a cat"]', "must be a JSON object"),
    (b"{}", "missing field 'text'"),
    (b'{"text": 3}', "'text' must be a string, not int"),
    (b'{"text": "a cat", "subjects": ["cat"]}', "'subjects' must be a string"),
    (b'{"text": "a cat", "prompt": "x"}', "unknown field(s) 'prompt'; valid fields: 'text', 'subjects', 'clip'"),
    (b'{"text": "a cat", "clip": "flux"}', "'clip' must be null or an object"),
    (json.dumps({"text": "cat " * 6000}).encode(), "'text' has 24000 characters; the token picker tokenizes at most 20000"),
])
def test_bad_requests_get_400_naming_the_problem(body, message):
    status, answer = _post_in_process(body)
    assert status == 400 and message in answer["error"], answer


def test_good_request_gets_the_answer():
    status, answer = _post_in_process(json.dumps({"text": PROMPT, "subjects": "cat"}).encode())
    assert status == 200 and answer == routes.tokenize_response(PROMPT, "cat")
    status, answer = _post_in_process(json.dumps({"text": PROMPT, "subjects": "cat", "clip": FLUX}).encode())
    assert status == 200 and answer == routes.tokenize_response(PROMPT, "cat", source=FLUX)


# --- the real server and a real browser --------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, body=None, method=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method or ("POST" if data else "GET"),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"null")


@pytest.fixture(scope="module")
def comfy_server(tmp_path_factory):
    """ComfyUI's main.py on a free loopback port, the pack (and the test's tiny loader) via extra_model_paths."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (bash .ci/install-browser.sh)")
    pytest.importorskip("playwright", reason="the playwright package is absent (bash .ci/install-browser.sh)")
    root = tmp_path_factory.mktemp("comfy")
    nodes_dir = root / "extra" / "custom_nodes"
    nodes_dir.mkdir(parents=True)
    (nodes_dir / "comfyui-attention-guidance").symlink_to(PACK_DIR, target_is_directory=True)
    (nodes_dir / "attn_guide_test_nodes").symlink_to(BROWSER_DIR / "tiny_nodes", target_is_directory=True)
    config = root / "extra_model_paths.yaml"
    config.write_text(f"attn_guide_browser_test:\n  base_path: {json.dumps(str(root / 'extra'))}\n"
                      f"  custom_nodes: custom_nodes\n")
    (root / "base" / "custom_nodes").mkdir(parents=True)  # main.py lists it before loading custom nodes
    user = root / "base" / "user" / "default"
    for folder in ("workflows", "subgraphs"):  # the frontend lists them at start; absent, they log 404s
        (user / folder).mkdir(parents=True)
    (user / "user.css").write_text("")
    (user / "comfy.templates.json").write_text("[]")
    (user / "comfy.settings.json").write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    port = _free_port()
    log = (root / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(port), "--cpu",
         "--base-directory", str(root / "base"), "--extra-model-paths-config", str(config),
         "--database-url", "sqlite:///:memory:", "--disable-auto-launch", "--disable-api-nodes"],
        cwd=HOST, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150
        while True:
            try:
                if "AttnGuideTextEncode" in _http(f"{url}/object_info/AttnGuideTextEncode"):
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ComfyUI did not come up (exit code {server.poll()}):\n"
                            + (root / "server.log").read_text()[-4000:])
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def test_the_running_server_serves_the_route_and_the_picker(comfy_server):
    assert _http(f"{comfy_server}{routes.ROUTE}", {"text": PROMPT}) == routes.tokenize_response(PROMPT)
    with pytest.raises(urllib.error.HTTPError) as error:
        _http(f"{comfy_server}{routes.ROUTE}", {"text": None})
    assert error.value.code == 400 and "'text' must be a string" in json.loads(error.value.read())["error"]
    assert "/extensions/comfyui-attention-guidance/js/token_picker.js" in _http(f"{comfy_server}/extensions")


# Errors this frontend logs by itself in this offline, fresh-profile setup (also with the pack's script
# blocked): index.html links /user.css, which this ComfyUI does not serve, and the frontend reads its
# own graph once before creating it. Any other console error, or any page error, fails the test.
FRONTEND_OWN_ERRORS = ("ComfyApp graph accessed before initialization",)
FRONTEND_OWN_MISSING = ("/user.css",)

# A blank graph in the tab's storage, so the frontend opens that instead of its default template graph
# (whose model links point outside); set once per tab, so a reload restores what the test left.
BLANK_GRAPH_INIT = """
if (!sessionStorage.getItem("attn_guide_test")) {
  sessionStorage.setItem("attn_guide_test", "1");
  localStorage.setItem("workflow", JSON.stringify({last_node_id: 0, last_link_id: 0, nodes: [], links: [],
    groups: [], config: {}, extra: {}, version: 0.4}));
}
"""


@pytest.fixture(scope="module")
def browser(comfy_server):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Page:
    """One ComfyUI tab with its console errors and the picker's requests recorded."""

    def __init__(self, browser, url, renderer, shots: Path):
        self.url, self.renderer, self.shots = url, renderer, shots
        self.context = browser.new_context(viewport={"width": 1400, "height": 900})
        self.context.add_init_script(BLANK_GRAPH_INIT)
        self.page = self.context.new_page()
        self.errors, self.tokenize_requests = [], []
        self.page.on("console", self._on_console)
        self.page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))
        self.page.on("request", lambda r: self.tokenize_requests.append(r.post_data_json)
                     if r.url.endswith(routes.ROUTE) else None)
        self.page.on("response", self._on_response)

    def _on_console(self, message):
        missing = message.text.startswith("Failed to load resource") and \
            any(message.location.get("url", "").endswith(path) for path in FRONTEND_OWN_MISSING)
        if message.type == "error" and message.text not in FRONTEND_OWN_ERRORS and not missing:
            self.errors.append(f"console error: {message.text} at {message.location}")

    def _on_response(self, response):
        if response.status >= 400 and not any(response.url.endswith(p) for p in FRONTEND_OWN_MISSING):
            self.errors.append(f"HTTP {response.status} {response.request.method} {response.url}")

    def open(self):
        self.page.goto(self.url)
        self.page.wait_for_function("window.app?.isGraphReady && window.app.extensionManager", timeout=60000)

    @property
    def picker(self):
        return self.page.locator("[data-testid=attn-guide-token-picker]")

    def token(self, pick):
        return self.picker.locator(f'button[data-pick="{pick}"]')

    def widget_value(self, name):
        return self.page.evaluate(
            "([id, name]) => window.app.graph.getNodeById(id).widgets.find(w => w.name === name).value", [2, name])

    def wait_for_subjects(self, value):
        self.page.wait_for_function(
            "([id, value]) => window.app.graph.getNodeById(id).widgets.find(w => w.name === 'subjects').value === value",
            arg=[2, value], timeout=5000)

    def text_box(self):
        if self.renderer == "vue":
            return self.page.locator('[data-node-id="2"] textarea').first
        self.page.evaluate("() => { window.app.graph.getNodeById(2).widgets.find(w => w.name === 'text')"
                           ".element.dataset.testid = 'attn-guide-test-text' }")
        return self.page.locator("[data-testid=attn-guide-test-text]")

    def selected(self):
        return self.picker.locator("button.agtp-selected").evaluate_all(
            "buttons => buttons.map(b => [Number(b.dataset.position), b.dataset.pick])")

    def screenshot(self, name):
        self.shots.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(self.shots / f"{self.renderer}_{name}.png"))
        self.picker.screenshot(path=str(self.shots / f"{self.renderer}_{name}_picker.png"))


def queue_and_wait(tab, url, subjects_value):
    """Queues the open workflow from the Run button; the prompt carries `subjects_value` and runs to its end."""
    with tab.page.expect_request(lambda r: r.url.endswith("/prompt") and r.method == "POST") as sent:
        tab.page.locator('[data-testid="queue-button"]').click()
    prompt = sent.value.post_data_json["prompt"]
    assert prompt["2"]["inputs"]["subjects"] == subjects_value
    assert "$$attn_guide_token_picker" not in prompt["2"]["inputs"]
    answer = sent.value.response().json()
    assert answer["node_errors"] == {}, answer
    history, deadline = {}, time.monotonic() + 90
    while answer["prompt_id"] not in history or not history[answer["prompt_id"]]["status"].get("completed"):
        assert time.monotonic() < deadline, f"the prompt did not complete: {history}"
        time.sleep(0.25)
        history = _http(f"{url}/history/{answer['prompt_id']}")
        status = history.get(answer["prompt_id"], {}).get("status", {})
        assert status.get("status_str") != "error", status
    run = history[answer["prompt_id"]]
    assert run["status"]["status_str"] == "success"
    assert len(run["outputs"]["8"]["images"]) == 1


@pytest.fixture
def shots(tmp_path):
    return Path(os.environ["ATTN_GUIDE_SCREENSHOTS"]) if os.environ.get("ATTN_GUIDE_SCREENSHOTS") else tmp_path


@pytest.mark.parametrize("renderer, new_word", [("classic", "frog"), ("vue", "dog")])
def test_token_picker_in_the_browser(comfy_server, browser, shots, renderer, new_word):
    _http(f"{comfy_server}/settings/Comfy.VueNodes.Enabled", renderer == "vue")
    tab = Page(browser, comfy_server, renderer, shots)
    try:
        tab.open()
        workflow = json.loads((BROWSER_DIR / "workflow_api.json").read_text())
        tab.page.evaluate("async (workflow) => { await window.app.loadApiJson(workflow, 'attn_guide_test.json') }",
                          workflow)
        assert tab.page.evaluate("() => window.LiteGraph.vueNodesMode") == (renderer == "vue")

        # the prompt's tokens, as the encoder sees them
        # the first tokens come from the server's route: on a loaded 2-core machine that took over 10 s
        tab.token("cat").wait_for(timeout=30000)
        buttons = tab.picker.locator("button[data-position]").evaluate_all(
            "buttons => buttons.map(b => [Number(b.dataset.position), b.firstChild.textContent])")
        assert buttons == [[p, t["text"]] for p, t in enumerate(content_tokens(routes.tokenize_response(PROMPT)), 1)]
        specials = tab.picker.locator(".agtp-special").all_inner_texts()
        assert [s.split("\n")[0] for s in specials] == ["SOT", "EOT", "pad ×65"]
        assert tab.picker.locator("button.agtp-special, .agtp-special button").count() == 0
        assert tab.picker.locator(".agtp-chunk-label").count() == 0  # one chunk: the status line says so
        assert "10 tokens in 1 chunk of 77" in tab.picker.locator(".agtp-status").inner_text()

        # a click makes 'cat' a subject
        tab.token("cat").click()
        tab.wait_for_subjects("cat")
        tab.picker.locator('button.agtp-selected[data-pick="cat"]').wait_for(timeout=5000)
        assert tab.selected() == [[5, "cat"]]
        tab.picker.locator(".agtp-start").click()  # start, end and padding are not subjects
        tab.picker.locator(".agtp-padding").click()
        tab.page.wait_for_timeout(300)
        assert tab.widget_value("subjects") == "cat"

        # typing updates the tokens (debounced: one request for the whole phrase) and keeps the choice
        before = len(tab.tokenize_requests)
        box = tab.text_box()
        box.click()
        tab.page.keyboard.press("End")
        tab.page.keyboard.type(f" and a {new_word}", delay=20)
        tab.token(new_word).wait_for(timeout=5000)
        tab.page.wait_for_timeout(400)
        typed = tab.tokenize_requests[before:]
        assert 1 <= len(typed) <= 2, typed
        assert typed[-1] == {"text": f"{PROMPT} and a {new_word}", "subjects": "cat", "clip": TINY_SD15}
        assert tab.selected() == [[5, "cat"]]

        # clicking toggles: add the new word, remove cat, add it back
        tab.token(new_word).click()
        tab.wait_for_subjects(f"cat, {new_word}")
        tab.token("cat").click()
        tab.wait_for_subjects(new_word)
        tab.token("cat").click()
        tab.wait_for_subjects(f"{new_word}, cat")
        tab.picker.locator('button.agtp-selected[data-pick="cat"]').wait_for(timeout=5000)
        assert tab.selected() == [[5, "cat"], [13, new_word]]
        tab.screenshot("picked")

        # the choice is the `subjects` widget's value in the saved workflow; the picker saves nothing
        saved = tab.page.evaluate("() => window.app.graph.serialize()")
        node = next(n for n in saved["nodes"] if n["id"] == 2)
        assert node["widgets_values"] == [f"{PROMPT} and a {new_word}", f"{new_word}, cat"]

        # queue it from the Run button: the prompt carries the subjects and runs to the end
        queue_and_wait(tab, comfy_server, f"{new_word}, cat")

        # a reload restores the workflow; the picker shows the saved choice again
        tab.page.wait_for_timeout(1200)  # the frontend stores the open workflow after a change
        tab.page.reload()
        tab.page.wait_for_function("window.app?.isGraphReady && window.app.extensionManager", timeout=60000)
        tab.picker.locator(f'button.agtp-selected[data-pick="{new_word}"]').wait_for(timeout=30000)
        assert tab.widget_value("subjects") == f"{new_word}, cat"
        assert tab.selected() == [[5, "cat"], [13, new_word]]
        wait_for_picker(tab, 2)
        check_layout(tab, 2, f"{renderer} reloaded", "reloaded_layout")  # the saved size, the picker's new rows
        tab.screenshot("reloaded")
        assert tab.errors == []
    finally:
        tab.context.close()


# --- subject groups by clicking; the picker's place on its node -------------------------------------

GROUP_PROMPT = "a red car and a blue bench"
EXAMPLES = sorted(path.name for path in (PACK_DIR / "example_workflows").glob("*.json"))
# What the examples' own inputs log here: their checkpoints are not installed, so the frontend checks their
# download links on huggingface.co (refused by the page's content security policy; offline anyway), and the
# ControlNet example's Load Image asks for its edge map, which this fresh input folder lacks.
EXAMPLE_INPUTS_MISSING = ("huggingface.co", "/api/view?type=input&filename=attn_guide_canny_edges.png")

# Client-pixel boxes of every node (title included), of the picker, of its rows and of its chips, and
# whether each chip is what the page shows at its centre (not covered). Vue nodes are elements; classic
# nodes are drawn on the canvas, so their box comes from pos/size through the canvas's view.
LAYOUT = """
(id) => {
  const box = (r) => ({x: r.left, y: r.top, w: r.width, h: r.height});
  const view = window.app.canvas.ds, canvas = window.app.canvas.canvas.getBoundingClientRect();
  const title = window.LiteGraph.NODE_TITLE_HEIGHT, vue = window.LiteGraph.vueNodesMode;
  const nodes = {};
  for (const n of window.app.graph.nodes) {
    const el = vue && document.querySelector(`[data-node-id="${n.id}"]`);
    nodes[n.id] = el ? box(el.getBoundingClientRect()) : {
      x: (n.pos[0] + view.offset[0]) * view.scale + canvas.left, y: (n.pos[1] - title + view.offset[1]) * view.scale + canvas.top,
      w: n.size[0] * view.scale, h: (n.size[1] + title) * view.scale};
  }
  const picker = window.app.graph.getNodeById(id).attnGuideTokenPicker.root;
  const rows = [...picker.querySelectorAll(".agtp-content > *")].map((e) => box(e.getBoundingClientRect()));
  const chips = [...picker.querySelectorAll(".agtp-token")].map((e) => {
    const r = e.getBoundingClientRect();
    return {...box(r), text: e.firstChild.textContent,
            shown: e.contains(document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2))};
  });
  return {nodes, picker: box(picker.getBoundingClientRect()), rows, chips,
          overflow: [picker.scrollHeight - picker.clientHeight, picker.scrollWidth - picker.clientWidth]};
}
"""


def _inside(inner, outer, slack=1.0):
    return (inner["x"] >= outer["x"] - slack and inner["y"] >= outer["y"] - slack
            and inner["x"] + inner["w"] <= outer["x"] + outer["w"] + slack
            and inner["y"] + inner["h"] <= outer["y"] + outer["h"] + slack)


def _overlap(a, b):
    return a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"] and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"]


def _png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def wait_for_picker(tab, node_id, subjects_value=None):
    """Until the picker shows the answer for the node's current values (or `subjects_value`) and its node
    has taken the height the tokens need."""
    tab.page.wait_for_function("""([id, value]) => {
        const node = window.app.graph.getNodeById(id), picker = node?.attnGuideTokenPicker;
        const subjects = node?.widgets.find((w) => w.name === "subjects").value;
        return picker?.answer && picker.settling === 0 && picker.shown?.subjects === (value ?? subjects)
          && picker.shown.subjects === subjects && picker.root.querySelector("button[data-position]") !== null;
    }""", arg=[node_id, subjects_value], timeout=10000)
    tab.page.wait_for_timeout(150)  # a frame or two for the canvas to draw the grown node
    tab.page.wait_for_function("(id) => window.app.graph.getNodeById(id).attnGuideTokenPicker.settling === 0",
                               arg=node_id, timeout=5000)


def check_layout(tab, node_id, where, shot):
    """The picker lies inside its node at the node's full width, shows all its content (no scrolling, no
    clipping), its rows and chips lie inside it, no other node covers it, and each chip is visible."""
    layout = tab.page.evaluate(LAYOUT, node_id)
    node, picker = layout["nodes"][str(node_id)], layout["picker"]
    assert _inside(picker, node), f"{where}: the picker {picker} is not inside its node {node}"
    assert picker["w"] >= 0.9 * node["w"], f"{where}: the picker is {picker['w']:.0f} px wide in a node of {node['w']:.0f} px"
    assert layout["overflow"][0] <= 1 and layout["overflow"][1] <= 1, f"{where}: the picker cuts its content {layout['overflow']}"
    for part in layout["rows"] + layout["chips"]:
        assert _inside(part, picker), f"{where}: {part} sticks out of the picker {picker}"
    for other_id, other in layout["nodes"].items():
        assert other_id == str(node_id) or not _overlap(other, picker), f"{where}: node {other_id} {other} covers {picker}"
    assert [c["text"] for c in layout["chips"] if not c["shown"]] == [], f"{where}: chips under something else"
    # the screenshots: the picker's is the size of its box, and it lies in the node's
    tab.shots.mkdir(parents=True, exist_ok=True)
    tab.page.screenshot(path=str(tab.shots / f"{tab.renderer}_{shot}.png"))
    picker_png = tab.picker.screenshot(path=str(tab.shots / f"{tab.renderer}_{shot}_picker.png"))
    node_png = tab.page.screenshot(path=str(tab.shots / f"{tab.renderer}_{shot}_node.png"),
                                   clip={"x": node["x"], "y": node["y"], "width": node["w"], "height": node["h"]})
    (width, height), (node_width, node_height) = _png_size(picker_png), _png_size(node_png)
    assert abs(width - picker["w"]) <= 1.5 and abs(height - picker["h"]) <= 1.5, (where, width, height, picker)
    assert width <= node_width + 1 and height <= node_height + 1, (where, (width, height), (node_width, node_height))
    return layout


@pytest.mark.parametrize("renderer", ["classic", "vue"])
def test_attributes_are_attached_to_nouns_by_clicking(comfy_server, browser, shots, renderer):
    _http(f"{comfy_server}/settings/Comfy.VueNodes.Enabled", renderer == "vue")
    tab = Page(browser, comfy_server, renderer, shots)
    try:
        tab.open()
        workflow = json.loads((BROWSER_DIR / "workflow_api.json").read_text())
        workflow["2"]["inputs"]["text"] = GROUP_PROMPT
        tab.page.evaluate("async (workflow) => { await window.app.loadApiJson(workflow, 'attn_guide_groups.json') }",
                          workflow)
        assert tab.page.evaluate("() => window.LiteGraph.vueNodesMode") == (renderer == "vue")

        def roles():
            return tab.picker.locator("button[data-role]").evaluate_all(
                "buttons => buttons.map(b => [Number(b.dataset.position), b.dataset.pick, b.dataset.role, "
                "Number(b.dataset.subject), b.querySelector('.agtp-role').textContent])")

        def attach_target():
            return tab.picker.locator("select[data-action=target]").input_value()

        # a click makes 'car' a subject: a noun, the one attributes attach to
        tab.token("car").wait_for(timeout=30000)
        assert tab.picker.locator(".agtp-tools").count() == 0  # nothing to attach to yet
        tab.token("car").click()
        wait_for_picker(tab, 2, "car")
        assert roles() == [[3, "car", "noun", 0, "noun"]] and attach_target() == "3"
        # shift+click attaches 'red' to it: one entry, "red car"
        tab.token("red").click(modifiers=["Shift"])
        wait_for_picker(tab, 2, "red car")
        assert roles() == [[2, "red", "attribute", 0, "attr"], [3, "car", "noun", 0, "noun"]]
        assert "subjects: red car (car 3 · red 2)" in tab.picker.locator(".agtp-status").inner_text()

        # a second subject becomes the target; "+ attribute" then a click (no keyboard) attaches to it
        tab.token("bench").click()
        wait_for_picker(tab, 2, "red car, bench")
        assert attach_target() == "7"
        tab.picker.locator("button[data-action=attach]").click()
        tab.picker.locator('button[data-action=attach][aria-pressed="true"]').wait_for(timeout=5000)
        tab.token("blue").click()
        wait_for_picker(tab, 2, "red car, blue bench")
        assert tab.picker.locator("button[data-action=attach]").get_attribute("aria-pressed") == "false"  # once
        assert roles() == [[2, "red", "attribute", 0, "attr"], [3, "car", "noun", 0, "noun"],
                           [6, "blue", "attribute", 1, "attr"], [7, "bench", "noun", 1, "noun"]]

        # a click on an attribute takes it off its noun; choosing the noun, shift+click puts it back
        tab.token("red").click()
        wait_for_picker(tab, 2, "car, blue bench")
        tab.picker.locator("select[data-action=target]").select_option("3")
        tab.token("red").click(modifiers=["Shift"])
        wait_for_picker(tab, 2, "red car, blue bench")
        # a word that is a noun cannot be an attribute: the picker says why and leaves subjects alone
        tab.token("bench").click(modifiers=["Shift"])
        tab.picker.locator(".agtp-notice").wait_for(timeout=5000)
        assert "is a subject of its own" in tab.picker.locator(".agtp-notice").inner_text()
        assert tab.widget_value("subjects") == "red car, blue bench"

        # nouns and attributes look different: filled chips and dashed ones in the same subject colour
        looks = tab.picker.locator("button[data-role]").evaluate_all("""buttons => buttons.map(b => {
            const style = getComputedStyle(b);
            return [b.dataset.role, style.borderTopStyle, style.backgroundColor, style.borderTopColor]; })""")
        assert [(role, border) for role, border, _bg, _line in looks] == [
            ("attribute", "dashed"), ("noun", "solid"), ("attribute", "dashed"), ("noun", "solid")]
        assert looks[0][2] != looks[1][2] and looks[0][3] == looks[1][2]  # red's outline is car's fill
        assert looks[1][2] != looks[3][2]  # one colour per subject
        check_layout(tab, 2, f"{renderer} groups", "groups")

        saved = tab.page.evaluate("() => window.app.graph.serialize()")
        assert next(n for n in saved["nodes"] if n["id"] == 2)["widgets_values"] == [GROUP_PROMPT, "red car, blue bench"]
        queue_and_wait(tab, comfy_server, "red car, blue bench")
        assert tab.errors == []
    finally:
        tab.context.close()


REPEATED_PROMPT = "a red car next to a red bench"  # a 1, red 2, car 3, next 4, to 5, a 6, red 7, bench 8


@pytest.mark.parametrize("renderer", ["classic", "vue"])
def test_a_repeated_word_is_attached_where_it_was_clicked(comfy_server, browser, shots, renderer):
    """Attaching one 'red' of two writes an entry that the node resolves to the clicked one: the plain words where
    they do ('red bench': the phrase as written), else the word with its position ('red@2 bench', 'red@7 car')."""
    _http(f"{comfy_server}/settings/Comfy.VueNodes.Enabled", renderer == "vue")
    tab = Page(browser, comfy_server, renderer, shots)
    try:
        tab.open()
        workflow = json.loads((BROWSER_DIR / "workflow_api.json").read_text())
        workflow["2"]["inputs"]["text"] = REPEATED_PROMPT
        tab.page.evaluate("async (workflow) => { await window.app.loadApiJson(workflow, 'attn_guide_repeated.json') }",
                          workflow)

        def roles():
            return tab.picker.locator("button[data-role]").evaluate_all(
                "buttons => buttons.map(b => [Number(b.dataset.position), b.dataset.role, Number(b.dataset.subject)])")

        def chip(position):
            return tab.picker.locator(f'button[data-position="{position}"]')

        tab.token("bench").wait_for(timeout=30000)
        assert chip(7).get_attribute("data-pick") == "7"  # the second 'red': the word alone names the first
        tab.token("bench").click()
        wait_for_picker(tab, 2, "bench")
        # the second 'red', right before 'bench': the phrase as written finds it, so the plain words are written
        before = len(tab.tokenize_requests)
        chip(7).click(modifiers=["Shift"])
        wait_for_picker(tab, 2, "red bench")
        assert roles() == [[7, "attribute", 0], [8, "noun", 0]]
        assert {"text": REPEATED_PROMPT, "subjects": "red bench\nred@7 bench", "clip": TINY_SD15} in \
            tab.tokenize_requests[before:]  # the picker asked how both forms resolve
        # the first 'red' with 'bench': the plain words would find the second, so the entry names its position
        chip(7).click()
        wait_for_picker(tab, 2, "bench")
        chip(2).click(modifiers=["Shift"])
        wait_for_picker(tab, 2, "red@2 bench")
        assert roles() == [[2, "attribute", 0], [8, "noun", 0]]
        assert "subjects: red@2 bench (bench 8 · red 2)" in tab.picker.locator(".agtp-status").inner_text()
        # and the second 'red' with 'car' (now the target): 'red car' is the phrase at 2, so 'red@7 car'
        tab.token("car").click()
        wait_for_picker(tab, 2, "red@2 bench, car")
        chip(7).click(modifiers=["Shift"])
        wait_for_picker(tab, 2, "red@2 bench, red@7 car")
        assert roles() == [[2, "attribute", 0], [3, "noun", 1], [7, "attribute", 1], [8, "noun", 0]]
        check_layout(tab, 2, f"{renderer} repeated", "repeated")
        queue_and_wait(tab, comfy_server, "red@2 bench, red@7 car")  # the node resolves what the picker wrote
        assert tab.errors == []
    finally:
        tab.context.close()


@pytest.mark.parametrize("renderer", ["classic", "vue"])
def test_the_picker_fits_its_node_in_the_example_workflows(comfy_server, browser, shots, renderer):
    """SD1.5 and SDXL examples: the chips wrap inside the node, which grows (moving the node below down)
    instead of clipping them or drawing them over the next node; after the side panel opens and the window
    is resized, the picker still spans the node."""
    _http(f"{comfy_server}/settings/Comfy.VueNodes.Enabled", renderer == "vue")
    tab = Page(browser, comfy_server, renderer, shots)
    try:
        tab.open()
        assert {"astar_sdxl.json", "attend_and_excite_sd15.json"} <= set(EXAMPLES)
        for name in EXAMPLES:
            workflow = json.loads((PACK_DIR / "example_workflows" / name).read_text())
            encode = next(n["id"] for n in workflow["nodes"] if n["type"] == "AttnGuideTextEncode")
            tab.page.evaluate("async (workflow) => { await window.app.loadGraphData(workflow) }", workflow)
            wait_for_picker(tab, encode)
            stem = name.removesuffix(".json")
            check_layout(tab, encode, f"{renderer} {name}", stem)

            # the side panel shows the node's parameters; then the window is resized
            tab.page.evaluate("(id) => window.app.canvas.selectNode(window.app.graph.getNodeById(id))", encode)
            toggle = tab.page.locator('button[aria-label="Toggle properties panel"]').first
            toggle.click()
            tab.page.get_by_text("CLIP tokens", exact=True).first.wait_for(timeout=5000)
            tab.page.set_viewport_size({"width": 1600, "height": 900})
            tab.page.evaluate("() => new Promise((done) => { window.app.canvas.setDirty(true, true); "
                              "requestAnimationFrame(() => requestAnimationFrame(done)); })")
            wait_for_picker(tab, encode)
            check_layout(tab, encode, f"{renderer} {name}, side panel open, window resized", f"{stem}_panel")
            toggle.click()
            tab.page.set_viewport_size({"width": 1400, "height": 900})
        assert [e for e in tab.errors if not any(missing in e for missing in EXAMPLE_INPUTS_MISSING)] == []
    finally:
        tab.context.close()


# --- DiT families: the picker shows the tokens of the encoder the model attends ----------------------

TINY_FLUX = {"node": "AttnGuideTestTinySD15", "widgets": {"type": "flux"}}


@pytest.mark.parametrize("renderer", ["classic", "vue"])
def test_the_picker_shows_t5_pieces_for_a_flux_clip(comfy_server, browser, shots, renderer):
    """A Flux CLIP: the T5 pieces (a bare '▁' as a space chip, no word's), clicks pick words of several pieces;
    the loader's type switched to SD3 shows the CLIP chunk then the T5 sequence, back to SD1.x the CLIP chunk."""
    _http(f"{comfy_server}/settings/Comfy.VueNodes.Enabled", renderer == "vue")
    tab = Page(browser, comfy_server, renderer, shots)
    try:
        tab.open()
        workflow = json.loads((BROWSER_DIR / "workflow_api.json").read_text())
        workflow["1"]["inputs"]["type"] = "flux"
        tab.page.evaluate("async (workflow) => { await window.app.loadApiJson(workflow, 'attn_guide_flux.json') }",
                          workflow)
        tab.token("tiramisu").first.wait_for(timeout=10000)
        assert tab.tokenize_requests[-1]["clip"] == TINY_FLUX
        answer = routes.tokenize_response(PROMPT, source=TINY_FLUX)
        assert answer["family"] == "flux"
        buttons = tab.picker.locator("button[data-position]").evaluate_all(
            "buttons => buttons.map(b => [Number(b.dataset.position), b.firstChild.textContent])")
        assert buttons == [[t["position"], t["text"]] for t in content_tokens(answer)]
        assert [text for _p, text in buttons] == ["a", "photo", "of", "a", "cat", "and", "a", "tir", "ami", "s", "u"]
        specials = tab.picker.locator(".agtp-special").all_inner_texts()
        assert [s.split("\n")[0] for s in specials] == ["▁", "▁", "▁", "EOS", "pad ×241"]
        assert tab.picker.locator(".agtp-space").first.get_attribute("title").startswith("a bare T5 '▁' piece")
        assert "Flux.1: 11 T5 pieces (sequence of 256)" in tab.picker.locator(".agtp-status").first.inner_text()
        assert tab.picker.locator(".agtp-chunk-label").count() == 0

        # a click on one piece of 'tiramisu' makes the word a subject: all four pieces are its
        tab.token("tiramisu").nth(2).click()
        wait_for_picker(tab, 2, "tiramisu")
        assert tab.selected() == [[10, "tiramisu"], [11, "tiramisu"], [12, "tiramisu"], [13, "tiramisu"]]
        check_layout(tab, 2, f"{renderer} flux", "flux")

        def switch(clip_type, subjects_positions):
            before = len(tab.tokenize_requests)
            tab.page.evaluate("""(value) => { const w = window.app.graph.getNodeById(1).widgets
                .find((w) => w.name === "type"); w.value = value; w.callback?.(value); }""", clip_type)
            tab.page.wait_for_function("(n) => window.app.graph.getNodeById(2).attnGuideTokenPicker.shown?.clip"
                                       "?.widgets?.type === n", arg=clip_type, timeout=10000)
            wait_for_picker(tab, 2)
            assert len(tab.tokenize_requests) > before
            assert [p for p, _pick in tab.selected()] == subjects_positions

        # the loader says SD3 now: CLIP chunk, then T5; the subject is the word in both
        switch("sd3", [8, 9, 10, 87, 88, 89, 90])
        labels = tab.picker.locator(".agtp-chunk-label").all_inner_texts()
        assert labels == ["CLIP chunk 1 · positions 0–76", "T5 · positions 77–153"]
        assert "SD3/SD3.5: 10 CLIP tokens in 1 chunk of 77 + 11 T5 pieces (sequence of 77)" in \
            tab.picker.locator(".agtp-status").first.inner_text()
        check_layout(tab, 2, f"{renderer} sd3", "sd3")
        # and SD1.x again: the CLIP chunk only
        switch("stable_diffusion", [8, 9, 10])
        assert "10 tokens in 1 chunk of 77" in tab.picker.locator(".agtp-status").first.inner_text()
        assert tab.errors == []
    finally:
        tab.context.close()
