"""Workflow JSON as the ComfyUI editor saves it (UI format) -> the prompt the server executes (API format).

The editor saves nodes with their widget values as a positional list (`widgets_values`) and the
connections as a separate `links` table; the server wants, per node id, `class_type` and `inputs`
by name. The frontend does this conversion in `graphToPrompt`; this module does the same in pure
Python from the node definitions the host has loaded (`nodes.NODE_CLASS_MAPPINGS`, V1 and V3 nodes
alike, through their `INPUT_TYPES()`), so a saved workflow can run without a browser.

What is handled, as the frontend (comfyui_frontend_package 1.4x) does it:
- widget values in the order of the node's widget inputs (required, then optional), including the
  extra value the editor stores after a widget with `control_after_generate` (an INT that asks for
  it, or any INT named `seed` / `noise_seed`; a COMBO that asks for it) and after an upload combo
  (`image_upload` etc.: LoadImage stores `["example.png", "image"]`);
- `widgets_values` saved as an object (by widget name);
- widgets converted to inputs and linked: the link wins over the stored value;
- frontend-only nodes: Reroute (followed), PrimitiveNode (its value is written into the inputs it
  feeds), Note and MarkdownNote (dropped);
- muted nodes (mode 2) are left out, and their outputs count as unconnected; bypassed nodes
  (mode 4) are left out, and each of their outputs is fed by their input of the same type (the one
  at the same slot first), as the editor does.

Values the editor stores after a node's own widgets (display widgets that frontend extensions add)
are ignored with a warning. Every value is checked against its widget's type (INT, FLOAT, BOOLEAN,
STRING, COMBO), so a list that no longer fits the node's definition is refused rather than shifted.

What is refused with a ConversionError naming the node: subgraphs and group nodes (unpack them in
the editor first), nodes with dynamic V3 inputs (DynamicCombo, Autogrow: use the editor's
'Export (API)'), node types the host does not know (the pack that provides them is missing),
widget values of the wrong type, links that point nowhere.

A workflow is read from a JSON file or from a PNG that holds one (ComfyUI's way to share a workflow: its
SaveImage writes the editor's graph into a "workflow" text chunk and the executed prompt into a "prompt"
chunk). `read_workflow` does this without the host, so a command line can check its input before booting
ComfyUI. `set_widget_values` writes values back into a UI-format workflow (what a run changed), so a
picture embeds the workflow as it ran.
"""
from __future__ import annotations

import copy
import json
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize"})
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload", "file_upload")
SEED_NAMES = ("seed", "noise_seed")
DYNAMIC_PREFIXES = ("COMFY_DYNAMIC", "COMFY_AUTOGROW")
NOTE_TYPES = frozenset({"Note", "MarkdownNote"})
REROUTE = "Reroute"
PRIMITIVE = "PrimitiveNode"
MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_WORKFLOW_KEYS = ("workflow", "prompt")  # the editor's graph first: it is what the editor opens


class ConversionError(ValueError):
    """The workflow cannot be converted; the message names the node and what to do."""


# ---------------------------------------------------------------- format detection and loading

def is_api_format(data: Any) -> bool:
    """True for {"<id>": {"class_type": ..., "inputs": {...}}, ...}."""
    return (isinstance(data, dict) and bool(data)
            and all(isinstance(v, dict) and "class_type" in v for v in data.values()))


def is_ui_format(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


@dataclass
class WorkflowSource:
    """A workflow as read from a file: `data` in UI or API format, `origin` says where in the file it was.
    For a PNG that holds both, `data` is its "workflow" chunk and `alternative` its "prompt" chunk."""
    path: Path
    data: dict
    origin: str
    alternative: dict | None = None

    @property
    def format(self) -> str:
        return "UI" if is_ui_format(self.data) else "API"


def png_text_chunks(blob: bytes) -> dict[str, str]:
    """The text chunks (tEXt, zTXt, iTXt) of a PNG file's bytes, by keyword; no size limit (a workflow with
    many nodes can pass the 1 MB that image libraries accept by default)."""
    if not blob.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG file")
    texts, position = {}, len(PNG_SIGNATURE)
    while position + 8 <= len(blob):
        length, kind = struct.unpack(">I4s", blob[position:position + 8])
        body = blob[position + 8:position + 8 + length]
        position += 12 + length
        if kind == b"IEND":
            break
        if kind not in (b"tEXt", b"zTXt", b"iTXt") or b"\0" not in body:
            continue
        key, rest = body.split(b"\0", 1)
        try:
            if kind == b"tEXt":
                text = rest.decode("latin-1")
            elif kind == b"zTXt":
                text = zlib.decompress(rest[1:]).decode("latin-1")
            else:  # iTXt: compression flag, method, language tag\0, translated keyword\0, UTF-8 text
                compressed, rest = rest[0], rest[2:]
                rest = rest.split(b"\0", 2)[2]
                text = (zlib.decompress(rest) if compressed else rest).decode("utf-8")
        except (zlib.error, UnicodeDecodeError, IndexError):
            continue
        texts.setdefault(key.decode("latin-1"), text)
    return texts


def _check_format(data: Any, where: str) -> dict:
    if is_api_format(data) or is_ui_format(data):
        return data
    raise ConversionError(f"{where} is neither a UI-format workflow (with 'nodes' and 'links', as the editor saves "
                          "it) nor an API-format prompt ({id: {'class_type', 'inputs'}}, as 'Export (API)' saves it)")


def _read_png(path: Path, blob: bytes) -> WorkflowSource:
    where = repr(str(path))
    texts = png_text_chunks(blob)
    found = {}
    for key in PNG_WORKFLOW_KEYS:
        if key not in texts:
            continue
        try:
            found[key] = _check_format(json.loads(texts[key]), f"the {key!r} text of {where}")
        except json.JSONDecodeError as error:
            raise ConversionError(f"the {key!r} text of the PNG {where} is not valid JSON: {error}") from None
    if not found:
        raise ConversionError(
            f"the PNG {where} holds no workflow: ComfyUI embeds one (text chunks 'workflow' and 'prompt') in the "
            "pictures it saves, unless it runs with --disable-metadata; this picture has "
            + (f"only the text chunks {', '.join(map(repr, texts))}" if texts else "no text chunks"))
    if "workflow" in found:
        return WorkflowSource(path, found["workflow"], "the PNG's embedded workflow", found.get("prompt"))
    return WorkflowSource(path, found["prompt"], "the PNG's embedded prompt")


def read_workflow(path: str | Path) -> WorkflowSource:
    """Reads a workflow file without the host: a JSON file in either format, or a PNG that holds one.
    Raises ConversionError saying what is wrong (missing, a folder, not a workflow)."""
    path = Path(path)
    where = repr(str(path))
    if path.is_dir():
        raise ConversionError(f"{where} is a folder, not a workflow file")
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise ConversionError(f"workflow file {where} does not exist") from None
    except OSError as error:
        raise ConversionError(f"cannot read {where}: {error.strerror or error}") from None
    if blob.startswith(PNG_SIGNATURE):
        return _read_png(path, blob)
    try:
        text = blob.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConversionError(f"{where} is neither a workflow JSON file nor a PNG with an embedded workflow (it is "
                              "not text)") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConversionError(f"workflow file {where} is not valid JSON: {error}") from None
    return WorkflowSource(path, _check_format(data, where), "JSON")


def source_prompt(source: WorkflowSource, node_classes: Mapping[str, type] | None = None,
                  warnings: list[str] | None = None) -> tuple[dict, dict | None]:
    """The API-format prompt of a read workflow, and the UI-format workflow it was converted from (None for
    an API-format prompt). A PNG's "workflow" chunk that cannot be converted (a subgraph, a dynamic node)
    gives way to its "prompt" chunk, with a warning."""
    warnings = warnings if warnings is not None else []
    if is_api_format(source.data):
        return copy.deepcopy(source.data), None
    try:
        return to_api(source.data, node_classes, warnings), source.data
    except ConversionError as error:
        if source.alternative is None:
            raise
        warnings.append(f"the PNG's workflow could not be converted ({error}); running its embedded prompt")
        return copy.deepcopy(source.alternative), None


def load_prompt(path: str | Path, node_classes: Mapping[str, type] | None = None,
                warnings: list[str] | None = None) -> dict:
    """Reads a workflow file (JSON in either format, or a PNG that holds one) and returns the API-format prompt."""
    return source_prompt(read_workflow(path), node_classes, warnings)[0]


# ---------------------------------------------------------------- widget layout of a node type

def _spec_type(spec) -> Any:
    return spec[0] if isinstance(spec, (list, tuple)) and spec else spec


def _spec_options(spec) -> dict:
    if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict):
        return spec[1]
    return {}


def _is_widget(spec) -> bool:
    kind, options = _spec_type(spec), _spec_options(spec)
    if options.get("forceInput"):
        return False
    return isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES


def _value_kind(spec) -> str:
    kind = _spec_type(spec)
    return "COMBO" if isinstance(kind, (list, tuple)) else kind


def widget_slots(class_type: str, node_class: type) -> list[tuple[str, str | None, Any, str]]:
    """The positional layout of a node type's widgets_values: (input name, extra kind, default, value type).

    extra kind is None for the widget's own value, "control" for a control_after_generate value and
    "upload" for an upload button's value (both stored by the editor, neither sent to the server)."""
    try:
        input_types = node_class.INPUT_TYPES()
    except Exception as error:  # noqa: BLE001  (a node's own definition code)
        raise ConversionError(f"cannot read the inputs of node type {class_type!r}: {error}") from error
    slots = []
    for section in ("required", "optional"):
        for name, spec in (input_types.get(section) or {}).items():
            kind = _spec_type(spec)
            if isinstance(kind, str) and kind.startswith(DYNAMIC_PREFIXES):
                raise ConversionError(
                    f"{class_type} has a dynamic input ({name!r}, {kind}) whose widgets depend on other values; "
                    "such nodes are not converted here: in the editor use 'Export (API)' and run that file")
            if not _is_widget(spec):
                continue
            options, value_kind = _spec_options(spec), _value_kind(spec)
            default = options.get("default")
            if default is None and value_kind == "COMBO":
                choices = kind if isinstance(kind, (list, tuple)) else options.get("options") or []
                default = choices[0] if choices else None
            slots.append((name, None, default, value_kind))
            control = options.get("control_after_generate")
            if kind == "INT" and control is None:
                control = name in SEED_NAMES
            if control:
                slots.append((name, "control", None, "STRING"))
            if value_kind == "COMBO" and any(options.get(flag) for flag in UPLOAD_FLAGS):
                slots.append((name, "upload", None, "STRING"))
    return slots


def _fits(value_kind: str, value: Any) -> bool:
    if value_kind == "INT":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer())
    if value_kind == "FLOAT":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if value_kind == "BOOLEAN":
        return isinstance(value, bool)
    if value_kind == "STRING":
        return isinstance(value, str)
    return isinstance(value, (str, int, float, bool))  # COMBO: options may be numbers


def _is_extra_value(extra: str, value: Any) -> bool:
    if extra == "control":
        return isinstance(value, str) and value in CONTROL_VALUES
    # upload buttons store their kind ("image", "video", ...) or, in some saved files, the widget itself
    return isinstance(value, dict) or (isinstance(value, str) and value in {"image", "video", "audio", "file",
                                                                           "upload", "3d"})


def _stored_positions(slots: list, stored: list) -> tuple[dict[str, int], int, int]:
    """Where each widget's value is in a widgets_values list: (input name -> index, the first index after the
    node's own values, the first slot without a stored value)."""
    positions, position = {}, 0
    for slot_index, (name, extra, _, _) in enumerate(slots):
        if position >= len(stored):
            return positions, position, slot_index
        if extra is None:
            positions[name] = position
            position += 1
        elif _is_extra_value(extra, stored[position]):
            position += 1
    return positions, position, len(slots)


def widget_values(node: dict, class_type: str, node_class: type, warnings: list[str]) -> dict[str, Any]:
    """Input name -> stored widget value for one UI node."""
    where = _describe(node)
    try:
        slots = widget_slots(class_type, node_class)
    except ConversionError as error:
        raise ConversionError(f"{where}: {error}") from None
    stored = node.get("widgets_values")
    names = [name for name, extra, _, _ in slots if extra is None]
    defaults = {name: default for name, extra, default, _ in slots if extra is None}
    kinds = {name: kind for name, extra, _, kind in slots if extra is None}
    if stored is None:
        stored = []
    if isinstance(stored, dict):  # object form: by widget name
        unknown = sorted(set(stored) - set(names))
        if unknown:
            warnings.append(f"{where}: ignoring stored values of {', '.join(unknown)} (not widgets of {class_type})")
        values = {name: stored[name] for name in names if name in stored}
    elif isinstance(stored, list):
        positions, position, _ = _stored_positions(slots, stored)
        values = {name: stored[index] for name, index in positions.items()}
        if position < len(stored):
            # widgets that frontend extensions add after the node's own (text displays, previews)
            warnings.append(f"{where}: ignoring {len(stored) - position} stored value(s) after the node's "
                            f"{len(names)} widgets: {_short(stored[position:])}")
    else:
        raise ConversionError(f"{where}: widgets_values must be a list or an object, got {type(stored).__name__}")
    for name, value in values.items():
        if not _fits(kinds[name], value):
            raise ConversionError(
                f"{where}: the stored value {json.dumps(value)} does not fit widget {name!r} ({kinds[name]}); the "
                f"stored values {_short(stored)} do not match {class_type}'s widgets ({', '.join(names)}). The "
                "node's definition changed since the workflow was saved: update ComfyUI and the node pack, or "
                "re-create the node in the editor and save again")
        if kinds[name] == "INT" and isinstance(value, float):
            values[name] = int(value)
    missing = [name for name in names if name not in values]
    for name in missing:
        if defaults[name] is not None:
            values[name] = defaults[name]
    if missing:
        warnings.append(f"{where}: no stored value for {', '.join(missing)}; using the defaults")
    return values


# ---------------------------------------------------------------- graph

def _describe(node: dict) -> str:
    title = node.get("title")
    return f"node {node.get('id')} ({node.get('type')}{f' {title!r}' if title else ''})"


def _short(values: list) -> str:
    text = json.dumps(values)
    return text if len(text) <= 120 else text[:117] + "..."


def _links_by_id(links: list) -> dict[int, tuple[int, int, int, int, Any]]:
    """link id -> (origin id, origin slot, target id, target slot, type); arrays (0.4) or objects (1.0)."""
    table = {}
    for link in links or []:
        if isinstance(link, dict):
            entry = (link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                     link.get("type"))
        elif isinstance(link, (list, tuple)) and len(link) >= 5:
            entry = tuple(link[:6]) if len(link) >= 6 else (*link[:5], None)
        else:
            raise ConversionError(f"malformed link entry {link!r} in the workflow's links table")
        table[entry[0]] = entry[1:]
    return table


def _output_type(node: dict, slot: int) -> Any:
    outputs = node.get("outputs") or []
    return outputs[slot].get("type") if slot < len(outputs) else None


def _types_match(a: Any, b: Any) -> bool:
    if a is None or b is None or a == "*" or b == "*":
        return True
    return bool(set(str(a).split(",")) & set(str(b).split(",")))


class _Graph:
    def __init__(self, workflow: dict, node_classes: Mapping[str, type], warnings: list[str],
                 display_names: Mapping[str, str]):
        self.display_names = display_names
        self.nodes = {node["id"]: node for node in workflow["nodes"]}
        self.links = _links_by_id(workflow.get("links"))
        self.node_classes = node_classes
        self.warnings = warnings
        subgraphs = (workflow.get("definitions") or {}).get("subgraphs") or []
        self.subgraph_ids = {sub.get("id"): sub.get("name") for sub in subgraphs}
        group_nodes = (workflow.get("extra") or {}).get("groupNodes") or {}
        self.group_node_types = {f"workflow>{name}" for name in group_nodes} | {f"workflow/{name}"
                                                                             for name in group_nodes}

    def check_types(self) -> None:
        unknown: dict[str, list] = {}
        for node in self.nodes.values():
            kind = node.get("type")
            if kind in self.subgraph_ids:
                raise ConversionError(
                    f"{_describe(node)} is a subgraph ({self.subgraph_ids[kind]!r}); subgraphs are not converted: "
                    "select it in the editor, choose 'Unpack Subgraph', and save again")
            if kind in self.group_node_types or str(kind).startswith("workflow>"):
                raise ConversionError(f"{_describe(node)} is a group node; group nodes are not converted: "
                                      "right-click it, choose 'Convert to nodes', and save again")
            if node.get("mode", MODE_ALWAYS) in (MODE_NEVER, MODE_BYPASS):
                continue
            if kind in NOTE_TYPES or kind in (REROUTE, PRIMITIVE) or kind in self.node_classes:
                continue
            unknown.setdefault(kind, []).append(node.get("id"))
        if unknown:
            listed = "; ".join(f"{kind} (node{'s' * (len(ids) > 1)} {', '.join(map(str, ids))})"
                               for kind, ids in unknown.items())
            raise ConversionError(f"the workflow uses node types this ComfyUI does not have: {listed}. Install the "
                                  "node pack that provides them (ComfyUI Manager shows missing nodes).")

    def source(self, link_id: int, seen: frozenset = frozenset()) -> tuple[str, Any] | None:
        """Where a link's value comes from: ("link", [id, slot]), ("value", v), or None (unconnected)."""
        if link_id is None:
            return None
        if link_id in seen:
            raise ConversionError(f"link {link_id} is part of a cycle through Reroute/bypassed nodes")
        seen = seen | {link_id}
        if link_id not in self.links:
            raise ConversionError(f"link {link_id} is used by a node but missing from the workflow's links table")
        origin_id, origin_slot, _target, _slot, link_type = self.links[link_id]
        origin = self.nodes.get(origin_id)
        if origin is None:
            raise ConversionError(f"link {link_id} comes from node {origin_id}, which is not in the workflow")
        kind, mode = origin.get("type"), origin.get("mode", MODE_ALWAYS)
        if mode == MODE_NEVER:
            return None
        if kind == REROUTE:
            inputs = origin.get("inputs") or []
            return self.source(inputs[0].get("link"), seen) if inputs else None
        if kind == PRIMITIVE:
            values = origin.get("widgets_values")
            if not values:
                raise ConversionError(f"{_describe(origin)} holds no value to pass on")
            return "value", values[0]
        if mode == MODE_BYPASS:
            wanted = link_type or _output_type(origin, origin_slot)
            inputs = origin.get("inputs") or []
            order = ([origin_slot] if origin_slot < len(inputs) else []) + list(range(len(inputs)))
            for index in order:
                candidate = inputs[index]
                if candidate.get("link") is not None and _types_match(candidate.get("type"), wanted):
                    return self.source(candidate["link"], seen)
            return None
        return "link", [str(origin_id), origin_slot]

    def prompt(self) -> dict:
        self.check_types()
        prompt = {}
        for node_id, node in sorted(self.nodes.items(), key=lambda item: str(item[0])):
            kind = node.get("type")
            if kind in NOTE_TYPES or kind in (REROUTE, PRIMITIVE):
                continue
            if node.get("mode", MODE_ALWAYS) in (MODE_NEVER, MODE_BYPASS):
                continue
            inputs = widget_values(node, kind, self.node_classes[kind], self.warnings)
            for entry in node.get("inputs") or []:
                name = entry.get("name")
                widget = entry.get("widget")
                if widget and isinstance(widget, dict):
                    name = widget.get("name", name)
                found = self.source(entry.get("link"))
                if found is not None:
                    inputs[name] = found[1]
                elif not widget:
                    inputs.pop(name, None)
            title = node.get("title") or self.display_names.get(kind) or kind
            prompt[str(node_id)] = {"class_type": kind, "inputs": inputs, "_meta": {"title": title}}
        if not prompt:
            raise ConversionError("the workflow has no node to execute")
        return prompt


def to_api(workflow: dict, node_classes: Mapping[str, type] | None = None,
           warnings: list[str] | None = None) -> dict:
    """A UI-format workflow (as the editor saves it) as an API-format prompt.

    node_classes: node type -> class, by default ComfyUI's nodes.NODE_CLASS_MAPPINGS (the host must be
    booted and the node packs loaded). warnings, if given, collects what was guessed or ignored
    (missing values, values of extension widgets)."""
    if not is_ui_format(workflow):
        raise ConversionError("not a UI-format workflow: expected an object with 'nodes' and 'links'")
    display_names: Mapping[str, str] = {}
    try:
        import nodes  # ComfyUI's
        display_names = nodes.NODE_DISPLAY_NAME_MAPPINGS
        if node_classes is None:
            node_classes = nodes.NODE_CLASS_MAPPINGS
    except ImportError:
        if node_classes is None:
            raise ConversionError("no node definitions: boot ComfyUI first or pass node_classes") from None
    return _Graph(workflow, node_classes, warnings if warnings is not None else [], display_names).prompt()


# ---------------------------------------------------------------- writing values back

EXTRA_PLACEHOLDERS = {"control": "fixed", "upload": "image"}


def _primitive_feeding(nodes: dict, links: dict, link_id: Any, seen: frozenset = frozenset()) -> dict | None:
    """The PrimitiveNode whose value reaches an input through `link_id` (Reroutes followed), if any."""
    if link_id is None or link_id in seen or link_id not in links:
        return None
    origin = nodes.get(links[link_id][0])
    if origin is None:
        return None
    if origin.get("type") == PRIMITIVE:
        return origin
    if origin.get("type") == REROUTE and origin.get("inputs"):
        return _primitive_feeding(nodes, links, origin["inputs"][0].get("link"), seen | {link_id})
    return None


def _store_value(node: dict, slots: list, name: str, value: Any) -> None:
    stored = node.get("widgets_values")
    if isinstance(stored, dict):
        stored[name] = value
        return
    if not isinstance(stored, list):
        stored = node["widgets_values"] = []
    positions, _, first_missing = _stored_positions(slots, stored)
    if name in positions:
        stored[positions[name]] = value
        return
    # the list ends before this widget (a workflow saved before the node gained inputs): fill up to it
    for slot_name, extra, default, _ in slots[first_missing:]:
        if extra is not None:
            stored.append(EXTRA_PLACEHOLDERS.get(extra))
        elif slot_name == name:
            stored.append(value)
            return
        else:
            stored.append(default)


def set_widget_values(workflow: dict, changes: Mapping[str, Mapping[str, Any]],
                      node_classes: Mapping[str, type] | None = None) -> dict:
    """A copy of a UI-format workflow with widget values replaced, so that it converts to the prompt that ran.

    changes: node id -> {input name: value}, as in the API-format prompt (to_api keeps the editor's node
    ids). A widget fed by a PrimitiveNode gets the value in the primitive too (the editor shows the
    primitive's). Node ids or names the workflow does not have as widgets are left alone."""
    if not is_ui_format(workflow):
        raise ConversionError("not a UI-format workflow: expected an object with 'nodes' and 'links'")
    if node_classes is None:
        import nodes as host_nodes  # ComfyUI's
        node_classes = host_nodes.NODE_CLASS_MAPPINGS
    result = copy.deepcopy(workflow)
    by_id = {str(node["id"]): node for node in result["nodes"]}
    links = _links_by_id(result.get("links"))
    nodes_by_id = {node["id"]: node for node in result["nodes"]}
    for node_id, values in changes.items():
        node = by_id.get(str(node_id))
        if node is None or node.get("type") not in node_classes:
            continue
        slots = widget_slots(node["type"], node_classes[node["type"]])
        widget_names = {name for name, extra, _, _ in slots if extra is None}
        for name, value in values.items():
            if name not in widget_names:
                continue
            for entry in node.get("inputs") or []:
                widget = entry.get("widget")
                if isinstance(widget, dict) and widget.get("name") == name:
                    primitive = _primitive_feeding(nodes_by_id, links, entry.get("link"))
                    if primitive is not None and primitive.get("widgets_values"):
                        primitive["widgets_values"][0] = value
            _store_value(node, slots, name, value)
    return result

