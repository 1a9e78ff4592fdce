"""T5's tokens of a prompt (Flux.1, Chroma, and SD3's T5-XXL part): sentencepiece pieces, one sequence.

There is no start token; `</s>` ends the prompt's pieces, then `<pad>` fills the sequence to the tokenizer's
min_length (Flux 256, SD3 77, Chroma none). A long prompt makes the sequence longer; it is never cut into chunks.
'▁' stands for a space: a word's first piece starts with it ('▁cat'), or, where the vocabulary has no '▁' piece for
the word's start, is a bare '▁' followed by the word's pieces ('frog' -> '▁', 'f', 'rog'); after punctuation a word
may have no '▁' at all ('cat,frog' -> '▁cat', ',', 'f', 'rog'), and the same word can be cut differently there
('a,cat' -> 'cat' is piece 2138, 'a cat' -> '▁cat' is 1712). ComfyUI tokenizes each weighting segment of the
prompt ("a (frog:1.2)") on its own, so the pieces at a segment's start get a '▁' of their own.

Words are therefore found on the text the pieces spell ('▁' read as a space), not by piece ids: a word is a run of
letters, of digits, or of other non-space characters, matched whole and case-insensitively (CLIP lower-cases the
prompt too, so SD3's two views find the same word), at its first occurrence. A word's positions are the pieces
that spell it. A bare '▁' piece spells only the space before the word, so it is not one of them: it carries no
word content (the same id stands before every such word), and averaging it into the word's map would blur the map
with what every other bare '▁' of the prompt attends.
"""
from __future__ import annotations

import bisect
import re
from functools import cached_property

import torch

from .subjects import EncodedSegment, SubjectError

ENCODER = "t5"
SPACE = "\u2581"  # '▁', sentencepiece's space
UNKNOWN = "\ufffd"  # what an <unk> piece spells: it matches no word a user can type
WORD = re.compile(r"[^\W\d_]+|\d+|_+|[^\w\s]+")  # letters, digits, underscores, other non-space characters
MAX_LISTED = 80  # pieces and words an error lists at most


def piece_text(piece: str) -> str:
    """A piece as the picker shows it: without its '▁' (a bare '▁' stays '▁')."""
    return piece.lstrip(SPACE) or piece


def _piece(sd_tokenizer, token) -> str:
    if isinstance(token, torch.Tensor):
        return "<embedding>"
    return sd_tokenizer.inv_vocab.get(int(token), "?")


def _spelled(sd_tokenizer, token, piece: str) -> str:
    """The text a content piece spells: '▁' as a space, <unk> as one unknown character, an embedding as a space."""
    if isinstance(token, torch.Tensor):
        return " "
    if int(token) == getattr(sd_tokenizer.tokenizer, "unk_token_id", None):
        return UNKNOWN
    return piece.replace(SPACE, " ")


def _end_position(tokens, end_token) -> int:
    for position, token in enumerate(tokens):
        if not isinstance(token, torch.Tensor) and token == end_token:
            return position
    return len(tokens)


def _segment(sd_tokenizer, tokens: tuple) -> EncodedSegment:
    """One T5 sequence with its words: each word's text (as the pieces spell it) and its pieces' positions."""
    pieces = tuple(_piece(sd_tokenizer, t) for t in tokens)
    end = _end_position(tokens, sd_tokenizer.end_token)
    text, starts = "", []
    for position in range(end):
        starts.append(len(text))
        text += _spelled(sd_tokenizer, tokens[position], pieces[position])
    words = []
    for match in WORD.finditer(text):
        # the pieces whose spelled text overlaps the word; spaces are never in a word, so a bare '▁' never is
        first = bisect.bisect_right(starts, match.start()) - 1
        last = bisect.bisect_left(starts, match.end()) - 1
        positions = tuple(p for p in range(first, last + 1) if not isinstance(tokens[p], torch.Tensor))
        words.append((match.group(), positions))
    words += [("<embedding>", (p,)) for p in range(end) if isinstance(tokens[p], torch.Tensor)]
    words.sort(key=lambda word: word[1][0])
    return EncodedSegment(ENCODER, tuple(tokens), pieces, 0, end, tuple(words))


def _limited(items: list[str]) -> str:
    listed = ", ".join(repr(i) for i in items[:MAX_LISTED])
    return listed + (f", ... ({len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else "")


class T5Text:
    """A prompt as a T5 tokenizer gives it to the encoder: one sequence per batch (ComfyUI makes one)."""
    encoder = ENCODER

    def __init__(self, sd_tokenizer, text: str, tokenizer_options: dict | None = None):
        self.tokenizer = sd_tokenizer
        options = {"tokenizer_options": tokenizer_options} if tokenizer_options else {}
        batches = sd_tokenizer.tokenize_with_weights(text, return_word_ids=False, **options)
        self.segments = tuple(_segment(sd_tokenizer, tuple(t for t, _w in batch)) for batch in batches)

    @cached_property
    def _words(self) -> list[tuple[int, str, tuple[int, ...]]]:
        """(segment, case-folded word, positions in this text) of every word, in order."""
        out, base = [], 0
        for index, segment in enumerate(self.segments):
            # an embedding stays in as '<embedding>', which no phrase's word equals: a run does not span it
            out += [(index, text.casefold(), tuple(base + p for p in positions)) for text, positions in segment.words]
            base += segment.length
        return out

    @cached_property
    def _first_word(self) -> dict[str, list[int]]:
        """Case-folded word -> the indices in `_words` where it occurs (the search's index)."""
        index: dict[str, list[int]] = {}
        for i, (_segment_index, word, _positions) in enumerate(self._words):
            index.setdefault(word, []).append(i)
        return index

    def phrase_words(self, phrase: str) -> list[str]:
        """The words of `phrase` as T5 reads it (its tokenizer's normalisation), case-folded."""
        segment = _segment(self.tokenizer, tuple(t for batch in self.tokenizer.tokenize_with_weights(phrase)
                                                  for t, _w in batch))
        if any(not isinstance(t, torch.Tensor) and int(t) == getattr(self.tokenizer.tokenizer, "unk_token_id", None)
               for t in segment.tokens[:segment.end]):
            raise SubjectError(f"{phrase!r} has characters that T5 does not know (its tokenizer reads them as "
                               f"<unk>), so it cannot be found in the T5 text; the T5 text's words are: "
                               f"{_limited(self.content_words())}")
        return [text.casefold() for text, _positions in segment.words if text != "<embedding>"]

    def has_tokens(self, phrase: str) -> bool:
        return bool(self.phrase_words(phrase))

    def find(self, entry: str) -> list[tuple[int, ...]] | None:
        """Where `entry`'s words first appear as written, whole words in one sequence: the positions of each of
        its words (`entry.split()`: "cat's" is T5's words cat, ', s), else None."""
        per_word = [self.phrase_words(word) for word in entry.split()]
        needle = [w for words in per_word for w in words]
        if not needle:
            return None
        for start in self._first_word.get(needle[0], ()):
            run = self._words[start:start + len(needle)]
            if len(run) == len(needle) and all(w == n and s == run[0][0] for (s, w, _p), n in zip(run, needle)):
                out, k = [], 0
                for words in per_word:
                    out.append(tuple(sorted({p for _s, _w, positions in run[k:k + len(words)] for p in positions})))
                    k += len(words)
                return out
        return None

    def content_words(self) -> list[str]:
        return [text for segment in self.segments for text, _positions in segment.words]

    def content_pieces(self) -> list[str]:
        return [piece for segment in self.segments for piece in segment.pieces[segment.first:segment.end]]

    def hint(self) -> str:
        return (f"the T5 text's words are: {_limited(self.content_words())} (its T5 pieces: "
                f"{_limited(self.content_pieces())})")
