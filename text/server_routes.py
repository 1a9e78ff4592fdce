"""HTTP route of the pack: POST /attn_guide/tokenize, the token picker's view of a prompt.

The token picker on Attention Text Encode (web/js/token_picker.js) shows the prompt's tokens as the model's text
sequence holds them and lets the user click them into the `subjects` widget. The picker tells the route where the
node's CLIP comes from (`clip`: the loader upstream of the node's clip input, its class and widget values); the
route picks the tokenizer of that family from ComfyUI's shipped tokenizer files (no weights are loaded) and answers
with the pack's own `subjects` logic, so that what the picker shows, and what a click puts into `subjects`, is what
the node resolves at run time:
- SD1.x, SD2.x, SDXL: the CLIP tokens, in 77-token chunks;
- Flux.1, Chroma: the T5 pieces (the model attends only T5; the CLIP-L tokens of a Flux CLIP are not shown);
- SD3/SD3.5: the CLIP chunks, then the T5 pieces (without T5-XXL loaded, the CLIP part only).
The family comes from the loader's `type` widget (Load CLIP, DualCLIPLoader and loaders like them), TripleCLIPLoader
(SD3), or a checkpoint's file (its tensor names, read from the safetensors header). Where it cannot be told (no
clip link, an unknown loader) the picker shows SD1.x CLIP tokens and says so in `note`.

Request:  {"text": "a cat and a frog", "subjects": "cat",                        ("subjects", "clip" optional)
           "clip": {"node": "DualCLIPLoader", "widgets": {"type": "flux", "clip_name1": "...", ...}}}
Response: {"family": "clip", "family_name": "SD1.x/SD2.x/SDXL", "note": null,
           "chunk_length": 77, "num_tokens": 77,
           "chunks": [{"index": 0, "encoder": "clip", "start": 0, "length": 77, "end_position": 6, "tokens": [
               {"position": 0, "text": "<|startoftext|>", "special": true, "kind": "start"},
               {"position": 2, "text": "cat", "special": false, "kind": "word", "word": "cat",
                "word_positions": [2], "pick": "cat"}, ...]}],
           "subjects": [{"entry": "cat", "positions": [2], "noun": {"word": "cat", "positions": [2]},
                         "attributes": [], "error": null}]}

`chunks` are the segments of the model's text sequence: CLIP chunks (`encoder` "clip") and the T5 sequence
("t5"). Positions are global over them, as in `subjects.py` (SD3: the T5 sequence starts at 77 * CLIP chunks).
`chunk_length` is 77 where there are CLIP chunks, else the T5 sequence's length. `kind` is one of start, word,
embedding, space (a bare T5 '▁', which no word includes), end, padding; only word and embedding tokens are
clickable. A T5 token's `text` is its piece without the '▁' that marks a word start, `piece` the piece as written.
`pick` is what a click adds to `subjects`: the word itself when the node would resolve that word to these very
tokens (its first occurrence), otherwise the token's index.

Each `subjects` entry is resolved as the node resolves it. A subject group ("red car": noun "car", the
words before it its attributes) reports its noun and each attribute, in the entry's order:
    {"entry": "red car", "positions": [3], "noun": {"word": "car", "positions": [3]},
     "attributes": [{"word": "red", "positions": [2]}], "error": null}
`positions` is the noun's (what the neglect losses read; SD3: its CLIP tokens and its T5 pieces); an entry that does
not resolve has `positions` [], `noun` null, `attributes` [] and the node's message in `error`. A word that names its
occurrence ("red@7 bench": the 'red' whose first token is at 7) is reported by its word ("red"). The picker, to
attach an attribute, builds the entry with such a word where the plain words would resolve elsewhere: it asks this
route how both forms resolve (the same request, `subjects` holding both) and keeps the plain one when they agree.
A CLIP of a family the pack does not read answers {"error": ..., "chunks": [], "subjects": []} with status 200.
"""
from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

from aiohttp import web

from . import clip_tokens, subjects, t5_tokens

ROUTE = "/attn_guide/tokenize"
MAX_TEXT_LENGTH = 20000
MAX_HEADER_BYTES = 64 * 1024 * 1024
_FIELDS = ("text", "subjects", "clip")

# family -> (module, tokenizer class) of ComfyUI's shipped tokenizers
TOKENIZERS = {
    "sd15": ("comfy.sd1_clip", "SD1Tokenizer"),
    "sd2": ("comfy.text_encoders.sd2_clip", "SD2Tokenizer"),
    "sdxl": ("comfy.sdxl_clip", "SDXLTokenizer"),
    "sd3": ("comfy.text_encoders.sd3_clip", "SD3Tokenizer"),
    "flux": ("comfy.text_encoders.flux", "FluxTokenizer"),
    "chroma": ("comfy.text_encoders.pixart_t5", "PixArtTokenizer"),
}
# a loader's CLIP `type` (CLIPLoader, DualCLIPLoader and loaders that copy them) -> family
CLIP_TYPES = {"stable_diffusion": "sd15", "sd1": "sd15", "sd15": "sd15", "sd2": "sd2", "sdxl": "sdxl",
              "stable_cascade": "sdxl", "sd3": "sd3", "flux": "flux", "chroma": "chroma", "pixart": "chroma"}
SD3_ENCODERS = ("clip_l", "clip_g", "t5xxl")


class TokenizeRequestError(ValueError):
    """A request the tokenize route rejects with 400."""


_tokenizers: dict[str, object] = {}


def shipped_tokenizer(family: str = "sd15"):
    """ComfyUI's tokenizer of `family` (TOKENIZERS), with the embeddings folders the loaders give a CLIP."""
    if family not in _tokenizers:
        import importlib

        import folder_paths
        module, name = TOKENIZERS[family]
        tokenizer_class = getattr(importlib.import_module(module), name)
        _tokenizers[family] = tokenizer_class(embedding_directory=folder_paths.get_folder_paths("embeddings"))
    return _tokenizers[family]


def parse_request(body: Any) -> tuple[str, str, dict | None]:
    """The (text, subjects, clip source) of a request body, or TokenizeRequestError naming what is wrong."""
    if not isinstance(body, dict):
        raise TokenizeRequestError(f"the body must be a JSON object like {{\"text\": \"a cat\"}}, "
                                   f"not a JSON {type(body).__name__}")
    unknown = sorted(set(body) - set(_FIELDS))
    if unknown:
        raise TokenizeRequestError(f"unknown field(s) {', '.join(map(repr, unknown))}; valid fields: "
                                   f"{', '.join(map(repr, _FIELDS))}")
    if "text" not in body:
        raise TokenizeRequestError("missing field 'text' (the prompt to tokenize)")
    text, spec, source = body["text"], body.get("subjects", ""), body.get("clip")
    if not isinstance(text, str):
        raise TokenizeRequestError(f"'text' must be a string, not {type(text).__name__}")
    if not isinstance(spec, str):
        raise TokenizeRequestError(f"'subjects' must be a string (comma separated words or token indices), "
                                   f"not {type(spec).__name__}")
    if len(text) > MAX_TEXT_LENGTH:
        raise TokenizeRequestError(f"'text' has {len(text)} characters; the token picker tokenizes at most "
                                   f"{MAX_TEXT_LENGTH}")
    if source is not None and not (isinstance(source, dict) and isinstance(source.get("node"), str)
                                   and isinstance(source.get("widgets", {}), dict)):
        raise TokenizeRequestError("'clip' must be null or an object like {\"node\": \"CLIPLoader\", \"widgets\": "
                                   "{\"type\": \"flux\"}} (the loader the node's CLIP comes from)")
    return text, spec, source


# --------------------------------------------------------------- which CLIP: the loader's family

_headers: dict[tuple[str, int, int], set[str] | None] = {}


def _safetensors_keys(path: str) -> set[str] | None:
    """The tensor names of a .safetensors file, from its header only (None if it is not one); kept per file
    version, since the picker asks again at every edit."""
    try:
        stat = os.stat(path)
        key = (path, stat.st_mtime_ns, stat.st_size)
        if key not in _headers:
            with open(path, "rb") as file:
                size = int.from_bytes(file.read(8), "little")
                _headers[key] = set(json.loads(file.read(size))) - {"__metadata__"} \
                    if 0 < size <= MAX_HEADER_BYTES else None
        return _headers[key]
    except (OSError, ValueError):
        return None


def _model_file(folder: str, name) -> str | None:
    if not isinstance(name, str) or not name:
        return None
    import folder_paths
    try:
        return folder_paths.get_full_path(folder, name)
    except Exception:  # an unknown folder name in an older host
        return None


def checkpoint_family(keys: set[str]) -> tuple[str, frozenset[str] | None]:
    """The family of a checkpoint from its tensor names (and, for SD3, the text encoders it holds)."""
    def has(prefix):
        return any(k.startswith(prefix) for k in keys)
    if has("model.diffusion_model.joint_blocks."):
        return "sd3", frozenset(name for name in SD3_ENCODERS if has(f"text_encoders.{name}."))
    if has("model.diffusion_model.distilled_guidance_layer."):
        return "chroma", None
    if has("model.diffusion_model.double_blocks."):
        return "flux", None
    if has("conditioner.embedders.1."):
        return "sdxl", None
    if has("cond_stage_model.model."):
        return "sd2", None
    return "sd15", None


def text_encoder_name(keys: set[str]) -> str | None:
    """Which of SD3's text encoders a text encoder file holds, from its tensor names (as ComfyUI detects them)."""
    if any(k.endswith("text_model.encoder.layers.30.mlp.fc1.weight") for k in keys):
        return "clip_g"
    if any(k.endswith("text_model.encoder.layers.0.mlp.fc1.weight") for k in keys):
        return "clip_l"
    if any(k.startswith("encoder.block.") or ".encoder.block." in k for k in keys):
        return "t5xxl"
    return None


def clip_family(source: dict | None) -> tuple[str, frozenset[str] | None, str | None]:
    """(family, SD3's loaded encoders or None, a note for the picker) of the CLIP a loader gives.

    Raises subjects.SubjectError for a CLIP type the pack does not read."""
    if not source:
        return "sd15", None, "the node's clip input is not linked to a loader the picker knows: showing SD1.x CLIP tokens"
    node, widgets = source["node"], source.get("widgets") or {}
    clip_type = widgets.get("type")
    if node == "TripleCLIPLoader":
        clip_type = "sd3"
    if isinstance(clip_type, str) and clip_type:
        family = CLIP_TYPES.get(clip_type.lower())
        if family is None:
            raise subjects.SubjectError(f"the CLIP comes from {node} with type {clip_type!r}, which is not a text "
                                        f"encoder attention guidance reads: it works with "
                                        f"{subjects.SUPPORTED_FAMILIES}")
        encoders = None
        if family == "sd3":  # which of the three the files are (a CLIPLoader's single T5 file: the T5 part only)
            names = [widgets.get(k) for k in sorted(widgets) if re.fullmatch(r"clip_name\d*", k)]
            found = [text_encoder_name(_safetensors_keys(path) or set())
                     for path in (_model_file("text_encoders", n) for n in names) if path]
            encoders = frozenset(found) if found and None not in found else None
        return family, encoders, None
    checkpoint = _model_file("checkpoints", widgets.get("ckpt_name"))
    if checkpoint is not None:
        keys = _safetensors_keys(checkpoint)
        if keys:
            family, encoders = checkpoint_family(keys)
            return family, encoders, None
        return "sd15", None, f"{os.path.basename(checkpoint)} is not a .safetensors file: showing SD1.x CLIP tokens"
    if isinstance(widgets.get("ckpt_name"), str) and widgets["ckpt_name"]:
        return "sd15", None, f"{widgets['ckpt_name']} is not in the checkpoints folder: showing SD1.x CLIP tokens"
    return "sd15", None, f"the picker cannot tell the CLIP family of {node}: showing SD1.x CLIP tokens"


# --------------------------------------------------------------- the answer

def _pick(view: subjects.ModelText, part_index: int, word: str, positions: list[int], cache: dict) -> str:
    """What a click on this word adds to `subjects`: the word if the node resolves it to these tokens (in every
    encoder's part it must be found; in this one at these positions), else the token's index."""
    if not word or subjects.parse_subject_spec(word) != [word] or re.fullmatch(r"\d+", word) or len(word.split()) != 1:
        return str(positions[0])  # a separator (',', ';') or a number would be read as something else
    if word not in cache:
        found = []
        for part in view.parts:
            try:
                where = part.text.find(word)
            except subjects.SubjectError:  # T5: characters it does not know
                where = None
            found.append(None if where is None else [part.start + p for p in where[0]])
        cache[word] = found
    found = cache[word]
    return word if None not in found and found[part_index] == positions else str(positions[0])


def _resolve_entry(tokenizer, text: str, entry: str, encoders) -> dict:
    """One `subjects` entry as the node resolves it: the noun's positions and each attribute's."""
    try:
        subject = subjects.resolve_subjects(tokenizer, text, entry, encoders=encoders).subjects[0]
    except subjects.SubjectError as error:
        return {"entry": entry, "positions": [], "noun": None, "attributes": [], "error": str(error)}
    # an index: its token's text; 'car@8': the word without the position that names its occurrence
    noun = subject.label if re.fullmatch(r"\d+", entry) else subjects.split_anchor(entry.split()[-1])[0]
    return {"entry": entry, "positions": list(subject.token_positions),
            "noun": {"word": noun, "positions": list(subject.token_positions)},
            "attributes": [{"word": a.label, "positions": list(a.token_positions)} for a in subject.attributes],
            "error": None}


def _tokens(segment: subjects.TextSegment, encoded: subjects.EncodedSegment) -> list[dict]:
    tokens = []
    for position, piece in enumerate(encoded.pieces):
        kind = encoded.kind(position)
        token = {"position": segment.start + position, "text": piece, "special": kind not in ("word", "embedding"),
                 "kind": kind}
        if encoded.encoder == "t5":
            token.update(text=t5_tokens.piece_text(piece), piece=piece)
        tokens.append(token)
    return tokens


def tokenize_response(text: str, spec: str = "", tokenizer=None, source: dict | None = None, encoders=None) -> dict:
    """The route's JSON answer for a prompt and the current `subjects` value.

    tokenizer: a CLIP's tokenizer (else the shipped one of the family `source` tells); encoders: SD3's loaded text
    encoders (else what `source` tells, else all)."""
    note = None
    if tokenizer is None:
        try:
            family, found, note = clip_family(source)
        except subjects.SubjectError as error:
            return {"error": str(error), "chunks": [], "subjects": []}
        tokenizer = shipped_tokenizer(family)
        encoders = found if encoders is None else encoders
    try:
        view = subjects.model_text(tokenizer, text, encoders)
    except subjects.SubjectError as error:
        return {"error": str(error), "chunks": [], "subjects": []}
    picks = {}
    chunks, index = [], 0
    for part_index, part in enumerate(view.parts):
        start = part.start
        for encoded in part.text.segments:
            kept = (1, encoded.length - 1) if encoded.encoder == "clip" else (0, encoded.end)
            segment = subjects.TextSegment(encoded.encoder, start, encoded.length, encoded.end, kept)
            tokens = _tokens(segment, encoded)
            if encoded.encoder == "clip":  # the decoded piece ('caf\u00e9'), as the word groups decode
                for token in tokens:
                    if token["kind"] == "word":
                        position = token["position"] - start
                        token["text"] = clip_tokens.decode(part.text.tokenizer, [
                            part.text.tokenizer.inv_vocab.get(int(encoded.tokens[position]), "")]) or token["text"]
            for word, group in encoded.words:
                positions = [start + p for p in group]
                if tokens[group[0]]["kind"] == "embedding":
                    word, pick = "<embedding>", str(positions[0])
                else:
                    pick = _pick(view, part_index, word, positions, picks)
                for p in group:
                    if "word" not in tokens[p]:  # a piece that spells two words belongs to the first
                        tokens[p].update(word=word, word_positions=positions, pick=pick)
            chunks.append({"index": index, "encoder": encoded.encoder, "start": start, "length": encoded.length,
                           "end_position": start + encoded.end, "tokens": tokens})
            start += encoded.length
            index += 1
    first = view.parts[0]
    chunk_length = first.text.segments[0].length
    resolved = [_resolve_entry(tokenizer, text, entry, encoders) for entry in subjects.parse_subject_spec(spec)]
    return {"family": view.family, "family_name": subjects.FAMILY_NAMES[view.family], "note": note,
            "chunk_length": chunk_length, "num_tokens": view.num_tokens, "chunks": chunks, "subjects": resolved}


async def tokenize_handler(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except ValueError:
        return web.json_response({"error": "the body is not JSON; send {\"text\": \"<prompt>\", \"subjects\": "
                                           "\"<optional, comma separated>\"}"}, status=400)
    try:
        text, spec, source = parse_request(body)
    except TokenizeRequestError as error:
        return web.json_response({"error": str(error)}, status=400)
    return web.json_response(tokenize_response(text, spec, source=source))


def register(routes: web.RouteTableDef) -> None:
    routes.post(ROUTE)(tokenize_handler)


def _running_prompt_server():
    """ComfyUI's PromptServer when its server is running in this process (main.py), else None."""
    server = sys.modules.get("server")  # imported by main.py before custom nodes; never imported here
    prompt_server = getattr(server, "PromptServer", None)
    return getattr(prompt_server, "instance", None)


_server = _running_prompt_server()
if _server is not None:
    register(_server.routes)
