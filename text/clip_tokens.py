"""CLIP's tokens of a prompt (SD1.x, SD2.x, SDXL, and SD3's CLIP-L/G part): byte-level BPE in 77-token chunks.

A chunk is the start token, up to 75 content tokens, the end token, then padding (SD1.x and CLIP-L: the end token
repeated; SD2's CLIP-H and CLIP-G: token 0). A word's last piece ends in '</w>', so a word starts after a piece
that ends in '</w>' ('tomcat' is 'tom', 'cat</w>': 'cat' must not match its tail). ComfyUI lays a long prompt's
chunks end to end (chunk c, position p -> c * 77 + p), and SD3 uses CLIP-L's and CLIP-G's chunks side by side in
the features (both tokenize alike), so one chunk layout serves every CLIP family.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from .subjects import EncodedSegment, SubjectError

ENCODER = "clip"


@dataclass(frozen=True)
class PromptTokens:
    """One CLIP tokenizer's view of a prompt: per chunk, token ids (int) or embedding vectors."""
    chunks: tuple[tuple[object, ...], ...]
    words: tuple[tuple[str, ...], ...]
    start_token: int
    end_token: int


def _decode_piece(sd_tokenizer, token) -> str:
    if isinstance(token, torch.Tensor):
        return "<embedding>"
    if int(token) in (sd_tokenizer.start_token, sd_tokenizer.end_token):
        return sd_tokenizer.inv_vocab.get(int(token), "?")
    # decode() turns CLIP's byte-level pieces back into text ('cafÃ©' -> 'café')
    return sd_tokenizer.tokenizer.decode([int(token)]).strip()


def decode(sd_tokenizer, pieces: list[str]) -> str:
    """Byte-level BPE pieces back to text ('caf\u00c3\u00a9</w>' -> 'caf\u00e9')."""
    return sd_tokenizer.tokenizer.convert_tokens_to_string(pieces).replace("</w>", " ").strip()


def _ends_word(sd_tokenizer, token) -> bool:
    """True if the next token starts a word: this one is the start token, an embedding, or ends in '</w>'."""
    if isinstance(token, torch.Tensor) or int(token) == sd_tokenizer.start_token:
        return True
    return sd_tokenizer.inv_vocab.get(int(token), "").endswith("</w>")


def end_position(chunk, end_token) -> int:
    for position in range(1, len(chunk)):
        token = chunk[position]
        if not isinstance(token, torch.Tensor) and token == end_token:
            return position
    return len(chunk) - 1


def tokenize_prompt(sd_tokenizer, text: str, tokenizer_options: dict | None = None) -> PromptTokens:
    """Tokenizes exactly as the encoder will: weighting syntax, embeddings and 77-token chunks."""
    options = {"tokenizer_options": tokenizer_options} if tokenizer_options else {}
    batches = sd_tokenizer.tokenize_with_weights(text, return_word_ids=False, **options)
    chunks = tuple(tuple(t for t, _w in batch) for batch in batches)
    words = tuple(tuple(_decode_piece(sd_tokenizer, t) for t in chunk) for chunk in chunks)
    return PromptTokens(chunks, words, sd_tokenizer.start_token, sd_tokenizer.end_token)


def content_tokens(sd_tokenizer, text: str) -> list:
    """The tokens a phrase turns into, without start/end/padding, via the same tokenizer."""
    prompt = tokenize_prompt(sd_tokenizer, text)
    out = []
    for chunk in prompt.chunks:
        for position, token in enumerate(chunk):
            if position == 0:
                continue
            if not isinstance(token, torch.Tensor) and token == prompt.end_token:
                break
            out.append(token)
    return out


def _same_token(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    return int(a) == int(b)


def _word_groups(sd_tokenizer, chunk, end: int) -> list[list[int]]:
    """Positions (in chunk) of each word's pieces: a CLIP word ends with the piece ending in '</w>'."""
    groups, current = [], []
    for position in range(1, end):
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


def _segment(sd_tokenizer, chunk, pieces) -> EncodedSegment:
    end = end_position(chunk, sd_tokenizer.end_token)
    words = []
    for group in _word_groups(sd_tokenizer, chunk, end):
        if isinstance(chunk[group[0]], torch.Tensor):
            words.append(("<embedding>", tuple(group)))
        else:
            words.append((decode(sd_tokenizer, [sd_tokenizer.inv_vocab.get(int(chunk[p]), "") for p in group]),
                          tuple(group)))
    return EncodedSegment(ENCODER, tuple(chunk), tuple(pieces), 1, end, tuple(words))


class ClipText:
    """A prompt as one CLIP tokenizer gives it to the encoder: its 77-token chunks, end to end.

    Positions are over the concatenated chunks (chunk c, position p -> c * 77 + p)."""
    encoder = ENCODER

    def __init__(self, sd_tokenizer, text: str, tokenizer_options: dict | None = None):
        self.tokenizer = sd_tokenizer
        self.prompt = tokenize_prompt(sd_tokenizer, text, tokenizer_options)
        self.chunk_length = len(self.prompt.chunks[0])
        if any(len(c) != self.chunk_length for c in self.prompt.chunks):
            raise SubjectError("the tokenizer produced chunks of unequal length; cannot index subject tokens")
        self.segments = tuple(_segment(sd_tokenizer, chunk, pieces)
                              for chunk, pieces in zip(self.prompt.chunks, self.prompt.words))

    @cached_property
    def _flat(self) -> list:
        return [t for chunk in self.prompt.chunks for t in chunk]

    @cached_property
    def _starts(self) -> dict[int, list[int]]:
        """Token id -> the positions, in order, where it sits among a chunk's content tokens (the search's index)."""
        starts: dict[int, list[int]] = {}
        for index, segment in enumerate(self.segments):
            base = index * self.chunk_length
            for position in range(base + 1, base + segment.end):
                if not isinstance(self._flat[position], torch.Tensor):
                    starts.setdefault(int(self._flat[position]), []).append(position)
        return starts

    def find_tokens(self, needle: list) -> list[int] | None:
        """First occurrence of the token run `needle` inside one chunk's content tokens, starting a word
        ('cat' must not match the tail of 'tom|cat')."""
        if not needle:
            return None
        candidates = None if isinstance(needle[0], torch.Tensor) else self._starts.get(int(needle[0]), ())
        if candidates is None:  # an embedding first: scan
            candidates = [index * self.chunk_length + p for index, segment in enumerate(self.segments)
                          for p in range(1, segment.end)]
        for start in candidates:
            chunk, in_chunk = divmod(start, self.chunk_length)
            if in_chunk + len(needle) > self.segments[chunk].end:
                continue
            if not _ends_word(self.tokenizer, self._flat[start - 1]):
                continue
            if all(_same_token(self._flat[start + k], needle[k]) for k in range(len(needle))):
                return [start + k for k in range(len(needle))]
        return None

    def has_tokens(self, phrase: str) -> bool:
        return bool(content_tokens(self.tokenizer, phrase))

    def find(self, entry: str) -> list[tuple[int, ...]] | None:
        """Where `entry` first appears as written: the positions of each of its words (`entry.split()`), else None.

        The entry is tokenized as one phrase and cut into its words by each word's own token count (the last
        word's tokens are the noun's)."""
        words = entry.split()
        whole = self.find_tokens(content_tokens(self.tokenizer, entry))
        if whole is None:
            return None
        if len(words) == 1:
            return [tuple(whole)]
        counts = [len(content_tokens(self.tokenizer, word)) for word in words]
        out, start = [], 0
        for count in counts[:-1]:
            out.append(tuple(whole[start:start + count]))
            start += count
        out.append(tuple(whole[len(whole) - counts[-1]:]))
        return out

    def content_pieces(self) -> list[str]:
        """The decoded content tokens of every chunk, in order (what an error lists as the prompt's words)."""
        return [piece for segment in self.segments for piece in segment.pieces[segment.first:segment.end]]

    def hint(self) -> str:
        return "the prompt's words are: " + ", ".join(repr(w) for w in self.content_pieces())
