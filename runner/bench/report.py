"""`bench report`: what the store holds, per method x category, as Markdown, bar charts and contact sheets.

For each group of methods run with the same shared settings (model, steps, size, sampler; the store's
base_hash), and each metric:
  - mean ± standard error (sample standard deviation / sqrt(n)) per method and category, and over all prompts;
  - the paired change against `plain`: per (prompt, seed) that both have, method - plain; mean ± standard
    error and [images improved / pairs] (improved: higher, or lower for the overlaps).
Bar charts in the A&E paper's form (one group of bars per category, one bar per method, ± standard error) go
to <metric>.png; a contact sheet per prompt (a row per seed, a column per method) to sheets/. Drawn with PIL.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

from ...pictures.rendering import font, text_size
from .metrics import ATTENTION_METRICS, CLIP_METRICS, HIGHER_IS_BETTER, LABELS
from .run import slug
from .store import STORE_FILE, Store

BASELINE = "plain"
ALL = "all"
PALETTE = [(78, 121, 167), (242, 142, 43), (225, 87, 89), (118, 183, 178), (89, 161, 79), (237, 201, 72),
           (176, 122, 161), (255, 157, 167), (156, 117, 95), (186, 176, 172)]


@dataclass
class Entry:
    job_id: int
    prompt: str
    seed: int
    method: str
    category: str
    image: str | None
    values: dict


@dataclass
class Group:
    base_hash: str
    base: dict
    methods: list[str] = field(default_factory=list)   # in the order they were first run, plain first
    categories: list[str] = field(default_factory=list)
    images: list[Entry] = field(default_factory=list)

    def metrics(self) -> list[str]:
        present = {name for image in self.images for name in image.values}
        return [name for name in ATTENTION_METRICS + CLIP_METRICS if name in present]


def load_groups(store: Store) -> list[Group]:
    settings = store.query("SELECT hash, method, base, base_hash, created FROM settings ORDER BY created")
    label_of, groups = {}, {}
    names_per_base: dict[str, dict[str, set]] = {}
    for hash_, method, _base, base_hash, _created in settings:
        names_per_base.setdefault(base_hash, {}).setdefault(method, set()).add(hash_)
    for hash_, method, base, base_hash, _created in settings:
        several = len(names_per_base[base_hash][method]) > 1
        label_of[hash_] = f"{method} [{hash_[:6]}]" if several else method
        group = groups.setdefault(base_hash, Group(base_hash, json.loads(base)))
        if label_of[hash_] not in group.methods:
            group.methods.append(label_of[hash_])
    base_of = {hash_: base_hash for hash_, _m, _b, base_hash, _c in settings}
    rows = store.query("SELECT id, prompt, seed, settings_hash, category, image FROM jobs WHERE state = 'done' "
                       "ORDER BY id")
    values: dict[int, dict] = {}
    for job_id, name, value in store.query("SELECT job_id, name, value FROM metrics"):
        if value is not None and math.isfinite(value):
            values.setdefault(job_id, {})[name] = value
    for job_id, prompt, seed, hash_, category, image in rows:
        if hash_ not in base_of:
            continue
        group = groups[base_of[hash_]]
        group.images.append(Entry(job_id, prompt, seed, label_of[hash_], category or "", image,
                                   values.get(job_id, {})))
    result = []
    for group in groups.values():
        if not group.images:
            continue
        present = {image.method for image in group.images}
        group.methods = sorted((m for m in group.methods if m in present), key=lambda m: m != BASELINE)
        categories = []
        for image in group.images:
            if image.category and image.category not in categories:
                categories.append(image.category)
        group.categories = categories
        result.append(group)
    return result


def mean_se(values: list[float]) -> tuple[float, float | None, int]:
    n = len(values)
    if not n:
        return math.nan, None, 0
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / math.sqrt(n) if n > 1 else None), n


def columns(group: Group) -> list[str]:
    return group.categories + [ALL] if len(group.categories) != 1 else group.categories


def _in(image: Entry, column: str) -> bool:
    return column == ALL or image.category == column


def table(group: Group, metric: str) -> dict[tuple[str, str], tuple[float, float | None, int]]:
    out = {}
    for method in group.methods:
        for column in columns(group):
            out[method, column] = mean_se([i.values[metric] for i in group.images
                                           if i.method == method and _in(i, column) and metric in i.values])
    return out


def paired(group: Group, metric: str) -> dict[tuple[str, str], tuple[float, float | None, int, int]]:
    """(method, column) -> (mean change, standard error, pairs, improved)."""
    base = {(i.prompt, i.seed): i.values[metric] for i in group.images if i.method == BASELINE and metric in i.values}
    better = HIGHER_IS_BETTER.get(metric, True)
    out = {}
    for method in group.methods:
        if method == BASELINE:
            continue
        for column in columns(group):
            changes = [i.values[metric] - base[i.prompt, i.seed] for i in group.images
                       if i.method == method and _in(i, column) and metric in i.values and (i.prompt, i.seed) in base]
            mean, se, n = mean_se(changes)
            improved = sum((c > 0) if better else (c < 0) for c in changes)
            out[method, column] = (mean, se, n, improved)
    return out


def _cell(mean: float, se: float | None, signed: bool = False) -> str:
    if math.isnan(mean):
        return "–"
    text = f"{mean:+.4g}" if signed else f"{mean:.4g}"
    return text + (f" ± {se:.2g}" if se is not None else "")


def _describe_base(base: dict) -> str:
    loader = base.get("loader") or {}
    model = loader.get("inputs", {}).get("ckpt_name") or loader.get("class_type", "?")
    size = "x".join(str(v) for v in base.get("size", []))
    return (f"model {model}, {base.get('steps')} steps, {size} px, cfg {base.get('cfg')}, "
            f"{base.get('sampler')}/{base.get('scheduler')}")


def markdown(groups: list[Group], charts: dict[str, list[str]], sheets: dict[str, list[str]]) -> str:
    lines = ["# Bench report", ""]
    for number, group in enumerate(groups, 1):
        prompts = len({i.prompt for i in group.images})
        seeds = len({i.seed for i in group.images})
        head = f"## Settings {number}: {_describe_base(group.base)}" if len(groups) > 1 else \
            f"Settings: {_describe_base(group.base)}"
        lines += [head, "", f"{len(group.images)} images: {prompts} prompts, {seeds} seeds, methods "
                  f"{', '.join(group.methods)}.", ""]
        cols = columns(group)
        for metric in group.metrics():
            lines += [f"### {LABELS.get(metric, metric)} (`{metric}`, "
                      f"{'higher' if HIGHER_IS_BETTER.get(metric, True) else 'lower'} is the aim)", ""]
            cells = table(group, metric)
            lines.append("| method | " + " | ".join(f"{c} (n)" for c in cols) + " |")
            lines.append("|---|" + "---|" * len(cols))
            for method in group.methods:
                lines.append(f"| {method} | " + " | ".join(
                    f"{_cell(*cells[method, c][:2])} ({cells[method, c][2]})" for c in cols) + " |")
            if BASELINE in group.methods and len(group.methods) > 1:
                changes = paired(group, metric)
                lines += ["", f"Paired change against {BASELINE} (same prompt and seed): mean ± standard error "
                          "[improved / pairs]", ""]
                lines.append("| method | " + " | ".join(cols) + " |")
                lines.append("|---|" + "---|" * len(cols))
                for method in group.methods[1:]:
                    lines.append(f"| {method} | " + " | ".join(
                        f"{_cell(*changes[method, c][:2], signed=True)} [{changes[method, c][3]}/"
                        f"{changes[method, c][2]}]" for c in cols) + " |")
            for chart in charts.get(f"{group.base_hash}:{metric}", []):
                lines += ["", f"![{metric}]({chart})"]
            lines.append("")
        if sheets.get(group.base_hash):
            lines += ["### Contact sheets", ""]
            lines += [f"- [{Path(sheet).stem}]({sheet})" for sheet in sheets[group.base_hash]]
            lines.append("")
    if not groups:
        lines.append("The store holds no finished job yet.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- pictures

def bar_chart(path: Path, title: str, columns_: list[str], methods: list[str],
              cells: dict[tuple[str, str], tuple], signed: bool = False, colours: dict | None = None) -> None:
    """Grouped bars: a group per column (category), a bar per method, whiskers ± standard error. `colours`:
    method -> RGB, so that a method keeps its colour across charts."""
    colours = colours or {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(methods)}
    width, height = 220 + 150 * len(columns_) + 14 * len(methods) * len(columns_), 480
    left, right, top, bottom = 80, 200, 50, 60
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    title_face, face, small = font(18), font(14), font(12)
    draw.text((left, 14), title, font=title_face, fill="black")
    values = [(v[0], v[1] or 0.0) for v in cells.values() if not math.isnan(v[0])]
    low = min([0.0] + [m - s for m, s in values])
    high = max([0.0] + [m + s for m, s in values])
    if high - low < 1e-12:
        high = low + 1.0
    span = high - low
    low, high = low - 0.05 * span * (low < 0), high + 0.08 * span
    plot_h = height - top - bottom

    def y_of(value: float) -> float:
        return top + plot_h * (high - value) / (high - low)

    step = _nice_step((high - low) / 6)
    for index in range(math.ceil(low / step - 1e-9), math.floor(high / step + 1e-9) + 1):
        tick = index * step  # from the index, so that 0 is exactly 0
        y = y_of(tick)
        draw.line([(left, y), (width - right, y)], fill=(225, 225, 225))
        text = f"{tick:+.3g}" if signed and index else f"{tick:.3g}"
        draw.text((left - 8 - text_size(text, small)[0], y - 7), text, font=small, fill=(90, 90, 90))
    draw.line([(left, y_of(0.0)), (width - right, y_of(0.0))], fill=(60, 60, 60), width=1)
    draw.line([(left, top), (left, top + plot_h)], fill=(60, 60, 60))
    group_w = (width - left - right) / max(len(columns_), 1)
    bar_w = min(40.0, 0.8 * group_w / max(len(methods), 1))
    for g, column in enumerate(columns_):
        x0 = left + g * group_w + (group_w - bar_w * len(methods)) / 2
        for m, method in enumerate(methods):
            cell = cells.get((method, column))
            if cell is None or math.isnan(cell[0]):
                continue
            mean, se = cell[0], cell[1]
            colour = colours[method]
            x = x0 + m * bar_w
            draw.rectangle([x + 2, min(y_of(mean), y_of(0.0)), x + bar_w - 2, max(y_of(mean), y_of(0.0))],
                           fill=colour)
            if se:
                centre = x + bar_w / 2
                draw.line([(centre, y_of(mean - se)), (centre, y_of(mean + se))], fill="black", width=2)
                for end in (mean - se, mean + se):
                    draw.line([(centre - 5, y_of(end)), (centre + 5, y_of(end))], fill="black", width=2)
        label_w = text_size(column, face)[0]
        draw.text((left + g * group_w + (group_w - label_w) / 2, top + plot_h + 12), column, font=face, fill="black")
    for m, method in enumerate(methods):
        y = top + 10 + 24 * m
        draw.rectangle([width - right + 20, y, width - right + 36, y + 16], fill=colours[method])
        draw.text((width - right + 44, y), method, font=face, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def _nice_step(raw: float) -> float:
    if raw <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * power:
            return factor * power
    return 10 * power


def contact_sheet(path: Path, prompt: str, store_folder: Path, images: list[Entry], methods: list[str],
                  seeds: list[int], tile: int = 128) -> None:
    """A row per seed, a column per method; each tile the job's picture, scaled to `tile` px."""
    face, title_face = font(13), font(16)
    label_w, head_h, title_h = 70, 24, 30
    width = label_w + tile * len(methods) + 8
    height = title_h + head_h + tile * len(seeds) + 8
    canvas = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 7), prompt, font=title_face, fill="white")
    for m, method in enumerate(methods):
        text = method if text_size(method, face)[0] <= tile - 6 else method[: max(3, tile // 8)] + "…"
        draw.text((label_w + m * tile + 4, title_h + 4), text, font=face, fill=(230, 230, 230))
    by_key = {(i.method, i.seed): i for i in images}
    for s, seed in enumerate(seeds):
        y = title_h + head_h + s * tile
        draw.text((8, y + tile // 2 - 7), f"seed {seed}", font=face, fill=(230, 230, 230))
        for m, method in enumerate(methods):
            entry = by_key.get((method, seed))
            x = label_w + m * tile
            if entry is None or not entry.image or not (store_folder / entry.image).is_file():
                draw.rectangle([x + 2, y + 2, x + tile - 3, y + tile - 3], outline=(90, 90, 90))
                continue
            with Image.open(store_folder / entry.image) as picture:
                thumb = ImageOps.contain(picture.convert("RGB"), (tile - 4, tile - 4), Image.Resampling.LANCZOS)
            canvas.paste(thumb, (x + 2 + (tile - 4 - thumb.width) // 2, y + 2 + (tile - 4 - thumb.height) // 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def report(store_folder: str | Path, out: str | Path | None = None, sheet_seeds: int = 8,
           max_sheets: int | None = None, say=print) -> Path:
    """Writes report.md, the charts and the contact sheets into `out` (default: <store>/report); its path."""
    folder = Path(store_folder).expanduser().resolve()
    if not (folder / STORE_FILE).is_file():
        raise FileNotFoundError(f"no bench store in {folder} (no {STORE_FILE}): run `bench --out {folder}` first")
    out_dir = Path(out).expanduser().resolve() if out else folder / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    store = Store(folder)
    try:
        groups = load_groups(store)
    finally:
        store.close()
    charts: dict[str, list[str]] = {}
    sheets: dict[str, list[str]] = {}
    for number, group in enumerate(groups, 1):
        suffix = "" if len(groups) == 1 else f"_{number}"
        cols = columns(group)
        for metric in group.metrics():
            aim = "higher" if HIGHER_IS_BETTER.get(metric, True) else "lower"
            label = f"{LABELS.get(metric, metric)} ({aim} is the aim)"
            name = f"{metric}{suffix}.png"
            colours = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(group.methods)}
            bar_chart(out_dir / name, f"{label}: mean ± standard error", cols, group.methods, table(group, metric),
                      colours=colours)
            charts.setdefault(f"{group.base_hash}:{metric}", []).append(name)
            if BASELINE in group.methods and len(group.methods) > 1:
                changes = paired(group, metric)
                name = f"{metric}_vs_{BASELINE}{suffix}.png"
                bar_chart(out_dir / name, f"{label}: paired change against {BASELINE}", cols, group.methods[1:],
                          changes, signed=True, colours=colours)
                charts[f"{group.base_hash}:{metric}"].append(name)
        prompts = list(dict.fromkeys(i.prompt for i in group.images))
        for prompt in prompts[:max_sheets]:
            entries = [i for i in group.images if i.prompt == prompt]
            seeds = sorted({i.seed for i in entries})[:sheet_seeds]
            name = f"sheets{suffix}/{slug(prompt)}.png"
            contact_sheet(out_dir / name, prompt, folder, entries, group.methods, seeds)
            sheets.setdefault(group.base_hash, []).append(name)
    text = markdown(groups, charts, sheets)
    (out_dir / "report.md").write_text(text, encoding="utf-8")
    say(f"report: {out_dir / 'report.md'} ({sum(len(v) for v in charts.values())} charts, "
        f"{sum(len(v) for v in sheets.values())} contact sheets)")
    return out_dir / "report.md"
