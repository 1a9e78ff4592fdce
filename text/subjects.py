"""Subject tokens: which CLIP token positions a subject word covers, as the text encoder sees them.

Positions are global over the concatenated 77-token chunks (chunk c, position p -> c * 77 + p),
which is how ComfyUI lays out a long prompt's conditioning, so a position indexes the key axis of
the cross-attention directly. Position 0 of each chunk is the start token.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import torch


class SubjectError(ValueError):
    """A subject specification that cannot be resolved against the prompt."""


@dataclass(frozen=True)
class Subject:
    label: str
    token_positions: tuple[int, ...]  # global positions (chunk * chunk_length + position in chunk)
    chunk: int
    # the words that describe it ("red car": noun "car", attribute "red"), each with its own positions; the
    # neglect losses read the noun, the binding losses the pairs
    attributes: tuple["Subject", ...] = ()

    def positions_in_chunk(self, chunk_length: int) -> tuple[int, ...]:
        return tuple(p - self.chunk * chunk_length for p in self.token_positions)


@dataclass(frozen=True)
class TextSegment:
    """A run of the model's text sequence that Attend-and-Excite's re-normalisation treats as one text: a CLIP
    chunk (77 positions, start token first) or a T5 sequence (no start token; `</s>`, then padding).

    `kept` is the [first, stop) range of in-segment positions the re-normalisation's softmax spans: for a CLIP
    chunk the reference's [1, 76) (end token and padding included; with `exclude_padding` [1, end)); for T5 the
    prompt's own pieces only (no `</s>`, no padding). `end` is the in-segment position of the end token."""
    encoder: str                 # "clip" or "t5": whose tokens these are
    start: int                   # first position in the model's text sequence (the cond's token axis)
    length: int
    end: int
    kept: tuple[int, int]

    def softmax_range(self, exclude_padding: bool) -> tuple[int, int]:
        """In-segment [first, stop) of the positions A&E's softmax spans."""
        if self.encoder == "clip" and exclude_padding:
            return (self.kept[0], self.end)
        return self.kept


def clip_segments(chunk_length: int, end_positions) -> tuple[TextSegment, ...]:
    """The segments of a CLIP-only prompt: one per 77-token chunk."""
    return tuple(TextSegment("clip", c * chunk_length, chunk_length, end, (1, chunk_length - 1))
                 for c, end in enumerate(end_positions))


@dataclass(frozen=True)
class Subjects:
    """What Attention Text Encode hands to the sampler and the visualiser (the SUBJECTS type)."""
    subjects: tuple[Subject, ...]
    prompt: str
    chunk_length: int                       # 77 for CLIP
    end_positions: tuple[int, ...]          # per chunk: position (in chunk) of the end token
    token_words: tuple[tuple[str, ...], ...] = field(default=())  # per chunk: decoded token text
    # per encoding of the text (scheduled CLIP hooks may give several): a digest per token of the CONDITIONING
    # it was encoded to (`token_digests`), so that the sampler finds that cond in a combined/concatenated positive
    fingerprints: tuple[tuple[str, ...], ...] = field(default=())
    # the model's text sequence as the re-normalisation sees it; empty: one CLIP segment per chunk (SD1.x/SD2.x/
    # SDXL). DiT families set it: Flux one T5 segment, SD3 its CLIP chunks then its T5 sequence
    segments: tuple[TextSegment, ...] = field(default=())

    def __post_init__(self):
        if not self.segments:
            object.__setattr__(self, "segments", clip_segments(self.chunk_length, self.end_positions))

    def segment_of(self, position: int) -> int:
        """The index of the segment that holds global position `position`."""
        for index, segment in enumerate(self.segments):
            if segment.start <= position < segment.start + segment.length:
                return index
        raise IndexError(f"token position {position} is outside the prompt's {self.num_tokens} positions")

    @property
    def labels(self) -> list[str]:
        return [s.label for s in self.subjects]

    @property
    def attributes(self) -> list[tuple[int, Subject]]:
        """(index of its noun in `subjects`, attribute) for every attribute, in order."""
        return [(index, attribute) for index, subject in enumerate(self.subjects) for attribute in subject.attributes]

    def other_positions(self) -> list[int]:
        """The prompt's content token positions that are neither a subject's nor an attribute's."""
        used = {p for s in self.subjects for p in s.token_positions}
        used |= {p for _i, a in self.attributes for p in a.token_positions}
        return [segment.start + position for segment in self.segments
                for position in range(segment.kept[0], segment.end) if segment.start + position not in used]

    @property
    def num_tokens(self) -> int:
        return sum(segment.length for segment in self.segments)

    def __len__(self) -> int:
        return len(self.subjects)


@dataclass(frozen=True)
class PromptTokens:
    """One tokenizer's view of a prompt: per chunk, token ids (int) or embedding vectors."""
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


def _starts_word(sd_tokenizer, token) -> bool:
    """True if a token ends a word (its piece ends in '</w>'), so the next token starts one."""
    if isinstance(token, torch.Tensor) or int(token) == sd_tokenizer.start_token:
        return True
    return sd_tokenizer.inv_vocab.get(int(token), "").endswith("</w>")


def _sd_tokenizer(tokenizer):
    """The first SDTokenizer inside a CLIP's tokenizer (SDXL's clip_l and clip_g tokenize alike)."""
    for name in ("clip_l", "clip_h", "clip_g"):
        if hasattr(tokenizer, name):
            return getattr(tokenizer, name)
    if hasattr(tokenizer, "tokenize_with_weights") and hasattr(tokenizer, "inv_vocab"):
        return tokenizer
    raise SubjectError(f"{type(tokenizer).__name__} is not a CLIP tokenizer (SD1.x, SD2.x or SDXL); "
                       "attention guidance needs one of those text encoders")


def tokenize_prompt(tokenizer, text: str) -> PromptTokens:
    """Tokenizes exactly as the encoder will: weighting syntax, embeddings and 77-token chunks."""
    sd_tok = _sd_tokenizer(tokenizer)
    batches = sd_tok.tokenize_with_weights(text, return_word_ids=False)
    chunks = tuple(tuple(t for t, _w in batch) for batch in batches)
    words = tuple(tuple(_decode_piece(sd_tok, t) for t in chunk) for chunk in chunks)
    return PromptTokens(chunks, words, sd_tok.start_token, sd_tok.end_token)


def _content_tokens(tokenizer, text: str) -> list:
    """The tokens a phrase turns into, without start/end/padding, via the same tokenizer."""
    prompt = tokenize_prompt(tokenizer, text)
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


def _end_position(chunk, end_token) -> int:
    for position in range(1, len(chunk)):
        token = chunk[position]
        if not isinstance(token, torch.Tensor) and token == end_token:
            return position
    return len(chunk) - 1


def _prompt_words(prompt: PromptTokens) -> list[str]:
    words = []
    for chunk, ends in zip(prompt.words, (_end_position(c, prompt.end_token) for c in prompt.chunks)):
        words.extend(chunk[1:ends])
    return words


def _find(sequence: list, needle: list, chunk_length: int, end_positions: list[int], sd_tokenizer) -> list[int] | None:
    """First occurrence of the token run `needle` inside one chunk's content tokens, starting a word
    ('cat' must not match the tail of 'tom|cat')."""
    for chunk_index, end in enumerate(end_positions):
        base = chunk_index * chunk_length
        for start in range(1, end - len(needle) + 1):
            if not _starts_word(sd_tokenizer, sequence[base + start - 1]):
                continue
            if all(_same_token(sequence[base + start + k], needle[k]) for k in range(len(needle))):
                return [base + start + k for k in range(len(needle))]
    return None


def parse_subject_spec(spec: str) -> list[str]:
    """'cat, frog' -> ['cat', 'frog']; '2,5' -> ['2', '5']. Empty entries are dropped."""
    return [part.strip() for part in re.split(r"[,;\n]", spec) if part.strip()]


def resolve_subjects(tokenizer, text: str, spec: str) -> Subjects:
    """Turns the user's `subjects` (words or token indices) into token positions of `text`.

    A word matches the first place where its tokens appear in the prompt (all word pieces); an
    index is a global token position (chunk * 77 + position, 0 being the start token). An entry of several
    words is a subject group: its last word is the noun, the words before it its attributes ("red car"),
    found where the phrase appears as written, else each at its own first occurrence.
    """
    prompt = tokenize_prompt(tokenizer, text)
    chunk_length = len(prompt.chunks[0])
    if any(len(c) != chunk_length for c in prompt.chunks):
        raise SubjectError("the tokenizer produced chunks of unequal length; cannot index subject tokens")
    flat = [t for chunk in prompt.chunks for t in chunk]
    end_positions = [_end_position(c, prompt.end_token) for c in prompt.chunks]
    entries = parse_subject_spec(spec)
    if not entries:
        raise SubjectError("no subjects given: name the subject words of the prompt (e.g. 'cat, frog') "
                           "or their token indices (e.g. '2,5')")
    words_hint = ", ".join(repr(w) for w in _prompt_words(prompt))
    subjects = []
    for entry in entries:
        if re.fullmatch(r"\d+", entry):
            position = int(entry)
            chunk, in_chunk = divmod(position, chunk_length)
            if chunk >= len(prompt.chunks):
                raise SubjectError(f"token index {position} is out of range: the prompt has {len(flat)} token "
                                   f"positions in {len(prompt.chunks)} chunk(s); valid content indices are "
                                   f"{_valid_ranges(end_positions, chunk_length)}")
            if in_chunk == 0 or in_chunk >= end_positions[chunk]:
                what = "the start token" if in_chunk == 0 else ("the end token" if in_chunk == end_positions[chunk] else "padding")
                raise SubjectError(f"token index {position} points at {what} of chunk {chunk}; valid content "
                                   f"indices are {_valid_ranges(end_positions, chunk_length)} (prompt words: {words_hint})")
            subjects.append(Subject(prompt.words[chunk][in_chunk], (position,), chunk))
            continue
        words = entry.split()

        def find(phrase):
            needle = _content_tokens(tokenizer, phrase)
            return _find(flat, needle, chunk_length, end_positions, _sd_tokenizer(tokenizer)) if needle else None
        if not _content_tokens(tokenizer, entry):
            raise SubjectError(f"subject {entry!r} has no tokens")
        noun = words[-1]
        whole = find(entry)
        if whole is not None:  # the phrase as written: its last word's tokens are the noun's
            noun_count = len(_content_tokens(tokenizer, noun))
            noun_positions = whole[len(whole) - noun_count:] if len(words) > 1 else whole
        else:
            noun_positions = find(noun)
            if noun_positions is None:
                what = f"subject {entry!r}" if len(words) == 1 else \
                    f"subject {entry!r}: its noun {noun!r} (the entry's last word)"
                raise SubjectError(f"{what} is not in the prompt (as whole tokens, e.g. 'cat' does not match "
                                   f"'cats'); the prompt's words are: {words_hint}")
        attributes = []
        for index, word in enumerate(words[:-1]):
            if whole is not None:
                start = sum(len(_content_tokens(tokenizer, w)) for w in words[:index])
                positions = whole[start:start + len(_content_tokens(tokenizer, word))]
            else:
                positions = find(word)
                if positions is None:
                    raise SubjectError(f"subject {entry!r}: its attribute {word!r} is not in the prompt; the "
                                       f"prompt's words are: {words_hint}")
            attributes.append(Subject(word, tuple(positions), positions[0] // chunk_length))
        subjects.append(Subject(entry, tuple(noun_positions), noun_positions[0] // chunk_length, tuple(attributes)))
    return Subjects(tuple(subjects), text, chunk_length, tuple(end_positions), prompt.words)


def _valid_ranges(end_positions, chunk_length) -> str:
    return ", ".join(f"{c * chunk_length + 1}..{c * chunk_length + e - 1}" for c, e in enumerate(end_positions))


def token_digests(cond) -> tuple[str, ...]:
    """A digest of each token row of a cross-attention cond [1, T, D] (exact values, fp32).

    Encoding is deterministic and ConditioningConcat / Combine / SetArea / SetTimestepRange copy or keep the
    tensor, so a run of equal digests identifies the text's own embedding wherever it sits (at any token offset:
    a T5 sequence need not be a multiple of CLIP's 77)."""
    values = cond.detach()[0].to(device="cpu", dtype=torch.float32).contiguous().numpy()
    return tuple(hashlib.sha1(row.tobytes()).hexdigest() for row in values)


def find_run(digests: tuple[str, ...], needle: tuple[str, ...]) -> int | None:
    """The first token offset at which `needle` occurs in `digests` as a contiguous run, else None."""
    if not needle:
        return None
    for start in range(len(digests) - len(needle) + 1):
        if digests[start] == needle[0] and digests[start:start + len(needle)] == needle:
            return start
    return None
