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
"""
from __future__ import annotations

import json
from collections.abc import Mapping
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


class ConversionError(ValueError):
    """The workflow cannot be converted; the message names the node and what to do."""


# ---------------------------------------------------------------- format detection and loading

def is_api_format(data: Any) -> bool:
    """True for {"<id>": {"class_type": ..., "inputs": {...}}, ...}."""
    return (isinstance(data, dict) and bool(data)
            and all(isinstance(v, dict) and "class_type" in v for v in data.values()))


def is_ui_format(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


def load_prompt(path: str | Path, node_classes: Mapping[str, type] | None = None,
                warnings: list[str] | None = None) -> dict:
    """Reads a workflow file in either format and returns the API-format prompt."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConversionError(f"workflow file {str(path)!r} does not exist") from None
    except json.JSONDecodeError as error:
        raise ConversionError(f"workflow file {str(path)!r} is not valid JSON: {error}") from None
    if is_api_format(data):
        return data
    if is_ui_format(data):
        return to_api(data, node_classes, warnings)
    raise ConversionError(f"{str(path)!r} is neither a UI-format workflow (with 'nodes' and 'links', as the editor "
                          "saves it) nor an API-format prompt ({id: {'class_type', 'inputs'}}, as 'Export (API)' "
                          "saves it)")


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
        values, position = {}, 0
        for name, extra, _, _ in slots:
            if position >= len(stored):
                break
            if extra is None:
                values[name] = stored[position]
                position += 1
            elif _is_extra_value(extra, stored[position]):
                position += 1
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
