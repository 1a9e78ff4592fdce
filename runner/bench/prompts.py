"""Prompt sets for the bench: the Attend-and-Excite paper's 276 prompts by default, or a user's JSON or TXT list.

Formats (`load_prompt_set`):
- JSON object {category: [entry, ...]} (the A&E file's layout), or a JSON list of entries;
- an entry is a prompt string, or an object {"prompt": ..., "subjects": ..., "category": ...} ("text" works
  for "prompt"; "subjects" a string "cat, frog" or a list of words or subject groups);
- TXT: one prompt a line, optionally "prompt | subjects"; blank lines and lines starting with # are skipped.

A prompt without subjects gets them from its wording, as A&E's prompts are built: the two halves split at
" and " / " with ", each without its article, are its subject groups ("a pink crown and a purple bow" ->
"pink crown, purple bow": nouns crown and bow, attributes pink and purple). A prompt that does not split so
is reported and left out; the others go on.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent.parent
DEFAULT_PROMPTS = PACK_DIR / "data" / "attend_and_excite_prompts.json"
ARTICLES = ("a", "an", "the")
SEPARATORS = (" and ", " with ")


class PromptSetError(Exception):
    """The prompt set cannot be read at all (missing file, not JSON); single bad prompts are problems instead."""


@dataclass(frozen=True)
class BenchPrompt:
    text: str
    subjects: str  # as Attention Text Encode's `subjects` widget takes them
    category: str = ""


def prompt_halves(text: str) -> list[str] | None:
    """The two halves of 'X and Y' / 'X with Y' (A&E's split, also for its CLIP metric), else None."""
    for separator in SEPARATORS:
        halves = text.split(separator)
        if len(halves) == 2 and all(half.strip() for half in halves):
            return [half.strip() for half in halves]
    return None


def subject_groups(text: str) -> str:
    """'a pink crown and a purple bow' -> 'pink crown, purple bow'. Raises ValueError when the prompt does not
    split into two halves at ' and ' / ' with '."""
    halves = prompt_halves(text)
    if halves is None:
        raise ValueError(f"cannot tell the subjects of {text!r}: it is not 'a X and a Y' / 'a X with a Y'; give "
                         "them with the prompt ('prompt | subjects' in a TXT file, {\"prompt\": ..., "
                         "\"subjects\": ...} in JSON)")
    groups = []
    for half in halves:
        words = half.split()
        groups.append(" ".join(words[1:] if len(words) > 1 and words[0].lower() in ARTICLES else words))
    return ", ".join(groups)


def _entry(value, category: str, where: str) -> BenchPrompt:
    if isinstance(value, str):
        text, subjects, category = value, None, category
    elif isinstance(value, dict):
        text = value.get("prompt", value.get("text"))
        subjects = value.get("subjects")
        category = str(value.get("category", category) or "")
        if not isinstance(text, str):
            raise ValueError(f"{where}: an object entry needs a 'prompt' string, got {json.dumps(value)[:80]}")
    else:
        raise ValueError(f"{where}: an entry is a prompt string or an object with 'prompt', got "
                         f"{type(value).__name__}")
    text = " ".join(text.split())
    if not text:
        raise ValueError(f"{where}: empty prompt")
    if isinstance(subjects, (list, tuple)):
        subjects = ", ".join(str(s).strip() for s in subjects)
    if subjects is None or not str(subjects).strip():
        subjects = subject_groups(text)
    return BenchPrompt(text, str(subjects).strip(), category)


def load_prompt_set(path: str | Path | None = None) -> tuple[list[BenchPrompt], list[str]]:
    """(prompts, problems): the prompts in file order (duplicates dropped), and a message for each entry left
    out. `path` None: the A&E prompt set shipped with the pack."""
    path = Path(path).expanduser() if path else DEFAULT_PROMPTS
    if not path.is_file():
        raise PromptSetError(f"prompt set {str(path)!r} not found (a JSON or TXT file)")
    text = path.read_text(encoding="utf-8-sig")
    raw: list[tuple[object, str, str]] = []  # (entry, category, where)
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise PromptSetError(f"prompt set {path.name} is not valid JSON: {error}") from None
        if isinstance(data, dict):
            for category, entries in data.items():
                if not isinstance(entries, list):
                    raise PromptSetError(f"prompt set {path.name}: category {category!r} must hold a list")
                raw.extend((e, str(category), f"{path.name} [{category}][{i}]") for i, e in enumerate(entries))
        elif isinstance(data, list):
            raw.extend((e, "", f"{path.name} [{i}]") for i, e in enumerate(data))
        else:
            raise PromptSetError(f"prompt set {path.name}: expected a JSON object of categories or a list")
    else:
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            prompt, _, subjects = line.partition("|")
            raw.append(({"prompt": prompt, "subjects": subjects.strip() or None}, "", f"{path.name}:{number}"))
    prompts, problems, seen = [], [], set()
    for value, category, where in raw:
        try:
            entry = _entry(value, category, where)
        except ValueError as error:
            problems.append(f"{where}: {error}" if not str(error).startswith(where) else str(error))
            continue
        if entry.text in seen:
            problems.append(f"{where}: {entry.text!r} is listed twice; kept once")
            continue
        seen.add(entry.text)
        prompts.append(entry)
    return prompts, problems


def pick(prompts: list[BenchPrompt], categories: list[str] | None = None, count: int | None = None) -> list[BenchPrompt]:
    """The prompts of `categories` (all by default); with `count`, the first `count` taken in turn from each
    category in file order, so a short run still covers every category."""
    if categories:
        prompts = [p for p in prompts if p.category in categories]
    if count is None or count >= len(prompts):
        return list(prompts)
    by_category: dict[str, list[BenchPrompt]] = {}
    for prompt in prompts:
        by_category.setdefault(prompt.category, []).append(prompt)
    picked, index = [], 0
    while len(picked) < count:
        for entries in by_category.values():
            if index < len(entries) and len(picked) < count:
                picked.append(entries[index])
        index += 1
    return picked


def parse_seeds(text: str) -> list[int]:
    """'0-63' / '0,5,7' / '0-3,10' -> the seeds, in order, without repeats."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        low, dash, high = part.partition("-")
        try:
            values = range(int(low), int(high) + 1) if dash else [int(low)]
        except ValueError:
            raise ValueError(f"seeds {text!r}: {part!r} is not N or N-M") from None
        if dash and int(high) < int(low):
            raise ValueError(f"seeds {text!r}: {part!r} runs backwards")
        seeds.extend(s for s in values if s not in seeds)
    if not seeds:
        raise ValueError(f"seeds {text!r}: no seed given")
    if min(seeds) < 0:
        raise ValueError(f"seeds {text!r}: seeds are 0 or more")
    return seeds
