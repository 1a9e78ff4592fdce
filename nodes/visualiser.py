"""Attention Map Visualiser: the recorded subject attention as heat maps, timelines, overlap, attribute binding
and loss plots."""
import dataclasses
import math

import numpy as np
import torch
from comfy_api.latest import io, ui

from ..pictures import rendering
from ..attention_patch.record import raw_subject_maps
from ..guidance.losses import jensen_shannon_divergence, spatial_distribution
from .types import AttentionMaps

# new modes go at the end: a saved workflow stores the option itself, and the list's order is the menu's
MODES = ("step", "average", "timeline", "overlap", "loss plot", "binding")
_NO_MAPS = ("the ATTENTION input holds no attention maps: enable record_maps on the Attention KSampler "
            "(the Attention Sampler for SamplerCustom records no maps)")


def _prefix(message: str) -> ValueError:
    return ValueError(f"Attention Map Visualiser: {message}")


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5, 6] -> '0..2, 5..6'."""
    parts, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            parts.append(str(start) if start == n else f"{start}..{n}")
            start = None
    return ", ".join(parts)


def resolve_step(record, step: int) -> int:
    """The entry index of the record (record.grid_maps(index)) for `step`: a sampling step number as recorded, or negative from the
    end of the recorded steps (-1 = the last)."""
    count = len(record.steps)
    if step < 0:
        if -step > count:
            raise _prefix(f"step {step} is out of range: {count} steps were recorded, so negative steps go down "
                          f"to -{count}; valid steps: {_ranges(record.steps)} or -{count}..-1")
        return count + step
    if step not in record.steps:
        raise _prefix(f"step {step} was not recorded; valid steps: {_ranges(record.steps)} (sampling steps) or "
                      f"-{count}..-1 (counted from the last recorded step)")
    return record.steps.index(step)


def _picture(image, batch_index: int, record_batch: int):
    if image is None:
        return None
    if image.ndim != 4 or image.shape[-1] < 3:
        raise _prefix(f"image must be an IMAGE batch [B, H, W, 3], got shape {tuple(image.shape)}")
    if image.shape[0] == 1:
        chosen = image[0]
    elif batch_index < image.shape[0] and image.shape[0] == record_batch:
        chosen = image[batch_index]
    else:
        raise _prefix(f"image has {image.shape[0]} pictures and the attention record {record_batch} images: "
                      "connect the decoded batch of the same sampler (or a single picture)")
    return chosen[..., :3].detach().float().cpu().clamp(0, 1).numpy()


def render(record, mode: str, step: int, colormap: str, opacity: float, batch_index: int, image=None) -> np.ndarray:
    """The visualiser's picture(s), [N, H, W, 3] float32 in 0..1."""
    if record is None:
        raise _prefix("no ATTENTION connected: connect the ATTENTION output of the Attention KSampler")
    if mode not in MODES:
        raise _prefix(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    if colormap not in rendering.COLORMAPS:
        raise _prefix(f"unknown colormap {colormap!r}; valid: {', '.join(rendering.COLORMAPS)}")
    if not 0.0 <= opacity <= 1.0:
        raise _prefix(f"opacity must lie in 0..1, got {opacity}")
    labels = list(record.subjects.labels)
    if mode == "binding" and not record.subjects.attributes:
        raise _prefix(f"binding needs attributes: the subjects {', '.join(repr(label) for label in labels)} have "
                      "none. Name subject groups such as 'red car, blue bench' in Attention Text Encode (an entry's "
                      "last word is the noun, the words before it its attributes)")

    if mode == "loss plot":
        if not record.losses:
            raise _prefix("the ATTENTION input holds no guidance losses: the sampler ran without GUIDANCE (connect "
                          "Attention Guidance Losses to the Attention KSampler), or its guided range covered no step")
        batch = len(record.losses[0].total)
        if not 0 <= batch_index < batch:
            raise _prefix(f"batch_index {batch_index} is out of range: the record holds {batch} image(s), "
                          f"valid 0..{batch - 1}")
        guided = len(record.losses)
        title = (f"Guidance loss, image {batch_index}: {guided} guided step{'s' * (guided != 1)} of "
                 f"{record.total_steps}; subjects: {', '.join(labels)}")
        return rendering.render_loss_plot(record.losses, batch_index, record.total_steps, title=title)[None]

    if not record.maps:
        raise _prefix(_NO_MAPS)
    batch = record.maps[0].shape[0]
    if not 0 <= batch_index < batch:
        raise _prefix(f"batch_index {batch_index} is out of range: the record holds {batch} image(s), "
                      f"valid 0..{batch - 1}")
    picture = _picture(image, batch_index, batch)
    total = record.total_steps or len(record.steps)

    entries = range(len(record.maps))
    # entries that cover part of the image (an area prompt) are drawn only there; None: all covered
    coverage = torch.stack([record.grid_coverage(i) for i in entries]) if record.has_areas else None

    if mode == "timeline":
        maps = torch.stack([record.subject_maps(i)[batch_index] for i in entries])
        title = f"Attention per step (image {batch_index})"
        return rendering.render_timeline(maps, labels, list(record.steps), colormap, picture, opacity, title,
                                         coverage)[None]

    if mode == "average":
        maps = torch.stack([record.subject_maps(i)[batch_index] for i in entries]).mean(dim=0)
        when = f"mean of {len(record.maps)} steps"
        covered = None if coverage is None else coverage.amax(dim=0)
    else:
        index = resolve_step(record, step)
        maps = record.subject_maps(index)[batch_index]
        when = f"step {record.steps[index]} of 0..{total - 1}" + _entry_note(record, index)
        covered = None if coverage is None else coverage[index]

    if mode == "overlap":
        return rendering.render_overlap(maps, labels, picture, opacity, detail=f"{when}; mixed = overlap",
                                        coverage=covered)[None]
    if mode == "binding":
        return _render_binding(record, index, batch_index, when, colormap, picture, opacity, covered)[None]
    details = [f"{when}, peak {float(m.max()):.3g}" for m in maps]
    return rendering.render_heatmaps(maps, labels, colormap, picture, opacity, details, coverage=covered)


def attribute_maps(record, index: int) -> torch.Tensor:
    """Raw maps of each attribute (record.subjects.attributes, in order) at recorded entry `index` on the nominal
    grid: [batch, attributes, H, W] (mean over its tokens), as subject_maps gives the nouns'."""
    attributes = dataclasses.replace(record.subjects, subjects=tuple(a for _noun, a in record.subjects.attributes))
    return raw_subject_maps(record.grid_maps(index), attributes, record.resolution)


def binding_divergence(noun_maps: torch.Tensor, attribute_maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How far each attribute's map is from its noun's.

    Args:
        noun_maps, attribute_maps: [P, H, W] raw maps, pair p = (noun_maps[p], attribute_maps[p]).
    Returns:
        (JSD [P], disagreement [P, H, W]) in float64. Each map is normalised to a distribution over pixels,
        P_x = A_x / sum_ij A_x (`spatial_distribution`); JSD(P_noun || P_attribute) lies in [0, ln 2] (0: the
        same distribution, ln 2: disjoint). disagreement = |P_noun - P_attribute| / max(max P_noun, max
        P_attribute): 0 where the two agree, 1 at most (where one map has the higher peak and the other nothing).
    """
    nouns = spatial_distribution(noun_maps.double())
    attributes = spatial_distribution(attribute_maps.double())
    divergence = jensen_shannon_divergence(nouns, attributes)
    peak = torch.maximum(nouns.amax(dim=-1, keepdim=True), attributes.amax(dim=-1, keepdim=True))
    apart = (nouns - attributes).abs() / peak.clamp(min=1e-300)
    return divergence, apart.reshape(noun_maps.shape)


def _noun_word(subject) -> str:
    """The noun of a subject group: the last word of its entry ('red car' -> 'car')."""
    return subject.label.split()[-1] if subject.attributes else subject.label


def binding_panels(record, index: int, batch_index: int, when: str = ""):
    """What binding mode draws at entry `index` for image `batch_index`, one row per record.subjects.attributes:
    (noun maps [P, H, W], attribute maps [P, H, W], disagreement [P, H, W], JSD [P], captions: per row the
    (title, detail) of its three panels)."""
    pairs = record.subjects.attributes
    nouns = record.subject_maps(index)[batch_index][[noun for noun, _a in pairs]]
    attributes = attribute_maps(record, index)[batch_index]
    divergence, apart = binding_divergence(nouns, attributes)
    when = f"{when}, " if when else ""
    captions = []
    for (noun, attribute), noun_map, attribute_map, jsd in zip(pairs, nouns, attributes, divergence.tolist()):
        word = _noun_word(record.subjects.subjects[noun])
        captions.append((
            (word, f"noun, {when}peak {float(noun_map.max()):.3g}"),
            (attribute.label, f"attribute of {word}, peak {float(attribute_map.max()):.3g}"),
            (f"{attribute.label} / {word}: JSD {jsd:.3f}",
             f"|P {word} - P {attribute.label}|; disjoint: JSD {math.log(2):.3f}"),
        ))
    return nouns, attributes, apart, divergence, captions


def _render_binding(record, index: int, batch_index: int, when: str, colormap: str, picture, opacity: float,
                    covered) -> np.ndarray:
    nouns, attributes, apart, _divergence, captions = binding_panels(record, index, batch_index, when)
    return rendering.render_binding(nouns, attributes, apart, captions, colormap, picture, opacity, coverage=covered)


def _entry_note(record, index: int) -> str:
    """How entry `index` was put on the record's grid, for the caption ('' when it was captured on it)."""
    notes = []
    resolution = record.entry_resolution(index)
    if resolution != tuple(record.resolution):
        notes.append(f"captured {resolution[0]}x{resolution[1]}")
    if record.entry_area(index) is not None:
        notes.append("area")
    return f" ({', '.join(notes)})" if notes else ""


class AttentionVisualize(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnGuideVisualize",
            display_name="Attention Map Visualiser (AttnGuide)",
            category="sampling/attention guidance",
            description="Shows the subjects' recorded cross-attention: a heat map per subject at one step or "
                        "averaged, a step-by-step timeline, all subjects in one picture, each attribute beside its "
                        "noun, or the guidance losses.",
            is_output_node=True,
            inputs=[
                AttentionMaps.Input("attention", tooltip="ATTENTION from the Attention KSampler (record_maps on)."),
                io.Combo.Input("mode", options=list(MODES), default="step",
                               tooltip="step: one heat map per subject at `step`. average: the mean over all "
                                       "recorded steps. timeline: rows = subjects, columns = steps (retention). "
                                       "overlap: all subjects in one picture, one colour each (segregation). "
                                       "loss plot: the guidance losses against the step. binding: per attribute "
                                       "of a subject group ('red car'), the noun's map, the attribute's map and "
                                       "where they differ, with their Jensen-Shannon divergence."),
                io.Int.Input("step", default=-1, min=-10000, max=10000,
                             tooltip="For step, overlap and binding: the sampling step (0 = first); negative counts "
                                     "from the end (-1 = the last recorded step)."),
                io.Combo.Input("colormap", options=rendering.colormap_names(), default="turbo",
                               tooltip="Heat colours, cold (low attention) to hot (high). Each map is stretched to "
                                       "its own min..max."),
                io.Float.Input("opacity", default=0.6, min=0.0, max=1.0, step=0.05,
                               tooltip="With an image: how strongly the map covers it (0 = only the image, "
                                       "1 = only the map)."),
                io.Int.Input("batch_index", default=0, min=0, max=4095,
                             tooltip="Which image of the sampled batch to show."),
                io.Image.Input("image", optional=True,
                               tooltip="The decoded picture to draw the maps over (VAE Decode of the same "
                                       "latent). Not connected: the maps alone, 512 px."),
            ],
            outputs=[io.Image.Output(tooltip="step/average: one labelled heat map per subject (a batch); "
                                             "timeline, overlap, loss plot, binding: one picture.")],
        )

    @classmethod
    def execute(cls, attention, mode, step, colormap, opacity, batch_index, image=None) -> io.NodeOutput:
        images = torch.from_numpy(render(attention, mode, step, colormap, opacity, batch_index, image))
        return io.NodeOutput(images, ui=ui.PreviewImage(images, cls=cls))


NODES = [AttentionVisualize]
