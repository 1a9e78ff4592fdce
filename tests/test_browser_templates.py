"""What the ComfyUI frontend reads from the pack besides its nodes: the example workflows in the template
browser (their thumbnails and titles), the help pages, and the files the Comfy Registry reads.

The frontend (comfyui_frontend_package 1.49, as its built code reads) lists a node pack's templates from
/api/workflow_templates (ComfyUI's custom_node_manager: every example_workflows/*.json) and asks for a
thumbnail at /api/workflow_templates/<pack>/<name>.jpg, always .jpg; the card's title is the file's name
(it reads no index for custom nodes). Help pages: it asks for /extensions/<pack>/docs/<NodeId>/<locale>.md
first, then docs/<NodeId>.md, and resolves the pages' image links against /extensions/<pack>/docs/.

The browser tests reuse the real server and headless Chromium of test_browser.py (they skip where it does).
"""
from __future__ import annotations

import asyncio
import json
import re
import tomllib

import test_browser
from conftest import PACK, PACK_DIR
from PIL import Image
from test_browser import EXAMPLE_INPUTS_MISSING, FRONTEND_OWN_MISSING, Page, _http

# test_browser.py's fixtures: the real ComfyUI server with the pack installed, headless Chromium, the screenshots
comfy_server, browser, shots = test_browser.comfy_server, test_browser.browser, test_browser.shots

PACK_NAME = "comfyui-attention-guidance"  # the pack's folder name under custom_nodes in the test server
EXAMPLES = PACK_DIR / "example_workflows"
DOCS = PACK_DIR / "web" / "docs"
TEMPLATE_NAMES = sorted(path.stem for path in EXAMPLES.glob("*.json"))
IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)|<(?:img|source|video)[^>]*\ssrc=['\"]([^'\"]+)['\"]")


def _schemas():
    extension = asyncio.run(PACK.comfy_entrypoint())
    return [node.define_schema() for node in asyncio.run(extension.get_node_list())]


SCHEMAS = sorted(_schemas(), key=lambda schema: schema.node_id)  # now: Playwright's sync API runs an event loop


# --- the files, as the frontend and the registry find them -------------------------------------------

def test_every_example_has_the_jpg_thumbnail_the_frontend_asks_for():
    assert TEMPLATE_NAMES
    for name in TEMPLATE_NAMES:
        thumbnail = EXAMPLES / f"{name}.jpg"
        assert thumbnail.is_file(), f"no {thumbnail.name}: the template browser shows a placeholder"
        assert thumbnail.stat().st_size < 200_000
        with Image.open(thumbnail) as picture:
            assert picture.format == "JPEG" and 128 <= max(picture.size) <= 1024
    assert not list(EXAMPLES.glob("*.png")), "thumbnails are .jpg (the frontend never asks for .png)"
    assert not (EXAMPLES / "index.json").exists()  # this frontend would list it as a template named 'index'


def test_help_pages_are_where_the_frontend_looks_first_and_their_images_resolve():
    ids = [schema.node_id for schema in SCHEMAS]
    assert sorted(path.parent.name for path in DOCS.glob("*/en.md")) == ids
    assert not list(DOCS.glob("*.md")), "flat docs/<NodeId>.md pages are asked for only after docs/<NodeId>/en.md"
    for node_id in ids:
        text = (DOCS / node_id / "en.md").read_text()
        for match in IMAGE_LINK.finditer(text):
            link = match.group(1) or match.group(2)
            if link.startswith(("/", "http://", "https://")):
                continue
            # the frontend prefixes relative links with /extensions/<pack>/docs/, whichever file it loaded
            assert (DOCS / link).is_file(), f"{node_id}/en.md: image {link!r} is not at web/docs/{link}"


def test_the_licence_and_the_publishing_files():
    project = tomllib.loads((PACK_DIR / "pyproject.toml").read_text())["project"]
    licence = PACK_DIR / project["license"]["file"]
    text = licence.read_text()
    assert text.lstrip().startswith("GNU GENERAL PUBLIC LICENSE") and "Version 3, 29 June 2007" in text
    changelog = (PACK_DIR / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog and f"## [{project['version']}]" in changelog
    workflow = (PACK_DIR / ".github" / "workflows" / "publish.yml").read_text()
    assert "Comfy-Org/publish-node-action@" in workflow and "pyproject.toml" in workflow
    assert "secrets.REGISTRY_ACCESS_TOKEN" in workflow


# --- in the browser --------------------------------------------------------------------------------

def _record_responses(tab):
    responses = {}
    tab.page.on("response", lambda r: responses.setdefault(r.url.split("?")[0], []).append(r.status))
    return responses


def test_the_template_browser_shows_each_example_with_its_thumbnail_and_title(comfy_server, browser, shots):
    assert sorted(_http(f"{comfy_server}/workflow_templates")[PACK_NAME]) == TEMPLATE_NAMES
    _http(f"{comfy_server}/settings/Comfy.VueNodes.Enabled", False)
    tab = Page(browser, comfy_server, "classic", shots)
    responses = _record_responses(tab)
    try:
        tab.open()
        tab.page.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
        tab.page.get_by_role("button", name=PACK_NAME).click(timeout=20000)  # the pack's category
        for name in TEMPLATE_NAMES:
            card = tab.page.locator(f'[data-testid="template-workflow-{name}"]')
            card.scroll_into_view_if_needed(timeout=10000)
            image = card.locator("img").first
            image.wait_for(timeout=10000)
            # the thumbnail, not a placeholder: the picture the pack ships, loaded at its own size
            loaded = tab.page.wait_for_function(
                "(img) => img.complete && img.naturalWidth > 0 && [img.naturalWidth, img.naturalHeight]",
                arg=image.element_handle(), timeout=10000).json_value()
            with Image.open(EXAMPLES / f"{name}.jpg") as picture:
                assert tuple(loaded) == picture.size, name
            assert card.locator("h3").inner_text().strip() == name  # the card's title: the file's name
            url = f"{comfy_server}/api/workflow_templates/{PACK_NAME}/{name}.jpg"
            assert responses.get(url) == [200], (url, responses.get(url))
        tab.shots.mkdir(parents=True, exist_ok=True)
        tab.page.screenshot(path=str(tab.shots / "template_browser.png"))

        # a card opens its workflow
        tab.page.locator('[data-testid="template-workflow-attend_and_excite_sd15"]').click()
        tab.page.wait_for_function(
            "() => window.app.graph.nodes.some((n) => n.type === 'AttnGuideTextEncode')", timeout=20000)
        workflow = json.loads((EXAMPLES / "attend_and_excite_sd15.json").read_text())
        assert tab.page.evaluate("() => window.app.graph.nodes.length") == len(workflow["nodes"])
        assert [e for e in tab.errors if not any(missing in e for missing in EXAMPLE_INPUTS_MISSING)] == []
    finally:
        tab.context.close()


def _show_info_tab(tab):
    """Selects the graph's one node until the side panel shows it (the panel follows the selection once it is
    mounted), then opens the panel's Info tab: the node's help page."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    info = tab.page.locator("[data-testid=panel-tab-info]").first
    for _ in range(40):
        tab.page.evaluate("""() => { const canvas = window.app.canvas;
            canvas.deselectAll(); canvas.selectNode(window.app.graph.nodes[0]); canvas.setDirty(true, true); }""")
        try:
            info.wait_for(timeout=500)
            break
        except PlaywrightTimeout:
            continue
    info.click(timeout=5000)


def test_each_help_page_loads_with_its_images_and_no_404(comfy_server, browser, shots):
    _http(f"{comfy_server}/settings/Comfy.VueNodes.Enabled", False)
    tab = Page(browser, comfy_server, "classic", shots)
    responses = _record_responses(tab)
    docs = f"{comfy_server}/extensions/{PACK_NAME}/docs"
    try:
        tab.open()
        tab.page.locator('button[aria-label="Toggle properties panel"]').first.click()
        for schema in SCHEMAS:
            node_id = schema.node_id
            tab.page.evaluate("""(type) => {
                window.app.graph.clear();
                window.app.graph.add(window.LiteGraph.createNode(type));
            }""", node_id)
            _show_info_tab(tab)
            # the page's own heading (its first line), rendered in the Info tab
            tab.page.locator(".node-help-content h1", has_text=schema.display_name).first.wait_for(timeout=10000)
            images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", (DOCS / node_id / "en.md").read_text())
            for link in images:
                shown = tab.page.locator(f'img[src="{docs}/{link}"], img[src="/extensions/{PACK_NAME}/docs/{link}"]')
                shown.first.wait_for(timeout=10000)
                assert tab.page.wait_for_function("(img) => img.complete && img.naturalWidth > 0",
                                                  arg=shown.first.element_handle(), timeout=10000)
            assert set(responses.get(f"{docs}/{node_id}/en.md", [])) == {200}, (node_id, responses)
            assert f"{docs}/{node_id}.md" not in responses  # found at the first place it looks
            for link in images:
                assert set(responses.get(f"{docs}/{link}", [])) == {200}, (link, responses)
            if images:
                tab.shots.mkdir(parents=True, exist_ok=True)
                tab.page.screenshot(path=str(tab.shots / f"help_{node_id}.png"))
        assert tab.errors == []
        assert not [url for url, statuses in responses.items() if any(s >= 400 for s in statuses)
                    and not url.endswith(FRONTEND_OWN_MISSING)]  # no 404 but the frontend's own
    finally:
        tab.context.close()
