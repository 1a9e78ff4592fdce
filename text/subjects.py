"""Subject tokens: which positions of the model's text sequence a subject word covers, as the encoders see it.

A position indexes the key axis of the cross-attention (the cond's token axis) directly:
- SD1.x, SD2.x, SDXL: CLIP's 77-token chunks end to end (chunk c, position p -> c * 77 + p); position 0 of each
  chunk is the start token.
- Flux.1, Chroma: the T5 sequence only (no start token; the CLIP-L tokens a Flux CLIP also makes are not in it).
- SD3/SD3.5: CLIP-L/G's chunks (the two side by side in the features), then the T5 sequence, which starts at
  77 * chunks; a word has positions in both, its CLIP tokens and its T5 pieces. An SD3 CLIP loaded without T5-XXL
  has the CLIP part only; one with T5 alone, the T5 part only.

The tokenizer-specific parts are `clip_tokens` (BPE, '</w>' word ends, 77-chunks) and `t5_tokens` (sentencepiece,
'▁' word starts, `</s>`, padding); this module holds the shared resolution and the dataclasses. The family is told
from the tokenizer object (which sub-tokenizers it has), not from the model.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from functools import cached_property

import torch


class SubjectError(ValueError):
    """A subject specification that cannot be resolved against the prompt."""


@dataclass(frozen=True)
class Subject:
    label: str
    token_positions: tuple[int, ...]  # positions in the model's text sequence (CLIP: chunk * 77 + position in chunk)
    chunk: int  # the segment of its first position (CLIP-only models: its chunk)
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
    chunk_length: int                       # 77 for CLIP (SD3 too); Flux/Chroma: the T5 sequence's length
    end_positions: tuple[int, ...]          # per CLIP chunk (Flux/Chroma: the T5 sequence): position of the end token
    # per segment: each token's text as its tokenizer writes it (CLIP: decoded; T5: its pieces, '▁cat')
    token_words: tuple[tuple[str, ...], ...] = field(default=())
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
class EncodedSegment:
    """One segment of an encoder's tokens of a prompt (`clip_tokens`, `t5_tokens`): a CLIP chunk or a T5 sequence.

    Positions are in-segment. `words` are the content words in order, each with the positions of the tokens that
    spell it (a CLIP word's BPE pieces; a T5 word's pieces, a bare '▁' left out); a content position in no word is a
    bare '▁' (T5)."""
    encoder: str                          # "clip" or "t5"
    tokens: tuple                         # per position: token id (int) or embedding vector (tensor)
    pieces: tuple[str, ...]               # per position: the token as its tokenizer writes it
    first: int                            # first content position (CLIP: 1, after the start token; T5: 0)
    end: int                              # position of the end token
    words: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def length(self) -> int:
        return len(self.tokens)

    def kind(self, position: int) -> str:
        """start, word, embedding, space (a bare '▁'), end or padding."""
        if position < self.first:
            return "start"
        if position >= self.end:
            return "end" if position == self.end else "padding"
        if isinstance(self.tokens[position], torch.Tensor):
            return "embedding"
        return "word" if position in self._in_words else "space"

    @cached_property
    def _in_words(self) -> frozenset[int]:
        return frozenset(p for _text, positions in self.words for p in positions)


SUPPORTED_FAMILIES = "SD1.x, SD2.x, SDXL (CLIP), SD3/SD3.5 (CLIP-L/G and T5-XXL), Flux.1 and Chroma (T5-XXL)"
CLIP_NAMES = ("clip_l", "clip_h", "clip_g")
FAMILY_NAMES = {"clip": "SD1.x/SD2.x/SDXL", "sd3": "SD3/SD3.5", "flux": "Flux.1", "t5": "Chroma"}


def _is_sd_tokenizer(value) -> bool:
    return hasattr(value, "tokenize_with_weights") and hasattr(value, "inv_vocab")


def _sub_tokenizers(tokenizer) -> dict[str, object]:
    """A CLIP's tokenizer's per-encoder tokenizers by attribute name (SD3Tokenizer: clip_l, clip_g, t5xxl)."""
    if _is_sd_tokenizer(tokenizer):  # a bare SDTokenizer: its embedding key names its encoder
        return {getattr(tokenizer, "embedding_key", "clip_l"): tokenizer}
    return {name: value for name, value in vars(tokenizer).items() if _is_sd_tokenizer(value)}


def text_family(tokenizer) -> tuple[str, dict[str, object]]:
    """(family, its tokenizers by encoder name) for a CLIP's tokenizer, told from the sub-tokenizers it has:
    'clip' (SD1Tokenizer, SD2Tokenizer, SDXLTokenizer), 'sd3' (SD3Tokenizer: clip_l, clip_g, t5xxl), 'flux'
    (FluxTokenizer: clip_l, t5xxl), 't5' (a T5-XXL alone: Chroma's PixArtTokenizer, clip_t5xxl)."""
    subs = _sub_tokenizers(tokenizer)
    names = set(subs)
    if names and names <= set(CLIP_NAMES):
        return "clip", subs
    if names == {"clip_l", "clip_g", "t5xxl"}:
        return "sd3", subs
    if names == {"clip_l", "t5xxl"}:
        return "flux", subs
    if names in ({"clip_t5xxl"}, {"t5xxl"}):
        return "t5", {"t5xxl": subs.popitem()[1]}
    what = f"text encoders {', '.join(sorted(names))}" if names else "no CLIP or T5 tokenizer"
    raise SubjectError(f"{type(tokenizer).__name__} ({what}) is not a text encoder attention guidance reads: it "
                       f"works with {SUPPORTED_FAMILIES}; Qwen-Image, HiDream, Lumina, WAN, Flux.2 and the other "
                       "families whose text encoder is an LLM (or another T5) are not supported")


def text_encoders(clip) -> frozenset[str] | None:
    """The encoders a CLIP has loaded, by name (clip_l, clip_g, t5xxl), where its model says (SD3's are each
    optional: a CLIP loaded without T5-XXL encodes the CLIP part only); None where it cannot tell."""
    model = getattr(clip, "cond_stage_model", None)
    if model is None or not any(hasattr(model, name) for name in ("clip_l", "clip_g", "t5xxl")):
        return None
    return frozenset(name for name in ("clip_l", "clip_g", "t5xxl") if getattr(model, name, None) is not None)


@dataclass(frozen=True)
class TextPart:
    """One encoder's tokens of the prompt (a `clip_tokens.ClipText` or `t5_tokens.T5Text`) and where they start in
    the model's text sequence."""
    text: object
    start: int

    @property
    def encoder(self) -> str:
        return self.text.encoder

    @property
    def length(self) -> int:
        return sum(segment.length for segment in self.text.segments)


@dataclass(frozen=True)
class ModelText:
    """The prompt as the model's text sequence holds it: its encoders' parts, in order."""
    family: str
    parts: tuple[TextPart, ...]

    @property
    def segments(self) -> tuple[TextSegment, ...]:
        out = []
        for part in self.parts:
            start = part.start
            for segment in part.text.segments:
                kept = (1, segment.length - 1) if segment.encoder == "clip" else (0, segment.end)
                out.append(TextSegment(segment.encoder, start, segment.length, segment.end, kept))
                start += segment.length
        return tuple(out)

    def encoded(self) -> list[tuple[TextSegment, EncodedSegment]]:
        return list(zip(self.segments, (s for part in self.parts for s in part.text.segments)))

    @property
    def num_tokens(self) -> int:
        return sum(part.length for part in self.parts)

    def describe(self) -> str:
        """What the model's text is, for messages: 'CLIP 0..76, T5 77..153'."""
        return ", ".join(f"{part.encoder.upper()} {part.start}..{part.start + part.length - 1}" for part in self.parts)


def model_text(tokenizer, text: str, encoders=None, tokenizer_options: dict | None = None) -> ModelText:
    """Tokenizes `text` as each encoder the model reads will, laid out as the model's text sequence.

    encoders: the encoders the CLIP has loaded (`text_encoders`), None for all of its family's. tokenizer_options:
    the CLIP's (ComfyUI's CLIP.tokenizer_options: a T5 min_length or min_padding changes the padding)."""
    from . import clip_tokens, t5_tokens  # they build on this module's dataclasses
    family, subs = text_family(tokenizer)
    present = set(subs) if encoders is None else set(encoders)
    if family == "clip":
        return ModelText(family, (TextPart(clip_tokens.ClipText(subs[next(n for n in CLIP_NAMES if n in subs)], text,
                                                                tokenizer_options), 0),))
    parts, start = [], 0
    if family == "sd3":
        clip_name = next((n for n in ("clip_l", "clip_g") if n in present), None)
        if clip_name is not None:
            parts.append(TextPart(clip_tokens.ClipText(subs[clip_name], text, tokenizer_options), 0))
            start = parts[0].length
    if family != "sd3" or "t5xxl" in present:
        parts.append(TextPart(t5_tokens.T5Text(subs["t5xxl"], text, tokenizer_options), start))
    if not parts:
        raise SubjectError(f"this {FAMILY_NAMES[family]} CLIP has none of its text encoders loaded (CLIP-L, CLIP-G, "
                           "T5-XXL), so the model sees no prompt tokens to guide")
    return ModelText(family, tuple(parts))


def parse_subject_spec(spec: str) -> list[str]:
    """'cat, frog' -> ['cat', 'frog']; '2,5' -> ['2', '5']. Empty entries are dropped."""
    return [part.strip() for part in re.split(r"[,;\n]", spec) if part.strip()]


def _valid_ranges(view: ModelText) -> str:
    ranges = []
    for segment, _encoded in view.encoded():
        first = segment.start + (1 if segment.encoder == "clip" else 0)
        last = segment.start + segment.end - 1
        if view.family != "clip":
            ranges.append(f"{first}..{last} ({segment.encoder.upper()})" if last >= first else
                          f"none ({segment.encoder.upper()}: no prompt tokens)")
        else:
            ranges.append(f"{first}..{last}")
    return ", ".join(ranges)


def _hint(view: ModelText) -> str:
    return view.parts[0].text.hint() if view.family == "clip" else "; ".join(p.text.hint() for p in view.parts)


def _index_subject(view: ModelText, entry: str, segments: tuple[TextSegment, ...]) -> Subject:
    """A token index: one position of the model's text sequence, which must be a content token."""
    position = int(entry)
    clip_only = view.family == "clip"
    if position >= view.num_tokens:
        if clip_only:
            raise SubjectError(f"token index {position} is out of range: the prompt has {view.num_tokens} token "
                               f"positions in {len(segments)} chunk(s); valid content indices are {_valid_ranges(view)}")
        if view.family == "flux":
            seen = "Flux attends only the T5 text (the CLIP-L tokens of a Flux CLIP are not in the model's text)"
        elif view.family == "t5":
            seen = "the model attends only the T5 text"
        elif len(view.parts) == 2:
            seen = "the model's text is the CLIP tokens, then the T5 pieces"
        else:
            missing = "T5-XXL" if view.parts[0].encoder == "clip" else "CLIP-L/G"
            seen = f"the model's text is its {view.parts[0].encoder.upper()} part only (this CLIP has no {missing} loaded)"
        raise SubjectError(f"token index {position} is out of range: {seen}, {view.num_tokens} positions "
                           f"({view.describe()}); valid content indices are {_valid_ranges(view)}")
    index = next(i for i, s in enumerate(segments) if s.start <= position < s.start + s.length)
    segment, encoded = view.encoded()[index]
    in_segment = position - segment.start
    kind = encoded.kind(in_segment)
    if kind in ("start", "end", "padding"):
        what = {"start": "the start token", "end": "the end token", "padding": "padding"}[kind]
        where = f"chunk {index}" if clip_only else (
            f"CLIP chunk {index}" if segment.encoder == "clip" else "the T5 text")
        words = f"prompt words: {', '.join(repr(w) for w in view.parts[0].text.content_pieces())}" if clip_only \
            else _hint(view)
        raise SubjectError(f"token index {position} points at {what} of {where}; valid content indices are "
                           f"{_valid_ranges(view)} ({words})")
    if kind == "space":
        word = next(((text, positions) for text, positions in encoded.words if positions[0] > in_segment), None)
        pieces = [segment.start + p for p in word[1]] if word else []
        before = f" before {word[0]!r} (its pieces: {', '.join(map(str, pieces))})" if word else ""
        raise SubjectError(f"token index {position} points at a bare '▁' T5 piece{before}: it only marks a space and "
                           "carries no word content; give the word or its pieces' indices")
    label = encoded.pieces[in_segment]
    if segment.encoder == "t5":
        label = label.lstrip("▁") or label
    return Subject(label, (position,), index)


# An entry's word at a given occurrence: 'red@7' is the 'red' whose first token is at position 7 of the model's text
ANCHORED_WORD = re.compile(r"(.+)@(\d+)")


def split_anchor(word: str) -> tuple[str, int | None]:
    """'red@7' -> ('red', 7): the word and the position its occurrence starts at; 'red' -> ('red', None)."""
    match = ANCHORED_WORD.fullmatch(word)
    return (match.group(1), int(match.group(2))) if match else (word, None)


def _same_token(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    return int(a) == int(b)


def occurrences(part: TextPart, word: str) -> list[tuple[int, ...]]:
    """Every place `word` appears in one encoder's part, in order: the positions (in the model's text) of the tokens
    that spell it there, whole words as `find` matches them (CLIP: its tokens, from a word's start, inside one
    chunk; T5: its words, case-insensitively, the pieces that spell them). The first is `find`'s."""
    out, base = [], part.start
    if part.encoder == "clip":
        from .clip_tokens import content_tokens
        needle = content_tokens(part.text.tokenizer, word)
        for segment in part.text.segments:
            for _text, positions in segment.words:
                first = positions[0]
                if needle and first + len(needle) <= segment.end and all(
                        _same_token(segment.tokens[first + k], token) for k, token in enumerate(needle)):
                    out.append(tuple(base + first + k for k in range(len(needle))))
            base += segment.length
        return out
    needle = part.text.phrase_words(word)
    for segment in part.text.segments:
        words = [(text.casefold(), positions) for text, positions in segment.words]
        for start in range(len(words) - len(needle) + 1) if needle else ():
            run = words[start:start + len(needle)]
            if all(text == wanted for (text, _p), wanted in zip(run, needle)):
                out.append(tuple(sorted({base + p for _text, positions in run for p in positions})))
        base += segment.length
    return out


def _occurrence_at(view: ModelText, entry: str, word: str, position: int) -> int:
    """Which occurrence of `word` (0: the first) starts at `position`, counted in the encoder part that holds it."""
    part = next((p for p in view.parts if p.start <= position < p.start + p.length), None)
    if part is None:
        raise SubjectError(f"subject {entry!r}: {word}@{position} points past the model's text ({view.num_tokens} "
                           f"positions: {view.describe()})")
    found = occurrences(part, word)
    starts = [positions[0] for positions in found]
    if position in starts:
        return starts.index(position)
    where = "the prompt" if part.encoder == "clip" else "the T5 text"
    if not starts:
        raise SubjectError(f"subject {entry!r}: {word!r} is not in {where} (as whole tokens); {part.text.hint()}")
    at = ", ".join(map(str, starts))
    there = next((text for segment, encoded in view.encoded() if segment.start <= position < segment.start
                  + segment.length for text, positions in encoded.words if position - segment.start in positions), None)
    what = f"position {position} holds {there!r}" if there else f"position {position} is not a word"
    raise SubjectError(f"subject {entry!r}: {word}@{position} names the {word!r} that starts at position {position}, "
                       f"but {what}; {word!r} starts at {at} in {where} (the prompt changed? the token picker shows "
                       "the positions)")


def _resolve_in_part(part: TextPart, entry: str, hint: str,
                     anchored: dict[int, int] | None = None) -> list[tuple[int, ...]]:
    """The positions (in the model's text) of each word of `entry` in one encoder's part. Without anchors: the phrase
    as written, else each word at its own first occurrence (the last word is the noun). With `anchored` (the entry's
    word index -> which occurrence, for its 'word@position' words): each word on its own, an anchored word at that
    occurrence, the others at their first."""
    words = [split_anchor(word)[0] for word in entry.split()]
    where = "the prompt" if part.encoder == "clip" else "the T5 text"
    if anchored:
        found = []
        for index, word in enumerate(words):
            if index in anchored:
                places = occurrences(part, word)
                if anchored[index] >= len(places):
                    raise SubjectError(f"subject {entry!r}: {where} has {len(places)} occurrence(s) of {word!r}, "
                                       f"not the {anchored[index] + 1}th its position names in the other encoder's "
                                       f"part; {hint}")
                found.append(places[anchored[index]])  # occurrences are in the model's text already
                continue
            positions = part.text.find(word)
            if positions is None:
                role = "noun" if index == len(words) - 1 else "attribute"
                raise SubjectError(f"subject {entry!r}: its {role} {word!r} is not in {where}; {hint}")
            found.append(tuple(part.start + p for p in positions[0]))
        return found
    found = part.text.find(entry)
    if found is None:
        noun = part.text.find(words[-1])
        if noun is None:
            what = f"subject {entry!r}" if len(words) == 1 else \
                f"subject {entry!r}: its noun {words[-1]!r} (the entry's last word)"
            if part.encoder == "clip":
                raise SubjectError(f"{what} is not in the prompt (as whole tokens, e.g. 'cat' does not match "
                                   f"'cats'); {hint}")
            raise SubjectError(f"{what} is not in the T5 text (as whole words, e.g. 'cat' does not match 'cats'); "
                               f"{hint}")
        found = []
        for word in words[:-1]:
            positions = part.text.find(word)
            if positions is None:
                raise SubjectError(f"subject {entry!r}: its attribute {word!r} is not in {where}; {hint}")
            found.append(positions[0])
        found.append(noun[0])
    return [tuple(part.start + p for p in positions) for positions in found]


def resolve_subjects(tokenizer, text: str, spec: str, encoders=None, tokenizer_options: dict | None = None) -> Subjects:
    """Turns the user's `subjects` (words or token indices) into positions of the model's text sequence.

    A word matches the first place where it appears in the prompt, as each encoder the model reads tokenizes it
    (CLIP: all its BPE pieces; T5: the pieces that spell it). An index is a position of the model's text sequence:
    CLIP-only models chunk * 77 + position (0 being a chunk's start token); Flux/Chroma the T5 piece; SD3 a CLIP
    position below 77 * chunks, a T5 piece from there on. An entry of several words is a subject group: its last
    word is the noun, the words before it its attributes ("red car"), found where the phrase appears as written,
    else each at its own first occurrence. A word of an entry may name its occurrence: 'word@N' is the `word` whose
    first token is at position N of the model's text (as the token picker shows it; "red@7 bench" for the second
    'red' of "a red car next to a red bench"). An entry with such a word has its words found one by one: the
    'word@N' ones there (SD3: N in the CLIP or the T5 part; the other part's same occurrence, counted in order), the
    others at their first occurrence. With SD3 a word's positions are its CLIP tokens and its T5 pieces.

    tokenizer: a CLIP's tokenizer, or the CLIP itself (then its loaded encoders and tokenizer options are read
    from it). encoders, tokenizer_options: see `model_text`.
    """
    if hasattr(tokenizer, "cond_stage_model") and hasattr(tokenizer, "tokenizer"):  # a CLIP
        clip = tokenizer
        tokenizer = clip.tokenizer
        encoders = text_encoders(clip) if encoders is None else encoders
        if tokenizer_options is None:
            tokenizer_options = getattr(clip, "tokenizer_options", None) or None
    view = model_text(tokenizer, text, encoders, tokenizer_options)
    segments = view.segments
    entries = parse_subject_spec(spec)
    if not entries:
        raise SubjectError("no subjects given: name the subject words of the prompt (e.g. 'cat, frog') "
                           "or their token indices (e.g. '2,5')")
    hints = {}
    subjects = []
    for entry in entries:
        if re.fullmatch(r"\d+", entry):
            subjects.append(_index_subject(view, entry, segments))
            continue
        anchors = [split_anchor(word) for word in entry.split()]
        words = [word for word, _position in anchors]
        if not all(part.text.has_tokens(" ".join(words)) for part in view.parts):
            raise SubjectError(f"subject {entry!r} has no tokens")
        anchored = {index: _occurrence_at(view, entry, word, position)
                    for index, (word, position) in enumerate(anchors) if position is not None}
        per_word = None
        for part in view.parts:
            if part.encoder not in hints:
                hints[part.encoder] = part.text.hint()
            found = _resolve_in_part(part, entry, hints[part.encoder], anchored)
            per_word = found if per_word is None else [a + b for a, b in zip(per_word, found)]
        chunk_of = _segment_index(segments)
        attributes = tuple(Subject(word, positions, chunk_of(positions[0]))
                           for word, positions in zip(words[:-1], per_word[:-1]))
        subjects.append(Subject(entry, per_word[-1], chunk_of(per_word[-1][0]), attributes))
    token_words = tuple(encoded.pieces for _segment, encoded in view.encoded())
    if view.family == "clip":
        clip_text = view.parts[0].text
        return Subjects(tuple(subjects), text, clip_text.chunk_length, tuple(s.end for s in clip_text.segments),
                        token_words)
    first = view.parts[0].text
    if first.encoder == "clip":  # SD3: chunk_length and end_positions keep their meaning for the CLIP chunks
        chunk_length, end_positions = first.chunk_length, tuple(s.end for s in first.segments)
    else:  # T5 only: the sequence is the one "chunk"
        chunk_length, end_positions = first.segments[0].length, (first.segments[0].end,)
    return Subjects(tuple(subjects), text, chunk_length, end_positions, token_words, segments=segments)


def _segment_index(segments: tuple[TextSegment, ...]):
    def index(position: int) -> int:
        return next(i for i, s in enumerate(segments) if s.start <= position < s.start + s.length)
    return index


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
