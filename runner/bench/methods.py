"""What the bench runs per job: a method's API-format prompt, with the prompt, subjects and seed filled in.

A method is either a preset, built on the pack's Attention Guidance node, or a user's workflow.

Presets are derived from the Guidance node's inputs (one `<loss>_weight` per entry of `guidance.losses.LOSSES`,
read from the node definitions of the host that runs the jobs: this process's ComfyUI or the servers'
/object_info), so a new loss joins without a change here:

  plain        no guidance (the Attention KSampler without GUIDANCE samples as KSampler does, and records maps)
  A&E          attend_and_excite 1 and the node's defaults, which are Attend-and-Excite's published settings
  A-STAR       segregation 1 + retention 1, guided over the whole schedule (guidance_end 1), no refinement
  A&E+A-STAR   the three at 1, guidance_end 1, A&E's refinement
  <loss>       every other loss of the node alone at weight 1 (refinement off: it stops on A&E's loss)

A custom loss set is "NAME: key=value; key=value", where a key is a loss name (its weight) or any input of the
Guidance node ("mine: attend_and_excite=1; syngen=0.5; guidance_end=1.0"); weights not named are 0.

A workflow method is a workflow file (API or UI format; `name=path.json` names it, else its file name does).
Its nodes are marked in their titles (the editor's node title, saved as `_meta.title`):
  #prompt    this node's `text` input gets the prompt (or its `prompt` input)
  #subjects  this node's `subjects` input gets the prompt's subjects
  #seed      this node's `seed` (or `noise_seed`) input gets the seed
  #image     the picture of this output node is the job's image
Unmarked, every Attention Text Encode gets the prompt and the subjects, every seed / noise_seed widget the seed,
and the image is the only SaveImage / PreviewImage's. Without an Attention Metrics node one is added on the
ATTENTION output of the first Attention KSampler. --steps, --size and --ckpt change the workflow only when given.
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

BENCH_VERSION = 1  # part of every settings hash: bump when the graph a preset builds changes meaning

TEXT_ENCODE = "AttnGuideTextEncode"
GUIDANCE = "AttnGuideGuidance"
KSAMPLER = "AttnGuideKSampler"
METRICS = "AttnGuideMetrics"
DEMO_CHECKPOINT = "AttnGuideDemoCheckpoint"
IMAGE_OUTPUTS = ("SaveImage", "PreviewImage")
SEED_INPUTS = ("seed", "noise_seed")
MARKS = ("#prompt", "#subjects", "#seed", "#image")
DEFAULT_METHODS = ("plain", "A&E", "A-STAR", "A&E+A-STAR")
# the presets' loss sets and Guidance inputs; names match case-insensitively, with these aliases
NAMED_PRESETS = {
    "plain": None,
    "A&E": ({"attend_and_excite": 1.0}, {}),
    "A-STAR": ({"segregation": 1.0, "retention": 1.0}, {"guidance_end": 1.0, "refinement": ""}),
    "A&E+A-STAR": ({"attend_and_excite": 1.0, "segregation": 1.0, "retention": 1.0}, {"guidance_end": 1.0}),
}
ALIASES = {"ae": "A&E", "attend_and_excite": "A&E", "attend-and-excite": "A&E", "astar": "A-STAR",
           "a-star": "A-STAR", "ae+astar": "A&E+A-STAR", "a&e + a-star": "A&E+A-STAR", "none": "plain"}


class MethodError(Exception):
    """A method that cannot be built (unknown name, bad value, unusable workflow): the message says why."""


def short_hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- node definitions

class _Shim:
    """What workflow_convert reads of a node class (INPUT_TYPES), from a definition dict."""

    def __init__(self, input_types: dict):
        self._input_types = input_types

    def INPUT_TYPES(self):  # noqa: N802  (ComfyUI's name)
        return self._input_types


class _LazyClasses(Mapping):
    def __init__(self, catalog: "NodeCatalog"):
        self.catalog = catalog

    def __getitem__(self, class_type):
        spec = self.catalog.input_types(class_type)
        if spec is None:
            raise KeyError(class_type)
        return _Shim(spec)

    def __contains__(self, class_type):
        return self.catalog.input_types(class_type) is not None

    def __iter__(self):
        return iter(())

    def __len__(self):
        return 0


class NodeCatalog:
    """Node definitions by class_type (INPUT_TYPES() of this process's nodes, or /object_info's "input" of a
    server): `lookup` returns None for a node type the host does not have."""

    def __init__(self, lookup: Callable[[str], dict | None], where: str):
        self._lookup = lookup
        self._cache: dict[str, dict | None] = {}
        self.where = where

    def input_types(self, class_type: str) -> dict | None:
        if class_type not in self._cache:
            self._cache[class_type] = self._lookup(class_type)
        return self._cache[class_type]

    def node_classes(self) -> Mapping:
        return _LazyClasses(self)

    def inputs(self, class_type: str) -> dict[str, tuple]:
        spec = self.input_types(class_type) or {}
        return {**(spec.get("required") or {}), **(spec.get("optional") or {})}

    def defaults(self, class_type: str, sections=("required",)) -> dict:
        """The default value of every widget input of `sections` that has one."""
        spec = self.input_types(class_type) or {}
        values = {}
        for section in sections:
            for name, entry in (spec.get(section) or {}).items():
                kind = entry[0] if isinstance(entry, (list, tuple)) and entry else entry
                options = entry[1] if isinstance(entry, (list, tuple)) and len(entry) > 1 and isinstance(
                    entry[1], dict) else {}
                if "default" in options:
                    values[name] = options["default"]
                elif isinstance(kind, (list, tuple)) and kind:
                    values[name] = kind[0]
                elif kind == "COMBO" and options.get("options"):
                    values[name] = options["options"][0]
        return values

    def combo_options(self, class_type: str, name: str) -> list | None:
        entry = self.inputs(class_type).get(name)
        if not entry:
            return None
        kind = entry[0]
        if isinstance(kind, (list, tuple)):
            return list(kind)
        options = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
        return list(options.get("options") or []) or None


def local_catalog() -> NodeCatalog:
    """The node definitions of this process's booted ComfyUI."""
    import nodes

    def lookup(class_type):
        node_class = nodes.NODE_CLASS_MAPPINGS.get(class_type)
        return None if node_class is None else node_class.INPUT_TYPES()
    return NodeCatalog(lookup, "this process's ComfyUI")


# ---------------------------------------------------------------- settings shared by the jobs of a run

@dataclass
class RunSettings:
    loader: dict                     # the loader node: {"class_type": ..., "inputs": {...}} (outputs MODEL, CLIP, VAE)
    steps: int = 50
    width: int = 512
    height: int = 512
    cfg: float = 7.5
    sampler: str = "euler"
    scheduler: str = "normal"
    negative: str = ""
    retention_from: float = 0.25
    guidance_overrides: dict = field(default_factory=dict)  # --guidance key=value, for every guided method
    explicit: frozenset = frozenset()  # which of steps, size, ckpt the user gave (workflow methods take only those)

    def base(self) -> dict:
        """What every method of the run shares: the report pairs methods within one such group."""
        return {"loader": self.loader, "steps": self.steps, "size": [self.width, self.height], "cfg": self.cfg,
                "sampler": self.sampler, "scheduler": self.scheduler, "negative": self.negative}


@dataclass
class Method:
    name: str
    template: dict                   # API-format prompt; the slots hold placeholders
    slots: list                      # [(node_id, input name, "prompt" | "subjects" | "seed")]
    image_node: str
    metrics_node: str | None
    description: str
    base: dict

    @property
    def settings_hash(self) -> str:
        return short_hash({"version": BENCH_VERSION, "template": self.template, "slots": self.slots,
                           "image": self.image_node, "metrics": self.metrics_node})

    @property
    def base_hash(self) -> str:
        return short_hash(self.base)

    def node_types(self) -> set[str]:
        return {node["class_type"] for node in self.template.values()}

    def render(self, prompt: str, subjects: str, seed: int) -> dict:
        graph = copy.deepcopy(self.template)
        values = {"prompt": prompt, "subjects": subjects, "seed": int(seed)}
        for node_id, name, what in self.slots:
            graph[node_id]["inputs"][name] = values[what]
        return graph


# ---------------------------------------------------------------- presets

def loss_names(catalog: NodeCatalog) -> list[str]:
    """The losses the Guidance node offers (one `<loss>_weight` input each), in its order."""
    names = [name[:-len("_weight")] for name in catalog.inputs(GUIDANCE) if name.endswith("_weight")]
    if not names:
        raise MethodError(f"{catalog.where} has no Attention Guidance node ({GUIDANCE}) with loss weights: is the "
                          "attention guidance pack installed there?")
    return names


def preset_names(catalog: NodeCatalog) -> list[str]:
    named = list(NAMED_PRESETS)
    covered = {"attend_and_excite", "segregation", "retention"}
    return named + [name for name in loss_names(catalog) if name not in covered]


def _convert(value: str, entry, key: str):
    kind = entry[0] if isinstance(entry, (list, tuple)) and entry else entry
    text = value.strip()
    try:
        if kind == "FLOAT":
            return float(text)
        if kind == "INT":
            return int(text)
        if kind == "BOOLEAN":
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
    except ValueError:
        raise MethodError(f"{key}={value!r}: not a {kind.lower()}") from None
    extra = entry[1] if isinstance(entry, (list, tuple)) and len(entry) > 1 and isinstance(entry[1], dict) else {}
    options = kind if isinstance(kind, (list, tuple)) else (extra.get("options") if kind == "COMBO" else None)
    if options and text not in options:
        raise MethodError(f"{key}={value!r}: valid values are {', '.join(map(str, options))}")
    return text


def guidance_inputs(catalog: NodeCatalog, weights: dict[str, float], changes: dict) -> dict:
    """The Guidance node's inputs: its defaults (required and optional), every weight 0 but `weights`, then
    `changes` ({input name or loss name: value}, strings converted by the input's type)."""
    losses = loss_names(catalog)
    spec = catalog.inputs(GUIDANCE)
    values = catalog.defaults(GUIDANCE, ("required", "optional"))
    values.update({f"{name}_weight": 0.0 for name in losses})
    for name, weight in weights.items():
        if name not in losses:
            raise MethodError(f"unknown loss {name!r}; the Attention Guidance node of {catalog.where} has: "
                              f"{', '.join(losses)}")
        values[f"{name}_weight"] = float(weight)
    for key, value in changes.items():
        name = f"{key}_weight" if key in losses else key
        if name not in spec:
            raise MethodError(f"{key!r} is neither a loss ({', '.join(losses)}) nor an input of the Attention "
                              f"Guidance node ({', '.join(n for n in spec if not n.endswith('_weight'))})")
        values[name] = _convert(value, spec[name], key) if isinstance(value, str) else value
    if not any(values[f"{name}_weight"] for name in losses):
        raise MethodError("every loss weight is 0: name at least one loss with a weight above 0")
    return values


def parse_assignments(text: str, separator: str, where: str) -> dict[str, str]:
    pairs = {}
    for part in (p.strip() for p in text.split(separator)):
        if not part:
            continue
        key, equals, value = part.partition("=")
        if not equals or not key.strip():
            raise MethodError(f"{where}: {part!r} is not key=value")
        pairs[key.strip()] = value.strip()
    return pairs


def canonical_name(name: str, catalog: NodeCatalog) -> str | None:
    """The preset a name means (case-insensitive, with aliases), or None."""
    folded = name.strip().lower()
    for preset in preset_names(catalog):
        if preset.lower() == folded:
            return preset
    return ALIASES.get(folded)


def _loader_and_graph(settings: RunSettings, catalog: NodeCatalog, guidance: dict | None) -> tuple[dict, list]:
    loader = {"class_type": settings.loader["class_type"],
              "inputs": {**catalog.defaults(settings.loader["class_type"]), **settings.loader.get("inputs", {})}}

    def node(class_type, **inputs):
        return {"class_type": class_type, "inputs": {**catalog.defaults(class_type), **inputs}}

    graph = {
        "1": loader,
        "2": node(TEXT_ENCODE, clip=["1", 1], text="", subjects=""),
        "3": node("CLIPTextEncode", clip=["1", 1], text=settings.negative),
        "4": node("EmptyLatentImage", width=settings.width, height=settings.height, batch_size=1),
        "6": node(KSAMPLER, model=["1", 0], seed=0, steps=settings.steps, cfg=settings.cfg,
                  sampler_name=settings.sampler, scheduler=settings.scheduler, positive=["2", 0], negative=["3", 0],
                  latent_image=["4", 0], denoise=1.0, subjects=["2", 1], record_maps=True),
        "7": node("VAEDecode", samples=["6", 0], vae=["1", 2]),
        "8": node("PreviewImage", images=["7", 0]),
        "9": node(METRICS, attention=["6", 1], retention_from=settings.retention_from),
    }
    if guidance is not None:
        graph["5"] = {"class_type": GUIDANCE, "inputs": guidance}
        graph["6"]["inputs"]["guidance"] = ["5", 0]
    slots = [("2", "text", "prompt"), ("2", "subjects", "subjects"), ("6", "seed", "seed")]
    return dict(sorted(graph.items())), slots


def _describe_guidance(catalog: NodeCatalog, values: dict | None) -> str:
    if values is None:
        return "no guidance"
    defaults = catalog.defaults(GUIDANCE, ("required", "optional"))
    weights = [f"{k[:-7]}={v:g}" for k, v in values.items() if k.endswith("_weight") and v]
    others = [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in values.items()
              if not k.endswith("_weight") and defaults.get(k) != v]
    return ", ".join(weights + others)


def preset_method(name: str, settings: RunSettings, catalog: NodeCatalog) -> Method:
    canonical = canonical_name(name, catalog)
    if canonical is None:
        raise MethodError(f"unknown method {name!r}; presets: {', '.join(preset_names(catalog))} (or "
                          "'NAME: loss=weight; input=value', or a workflow file)")
    if canonical == "plain":
        guidance = None
    elif canonical in NAMED_PRESETS:
        weights, changes = NAMED_PRESETS[canonical]
        guidance = guidance_inputs(catalog, weights, {**changes, **settings.guidance_overrides})
    else:
        guidance = guidance_inputs(catalog, {canonical: 1.0}, {"refinement": "", **settings.guidance_overrides})
    template, slots = _loader_and_graph(settings, catalog, guidance)
    return Method(canonical, template, slots, "8", "9", _describe_guidance(catalog, guidance), settings.base())


def custom_method(spec: str, settings: RunSettings, catalog: NodeCatalog) -> Method:
    name, _, body = spec.partition(":")
    name = name.strip()
    if not name or not re.fullmatch(r"[\w&+.\- ]+", name):
        raise MethodError(f"method {spec!r}: a custom method is 'NAME: loss=weight; input=value' with a NAME of "
                          "letters, digits and & + . - _")
    pairs = parse_assignments(body, ";", f"method {name!r}")
    losses = loss_names(catalog)
    weights = {k: float(_convert(v, ["FLOAT"], k)) for k, v in pairs.items() if k in losses}
    changes = {k: v for k, v in pairs.items() if k not in losses}
    guidance = guidance_inputs(catalog, weights, {**settings.guidance_overrides, **changes})
    template, slots = _loader_and_graph(settings, catalog, guidance)
    return Method(name, template, slots, "8", "9", _describe_guidance(catalog, guidance), settings.base())


# ---------------------------------------------------------------- workflow methods

def _marks(node: dict) -> set[str]:
    title = str((node.get("_meta") or {}).get("title") or "").lower()
    return {mark for mark in MARKS if mark in title}


def _first_input(node: dict, names: tuple[str, ...]) -> str | None:
    for name in names:
        if name in node["inputs"] and not isinstance(node["inputs"][name], list):
            return name
    return None


def workflow_method(spec: str, settings: RunSettings, catalog: NodeCatalog) -> Method:
    from .. import workflow_convert

    name, equals, path_text = spec.partition("=")
    path = Path(path_text if equals else spec).expanduser()
    name = name.strip() if equals else path.stem
    warnings: list[str] = []
    try:
        prompt = workflow_convert.load_prompt(path, catalog.node_classes(), warnings)
    except workflow_convert.ConversionError as error:
        raise MethodError(f"workflow {path.name}: {error}") from None
    prompt = {str(k): v for k, v in prompt.items()}
    where = f"workflow {path.name}"
    marked = {node_id: _marks(node) for node_id, node in prompt.items()}
    slots = []

    def assign(what: str, mark: str, names: tuple[str, ...], default_nodes: list[str]):
        chosen = [i for i, marks in marked.items() if mark in marks] or default_nodes
        for node_id in chosen:
            input_name = _first_input(prompt[node_id], names)
            if input_name is None:
                raise MethodError(f"{where}: node {node_id} ({prompt[node_id]['class_type']}) is marked {mark} but "
                                  f"has no {' or '.join(names)} widget")
            slots.append((node_id, input_name, what))
        return chosen

    encoders = [i for i, n in prompt.items() if n["class_type"] == TEXT_ENCODE]
    if not assign("prompt", "#prompt", ("text", "prompt"), encoders):
        raise MethodError(f"{where}: no node for the prompt: mark one with #prompt in its title (or use Attention "
                          "Text Encode)")
    assign("subjects", "#subjects", ("subjects",), encoders)
    seeded = [i for i, n in prompt.items() if _first_input(n, SEED_INPUTS)]
    if not assign("seed", "#seed", SEED_INPUTS, seeded):
        raise MethodError(f"{where}: no seed: mark the node that takes it with #seed in its title")
    for node_id, input_name, _what in slots:
        prompt[node_id]["inputs"][input_name] = 0 if input_name in SEED_INPUTS else ""

    if "steps" in settings.explicit:
        for node in prompt.values():
            if "steps" in node["inputs"] and not isinstance(node["inputs"]["steps"], list):
                node["inputs"]["steps"] = settings.steps
    if "size" in settings.explicit:
        for node in prompt.values():
            if node["class_type"].startswith("Empty") and "width" in node["inputs"]:
                node["inputs"].update(width=settings.width, height=settings.height)
    if "ckpt" in settings.explicit:
        for node in prompt.values():
            if "ckpt_name" in node["inputs"]:
                node["inputs"]["ckpt_name"] = settings.loader["inputs"].get("ckpt_name")

    images = [i for i, marks in marked.items() if "#image" in marks]
    if not images:
        images = [i for i, n in prompt.items() if n["class_type"] in IMAGE_OUTPUTS]
        if len(images) > 1:
            raise MethodError(f"{where}: several image outputs ({', '.join(images)}): mark the job's picture with "
                              "#image in its node title")
    if not images:
        raise MethodError(f"{where}: no SaveImage or PreviewImage node: the bench keeps its picture")
    metrics = [i for i, n in prompt.items() if n["class_type"] == METRICS]
    if not metrics:
        samplers = [i for i, n in prompt.items() if n["class_type"] == KSAMPLER]
        if samplers:
            new_id = str(max((int(i) for i in prompt if i.isdigit()), default=0) + 1)
            prompt[new_id] = {"class_type": METRICS, "inputs": {**catalog.defaults(METRICS), "attention": [
                samplers[0], 1], "retention_from": settings.retention_from}}
            metrics = [new_id]
    description = f"workflow {path.name}" + ("" if metrics else " (no Attention KSampler: no attention metrics)")
    return Method(name, prompt, slots, images[0], metrics[0] if metrics else None, description, settings.base())


def missing_checkpoint(method: Method, catalog: NodeCatalog) -> str | None:
    """What is wrong when a checkpoint loader of the method names a checkpoint the host does not list."""
    for node in method.template.values():
        name = node["inputs"].get("ckpt_name")
        if not isinstance(name, str):
            continue
        options = catalog.combo_options(node["class_type"], "ckpt_name")
        if options is not None and name not in options:
            listed = ", ".join(options[:10]) + (" ..." if len(options) > 10 else "") if options else "none"
            return f"{catalog.where} has no checkpoint {name!r} (its checkpoints: {listed})"
    return None


def is_workflow_spec(spec: str) -> bool:
    """Whether a --method argument names a workflow file ([NAME=]path) rather than a preset or a loss set."""
    text = spec.strip()
    candidate = text.partition("=")[2] if "=" in text and ":" not in text.partition("=")[0] else text
    return text.lower().endswith((".json", ".png")) or Path(candidate).expanduser().is_file()


def build_method(spec: str, settings: RunSettings, catalog: NodeCatalog) -> Method:
    """A --method argument: a preset name, 'NAME: key=value; ...', or a workflow file ([NAME=]path)."""
    text = spec.strip()
    if is_workflow_spec(text):
        return workflow_method(text, settings, catalog)
    if ":" in text:
        return custom_method(text, settings, catalog)
    return preset_method(text, settings, catalog)
