"""HTTP route of the pack: POST /attn_guide/tokenize, the token picker's view of a prompt.

The token picker on Attention Text Encode (web/js/token_picker.js) shows the prompt's CLIP tokens as
the encoder sees them and lets the user click them into the `subjects` widget. This module answers
it with ComfyUI's shipped SD1.x CLIP tokenizer and the pack's own `subjects` logic, so that what the
picker shows, and what a click puts into `subjects`, is what the node resolves at run time.

Request:  {"text": "a cat and a frog", "subjects": "cat"}      ("subjects" is optional)
Response: {"chunk_length": 77, "num_tokens": 77,
           "chunks": [{"index": 0, "end_position": 6, "tokens": [
               {"position": 0, "text": "<|startoftext|>", "special": true, "kind": "start"},
               {"position": 2, "text": "cat", "special": false, "kind": "word", "word": "cat",
                "word_positions": [2], "pick": "cat"}, ...]}],
           "subjects": [{"entry": "cat", "positions": [2], "noun": {"word": "cat", "positions": [2]},
                         "attributes": [], "error": null}]}

Positions are global (chunk * 77 + position in chunk), as in `subjects.py`. `kind` is one of start,
word, embedding, end, padding; only word and embedding tokens are clickable. `pick` is what a click
adds to `subjects`: the word itself when the node would resolve that word to these very tokens (its
first occurrence), otherwise the token's index.

Each `subjects` entry is resolved as the node resolves it. A subject group ("red car": noun "car", the
words before it its attributes) reports its noun and each attribute, in the entry's order:
    {"entry": "red car", "positions": [3], "noun": {"word": "car", "positions": [3]},
     "attributes": [{"word": "red", "positions": [2]}], "error": null}
`positions` is the noun's (what the neglect losses read), as before groups existed; an entry that does not
resolve has `positions` [], `noun` null, `attributes` [] and the node's message in `error`.
"""
from __future__ import annotations

import re
import sys
from typing import Any

import torch
from aiohttp import web

from . import subjects

ROUTE = "/attn_guide/tokenize"
MAX_TEXT_LENGTH = 20000
_FIELDS = ("text", "subjects")


class TokenizeRequestError(ValueError):
    """A request the tokenize route rejects with 400."""


_tokenizer = None


def shipped_tokenizer():
    """ComfyUI's SD1.x CLIP tokenizer, with the embeddings folders the checkpoint loaders give a CLIP."""
    global _tokenizer
    if _tokenizer is None:
        import comfy.sd1_clip
        import folder_paths
        _tokenizer = comfy.sd1_clip.SD1Tokenizer(embedding_directory=folder_paths.get_folder_paths("embeddings"))
    return _tokenizer


def parse_request(body: Any) -> tuple[str, str]:
    """The (text, subjects) of a request body, or TokenizeRequestError naming what is wrong."""
    if not isinstance(body, dict):
        raise TokenizeRequestError(f"the body must be a JSON object like {{\"text\": \"a cat\"}}, "
                                   f"not a JSON {type(body).__name__}")
    unknown = sorted(set(body) - set(_FIELDS))
    if unknown:
        raise TokenizeRequestError(f"unknown field(s) {', '.join(map(repr, unknown))}; valid fields: "
                                   f"{', '.join(map(repr, _FIELDS))}")
    if "text" not in body:
        raise TokenizeRequestError("missing field 'text' (the prompt to tokenize)")
    text, spec = body["text"], body.get("subjects", "")
    if not isinstance(text, str):
        raise TokenizeRequestError(f"'text' must be a string, not {type(text).__name__}")
    if not isinstance(spec, str):
        raise TokenizeRequestError(f"'subjects' must be a string (comma separated words or token indices), "
                                   f"not {type(spec).__name__}")
    if len(text) > MAX_TEXT_LENGTH:
        raise TokenizeRequestError(f"'text' has {len(text)} characters; the token picker tokenizes at most "
                                   f"{MAX_TEXT_LENGTH}")
    return text, spec


def _decode(sd_tokenizer, pieces: list[str]) -> str:
    """Byte-level BPE pieces back to text ('caf\u00c3\u00a9</w>' -> 'caf\u00e9')."""
    return sd_tokenizer.tokenizer.convert_tokens_to_string(pieces).replace("</w>", " ").strip()


def _word_groups(sd_tokenizer, chunk, end_position: int) -> list[list[int]]:
    """Positions (in chunk) of each word's pieces: a CLIP word ends with the piece ending in '</w>'."""
    groups, current = [], []
    for position in range(1, end_position):
        token = chunk[position]
        if isinstance(token, torch.Tensor):  # an embedding vector is a word of its own
            if current:
                groups.append(current)
                current = []
            groups.append([position])
            continue
        current.append(position)
        if sd_tokenizer.inv_vocab.get(int(token), "</w>").endswith("</w>"):
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


class _FirstOccurrence:
    """Where `subjects.resolve_subjects` puts a word: the first run of its tokens inside one chunk's content.

    The same search as `subjects._find`, indexed by token id so that a long prompt's every word can be
    looked up without tokenizing the prompt again for each (`tests/test_browser.py` checks they agree).
    """

    def __init__(self, prompt: subjects.PromptTokens):
        self.chunk_length = len(prompt.chunks[0])
        self.ends = [subjects._end_position(chunk, prompt.end_token) for chunk in prompt.chunks]
        self.flat = [None if isinstance(t, torch.Tensor) else int(t) for chunk in prompt.chunks for t in chunk]
        self.starts: dict[int, list[int]] = {}
        for chunk_index, end in enumerate(self.ends):
            base = chunk_index * self.chunk_length
            for position in range(base + 1, base + end):
                if self.flat[position] is not None:
                    self.starts.setdefault(self.flat[position], []).append(position)

    def find(self, needle: list) -> list[int] | None:
        if not needle or any(isinstance(t, torch.Tensor) for t in needle):
            return None
        needle = [int(t) for t in needle]
        for start in self.starts.get(needle[0], ()):
            chunk_index, in_chunk = divmod(start, self.chunk_length)
            if in_chunk + len(needle) <= self.ends[chunk_index] and \
                    self.flat[start:start + len(needle)] == needle:
                return list(range(start, start + len(needle)))
        return None


def _pick(tokenizer, occurrences: _FirstOccurrence, word: str, positions: list[int], cache: dict) -> str:
    """What a click on this word adds to `subjects`: the word if the node resolves it to these tokens."""
    if not word or subjects.parse_subject_spec(word) != [word] or re.fullmatch(r"\d+", word):
        return str(positions[0])  # a separator (',', ';') or a number would be read as something else
    if word not in cache:
        cache[word] = occurrences.find(subjects._content_tokens(tokenizer, word))
    return word if cache[word] == positions else str(positions[0])  # a later occurrence: only its index


def _resolve_entry(tokenizer, text: str, entry: str) -> dict:
    """One `subjects` entry as the node resolves it: the noun's positions and each attribute's."""
    try:
        subject = subjects.resolve_subjects(tokenizer, text, entry).subjects[0]
    except subjects.SubjectError as error:
        return {"entry": entry, "positions": [], "noun": None, "attributes": [], "error": str(error)}
    noun = subject.label if re.fullmatch(r"\d+", entry) else entry.split()[-1]  # an index: its token's text
    return {"entry": entry, "positions": list(subject.token_positions),
            "noun": {"word": noun, "positions": list(subject.token_positions)},
            "attributes": [{"word": a.label, "positions": list(a.token_positions)} for a in subject.attributes],
            "error": None}


def tokenize_response(text: str, spec: str = "", tokenizer=None) -> dict:
    """The route's JSON answer for a prompt and the current `subjects` value."""
    tokenizer = tokenizer if tokenizer is not None else shipped_tokenizer()
    sd_tok = subjects._sd_tokenizer(tokenizer)
    prompt = subjects.tokenize_prompt(tokenizer, text)
    chunk_length = len(prompt.chunks[0])
    occurrences, picks = _FirstOccurrence(prompt), {}
    chunks = []
    for chunk_index, (chunk, words) in enumerate(zip(prompt.chunks, prompt.words)):
        base = chunk_index * chunk_length
        end = subjects._end_position(chunk, prompt.end_token)
        tokens = []
        for position, word in enumerate(words):
            kind = "start" if position == 0 else "end" if position == end else "padding" if position > end else (
                "embedding" if isinstance(chunk[position], torch.Tensor) else "word")
            if kind == "word":
                word = _decode(sd_tok, [sd_tok.inv_vocab.get(int(chunk[position]), "")]) or word
            tokens.append({"position": base + position, "text": word, "special": kind not in ("word", "embedding"),
                           "kind": kind})
        for group in _word_groups(sd_tok, chunk, end):
            positions = [base + p for p in group]
            if tokens[group[0]]["kind"] == "embedding":
                word, pick = "<embedding>", str(positions[0])
            else:
                word = _decode(sd_tok, [sd_tok.inv_vocab.get(int(chunk[p]), "") for p in group])
                pick = _pick(tokenizer, occurrences, word, positions, picks)
            for p in group:
                tokens[p].update(word=word, word_positions=positions, pick=pick)
        chunks.append({"index": chunk_index, "end_position": base + end, "tokens": tokens})
    resolved = [_resolve_entry(tokenizer, text, entry) for entry in subjects.parse_subject_spec(spec)]
    return {"chunk_length": chunk_length, "num_tokens": chunk_length * len(chunks), "chunks": chunks,
            "subjects": resolved}


async def tokenize_handler(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except ValueError:
        return web.json_response({"error": "the body is not JSON; send {\"text\": \"<prompt>\", \"subjects\": "
                                           "\"<optional, comma separated>\"}"}, status=400)
    try:
        text, spec = parse_request(body)
    except TokenizeRequestError as error:
        return web.json_response({"error": str(error)}, status=400)
    return web.json_response(tokenize_response(text, spec))


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
