"""Attention Map Visualiser: hand-made records with known maps, then a real sampler run through ComfyUI."""
import math
import os

import numpy as np
import pytest
import torch
from harness import pack_module

rendering = pack_module("pictures.rendering")
visualiser = pack_module("nodes.visualiser")
record_mod = pack_module("attention_patch.record")
subjects_mod = pack_module("text.subjects")

AttentionRecord, StepLoss = record_mod.AttentionRecord, record_mod.StepLoss
render = visualiser.render
SIDE = 16  # map resolution of the hand-made records


def _subjects(labels):
    subjects = tuple(subjects_mod.Subject(label, (2 + i,), 0) for i, label in enumerate(labels))
    return subjects_mod.Subjects(subjects, " ".join(labels), 77, (2 + len(labels),))


def _blob(row, col, width=2.0):
    yy, xx = torch.meshgrid(torch.arange(SIDE, dtype=torch.float32), torch.arange(SIDE, dtype=torch.float32),
                            indexing="ij")
    return torch.exp(-((yy - row) ** 2 + (xx - col) ** 2) / (2 * width ** 2))


def _record(per_step_maps, labels, batch=1):
    """per_step_maps: per step, one [SIDE, SIDE] map per subject (the same for every image of the batch)."""
    subjects = _subjects(labels)
    record = AttentionRecord(subjects, (SIDE, SIDE), total_steps=len(per_step_maps))
    for step, maps in enumerate(per_step_maps):
        aggregated = torch.full((batch, SIDE * SIDE, 77), 1e-3)
        for subject, subject_map in zip(subjects.subjects, maps):
            aggregated[:, :, subject.token_positions[0]] = subject_map.flatten()
        record.add_maps(step, 14.6 / (step + 1), aggregated)
    return record


def _lut_positions(image, colormap):
    """Each pixel's position on the colormap (0 = cold end, 1 = hot end): the nearest LUT entry."""
    lut = rendering.COLORMAPS[colormap][::2]  # every other entry: 1/255 resolution is not needed
    distances = ((np.asarray(image)[..., None, :] - lut) ** 2).sum(-1)
    return distances.argmin(-1) / (len(lut) - 1), distances.min(-1)


def _cell_centre(row, col, size):
    return (row + 0.5) * size / SIDE, (col + 0.5) * size / SIDE


# ---------------------------------------------------------------- colormaps

def test_colormaps_match_matplotlib_tables():
    # reference values from matplotlib's 256-entry tables (entries 0, 128, 255)
    expected = {
        "viridis": [(0.267004, 0.004874, 0.329415), (0.127568, 0.566949, 0.550556), (0.993248, 0.906157, 0.143936)],
        "inferno": [(0.001462, 0.000466, 0.013866), (0.735683, 0.215906, 0.330245), (0.988362, 0.998364, 0.644924)],
        "turbo": [(0.18995, 0.07176, 0.23217), (0.64362, 0.98999, 0.23356), (0.4796, 0.01583, 0.01055)],
        "jet": [(0.0, 0.0, 0.5), (0.4901961, 1.0, 0.4775727), (0.5, 0.0, 0.0)],
        "gray": [(0.0, 0.0, 0.0), (128 / 255, 128 / 255, 128 / 255), (1.0, 1.0, 1.0)],
    }
    for name, colours in expected.items():
        got = rendering.apply_colormap(np.array([0.0, 128 / 255, 1.0]), name)
        assert np.abs(got - np.array(colours)).max() < 3.5 / 255, name
    with pytest.raises(ValueError, match="unknown colormap 'hot'; valid: turbo, jet"):
        rendering.apply_colormap(np.zeros(3), "hot")


def test_normalise_stretches_each_map_and_keeps_constant_maps_cold():
    maps = np.stack([np.linspace(2, 4, 16).reshape(4, 4), np.full((4, 4), 0.3)])
    out = rendering.normalise(maps)
    assert out[0].min() == 0.0 and out[0].max() == 1.0
    assert np.allclose(out[0], (maps[0] - 2) / 2)
    assert not out[1].any()


# ---------------------------------------------------------------- step and average

@pytest.mark.parametrize("colormap", ["inferno", "turbo", "gray"])
def test_step_map_is_hottest_at_the_subject_peak(colormap):
    record = _record([[_blob(11, 12), _blob(9, 4)]], ["cat", "frog"])
    out = render(record, "step", 0, colormap, 0.6, 0)
    assert out.shape == (2, 512, 512, 3) and out.dtype == np.float32
    for index, (row, col) in enumerate([(11, 12), (9, 4)]):
        image = out[index]
        position, distance = _lut_positions(image[200::2, ::2], colormap)  # below the caption box
        hot_y, hot_x = np.unravel_index(position.argmax(), position.shape)
        want_y, want_x = _cell_centre(row, col, 512)
        assert abs(2 * hot_y + 200 - want_y) <= 32 and abs(2 * hot_x - want_x) <= 32, (colormap, index)
        assert position.max() > 0.99 and distance.max() < 1e-3  # pure map colours, the hot end at the peak
        # far from the peak: the cold end of the colormap
        far_y, far_x = (511, 0) if col > 8 else (511, 511)
        assert _lut_positions(image[far_y, far_x], colormap)[0] < 0.02
    # the caption: white title text on a dark box at the top-left
    caption = out[0][:40, :120]
    assert (caption.min(-1) > 0.9).sum() > 30 and np.median(caption) < 0.35


def test_step_selection_and_average():
    steps = [[_blob(3 + 4 * t, 12)] for t in range(3)]
    record = _record(steps, ["cat"])

    def hottest_row(out):
        position, _ = _lut_positions(out[0][150::2, ::2], "inferno")
        return (2 * np.unravel_index(position.argmax(), position.shape)[0] + 150) * SIDE / 512 - 0.5

    assert abs(hottest_row(render(record, "step", 1, "inferno", 0.6, 0)) - 7) <= 1
    assert abs(hottest_row(render(record, "step", -1, "inferno", 0.6, 0)) - 11) <= 1
    assert abs(hottest_row(render(record, "step", -3, "inferno", 0.6, 0)) - 3) <= 1.5  # under the caption edge
    assert abs(hottest_row(render(record, "average", 0, "inferno", 0.6, 0)) - 7) <= 1


def test_overlay_blends_with_the_picture():
    record = _record([[_blob(11, 11)]], ["cat"])
    picture = torch.rand(1, 96, 128, 3, generator=torch.Generator().manual_seed(0))
    alone = render(record, "step", 0, "viridis", 1.0, 0)
    assert alone.shape == (1, 512, 512, 3)  # no picture: 512 px
    hidden = render(record, "step", 0, "viridis", 0.0, 0, picture)
    full = render(record, "step", 0, "viridis", 1.0, 0, picture)
    half = render(record, "step", 0, "viridis", 0.5, 0, picture)
    assert hidden.shape == full.shape == (1, 96, 128, 3)  # the picture's size
    below = slice(60, None)  # below the caption box
    quantum = 1 / 255 + 1e-6
    assert np.abs(hidden[0, below] - picture[0, below].numpy()).max() <= quantum
    heat = rendering.apply_colormap(rendering.normalise(rendering.upsample(record.subject_maps(0)[0], (96, 128))),
                                    "viridis")
    assert np.abs(full[0, below] - heat[0, below]).max() <= quantum
    assert np.abs(half[0, below] - (0.5 * heat[0, below] + 0.5 * picture[0, below].numpy())).max() <= quantum


# ---------------------------------------------------------------- timeline

def _tiles(image):
    """Bounding boxes (top, left, bottom, right) of the coloured tiles of a timeline, in reading order
    (tiles are coloured; background and text are grey)."""
    from scipy import ndimage
    coloured = (image.max(-1) - image.min(-1)) > 0.08
    labelled, count = ndimage.label(coloured)
    boxes = [(s[0].start, s[1].start, s[0].stop, s[1].stop) for s in ndimage.find_objects(labelled)]
    largest = max((b[2] - b[0]) * (b[3] - b[1]) for b in boxes)
    return sorted(b for b in boxes if (b[2] - b[0]) * (b[3] - b[1]) > 0.8 * largest)


def test_timeline_has_one_tile_per_subject_and_step():
    steps, labels = 5, ["cat", "frog", "red car"]
    per_step = [[_blob(2 + 2 * t, 8) * (t + 1), _blob(8, 8), _blob(13, 2 + 2 * t)] for t in range(steps)]
    out = render(_record(per_step, labels), "timeline", 0, "turbo", 0.6, 0)
    assert out.shape[0] == 1
    tiles = _tiles(out[0])
    assert len(tiles) == steps * len(labels)
    assert len({t[0] for t in tiles}) == len(labels) and len({t[1] for t in tiles}) == steps  # a grid
    assert min(t[2] - t[0] for t in tiles) >= 48
    # every tile is normalised on its own: the first subject grows 5x over the steps, yet each tile
    # reaches the hot end; its hot spot moves down with the map (row 2 -> 10 of 16)
    first_row = [t for t in tiles if t[0] == tiles[0][0]]
    hot_rows = []
    for top, left, bottom, right in sorted(first_row, key=lambda t: t[1]):
        position, _ = _lut_positions(out[0][top:bottom, left:right], "turbo")
        assert position.max() > 0.97
        hot_rows.append(np.unravel_index(position.argmax(), position.shape)[0] * SIDE / (bottom - top))
    assert hot_rows == sorted(hot_rows) and hot_rows[-1] - hot_rows[0] > 6


def test_long_timelines_wrap_into_bands():
    steps = 30  # more than TIMELINE_COLUMNS: two bands of 15
    out = render(_record([[_blob(t % 16, 8), _blob(8, 8)] for t in range(steps)], ["cat", "frog"]), "timeline", 0,
                 "viridis", 0.6, 0)
    tiles = _tiles(out[0])
    assert len(tiles) == 2 * steps
    assert len({t[0] for t in tiles}) == 4 and len({t[1] for t in tiles}) == 15


# ---------------------------------------------------------------- overlap

def test_overlap_shows_each_colour_alone_and_mixed_where_maps_share_pixels():
    cat = _blob(8, 3, 1.5) + _blob(13, 8, 1.5)
    frog = _blob(8, 13, 1.5) + _blob(13, 8, 1.5)
    out = render(_record([[cat, frog]], ["cat", "frog"]), "overlap", 0, "turbo", 0.6, 0)
    assert out.shape == (1, 512, 512, 3)
    image = out[0]

    def at(row, col):
        y, x = _cell_centre(row, col, 512)
        return image[int(y), int(x)]

    red, green = rendering.subject_colour(0), rendering.subject_colour(1)
    assert np.abs(at(8, 3) - red).max() < 0.05  # cat alone: cat's colour
    assert np.abs(at(8, 13) - green).max() < 0.05  # frog alone: frog's colour
    shared = at(13, 8)  # both: the colours add up (red + green = yellow)
    assert shared[0] > 0.95 and shared[1] > 0.95 and shared[2] < 0.3
    assert np.abs(at(2, 10)).max() < 0.05  # neither: black
    # the legend names both subjects next to their colour swatches
    legend = image[:80, :40]
    assert (np.abs(legend - red).max(-1) < 0.02).sum() > 100
    assert (np.abs(legend - green).max(-1) < 0.02).sum() > 100


# ---------------------------------------------------------------- loss plot

def _losses(scale=1.0, refinement_iterations=0, batch=1):
    out = []
    for step in range(4):
        terms = {"attend_and_excite": [scale * (0.9 - 0.1 * step) + 0.05 * b for b in range(batch)],
                 "segregation": [0.3 - 0.05 * step + 0.1 * b for b in range(batch)]}
        total = [a + s for a, s in zip(terms["attend_and_excite"], terms["segregation"])]
        refinement = [[t - 0.05 * (k + 1) for t in total] for k in range(refinement_iterations)] if step == 0 else []
        out.append(StepLoss(step, 14.6 / (step + 1), terms, total, refinement))
    return out


def _with_losses(losses, batch=1):
    record = _record([[_blob(8, 8), _blob(4, 4)]] * 8, ["cat", "frog"], batch=batch)
    record.losses = losses
    return record


def test_loss_plot_follows_the_losses():
    plot = render(_with_losses(_losses()), "loss plot", 0, "turbo", 0.6, 0)
    assert plot.shape == (1, 540, 960, 3)
    assert np.array_equal(plot, render(_with_losses(_losses()), "loss plot", 0, "turbo", 0.6, 0))
    changed = render(_with_losses(_losses(scale=0.5)), "loss plot", 0, "turbo", 0.6, 0)
    assert np.abs(changed - plot).max() > 0.5 and (np.abs(changed - plot).max(-1) > 0.1).sum() > 500

    def pixels_of(image, colour):
        return int((np.abs(image[0] * 255 - np.array(colour)).max(-1) < 2).sum())

    blue = rendering._TERM_COLOURS[0]  # the first loss term
    assert pixels_of(plot, blue) > 300
    refined = render(_with_losses(_losses(refinement_iterations=3)), "loss plot", 0, "turbo", 0.6, 0)
    assert pixels_of(refined, rendering._REFINEMENT_COLOUR) > pixels_of(plot, rendering._REFINEMENT_COLOUR) + 30
    # batch_index picks the image whose losses are drawn (compared below the title, which names the image)
    two = _with_losses(_losses(batch=2), batch=2)
    second_alone = _losses(batch=2)
    for entry in second_alone:
        entry.terms = {name: values[1:] for name, values in entry.terms.items()}
        entry.total = entry.total[1:]
    second = render(two, "loss plot", 0, "turbo", 0.6, 1)[0, 45:]
    assert np.array_equal(second, render(_with_losses(second_alone), "loss plot", 0, "turbo", 0.6, 0)[0, 45:])
    assert not np.array_equal(second, render(two, "loss plot", 0, "turbo", 0.6, 0)[0, 45:])


def test_loss_plot_lines_sit_at_their_values():
    """The total's markers lie on the plot where their loss values are: higher loss, higher on the image."""
    losses = _losses()
    image = render(_with_losses(losses), "loss plot", 0, "turbo", 0.6, 0)[0]
    black = image.max(-1) < 0.05
    black[:, :80] = False  # tick labels
    black[:45] = False  # the title
    black[-60:] = False  # axis labels
    black[:, 700:] = False  # legend
    ys = [np.flatnonzero(black[:, x]) for x in range(image.shape[1])]
    heights = [float(np.mean(y)) for y in ys if len(y)]
    assert heights[0] < heights[-1]  # totals decrease with the step: the line goes down (image y grows)


# ---------------------------------------------------------------- binding (attributes beside their nouns)

@pytest.fixture(scope="module")
def groups(sd15):
    """'red car, blue bench' resolved with the real SD1.5 tokenizer: nouns car and bench, attributes red and blue."""
    return subjects_mod.resolve_subjects(sd15[1].tokenizer, "a red car and a blue bench", "red car, blue bench")


def _group_record(subjects, maps_at, steps=1):
    """A record whose tokens hold the given maps: maps_at = {word: [SIDE, SIDE] map} for nouns and attributes."""
    record = AttentionRecord(subjects, (SIDE, SIDE), total_steps=steps)
    words = {s.label.split()[-1]: s for s in subjects.subjects} | {a.label: a for _n, a in subjects.attributes}
    for step in range(steps):
        aggregated = torch.full((1, SIDE * SIDE, 77), 1e-3)
        for word, word_map in maps_at.items():
            for position in words[word].token_positions:
                aggregated[:, :, position] = word_map.flatten() * (step + 1)
        record.add_maps(step, 14.6 / (step + 1), aggregated)
    return record


def _jsd(a, b):
    """Jensen-Shannon divergence of two maps as distributions over pixels, in numpy (natural log)."""
    p = np.asarray(a, np.float64).ravel()
    q = np.asarray(b, np.float64).ravel()
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(x, y):
        nonzero = x > 0
        return float((x[nonzero] * np.log(x[nonzero] / y[nonzero])).sum())
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def test_binding_mode_draws_each_attribute_beside_its_noun(groups):
    assert [(noun, a.label) for noun, a in groups.attributes] == [(0, "red"), (1, "blue")]
    car = _blob(11, 4)
    bench, blue = _blob(4, 12), _blob(12, 12)
    record = _group_record(groups, {"car": car, "red": car.clone(), "bench": bench, "blue": blue}, steps=2)
    out = render(record, "binding", -1, "turbo", 1.0, 0)
    gap = rendering.BINDING_GAP
    assert out.shape == (1, 2 * 512 + gap, 3 * 512 + 2 * gap, 3) and out.dtype == np.float32
    picture = torch.rand(1, 96, 128, 3, generator=torch.Generator().manual_seed(0))
    assert render(record, "binding", 0, "turbo", 0.6, 0, picture).shape == (1, 2 * 96 + gap, 3 * 128 + 2 * gap, 3)

    nouns, attributes, apart, divergence, captions = visualiser.binding_panels(record, 1, 0, "step 1")
    assert nouns.shape == attributes.shape == apart.shape == (2, SIDE, SIDE)
    assert torch.allclose(nouns[1], 2 * bench) and torch.allclose(attributes[1], 2 * blue)  # the raw maps
    # identical maps: JSD 0 and no disagreement anywhere
    assert divergence[0].item() == 0.0 and not apart[0].any()
    # different maps: the JSD is the textbook one, printed in the caption; the disagreement is |P - Q| / peak
    expected = _jsd(bench, blue)
    assert 0.3 < expected < math.log(2) and divergence[1].item() == pytest.approx(expected, abs=1e-9)
    assert captions[1][2][0] == f"blue / bench: JSD {expected:.3f}"
    assert [c[0] for c in captions[0]] == ["car", "red", "red / car: JSD 0.000"]
    p, q = (m.double().flatten() / m.double().sum() for m in (bench, blue))
    assert torch.allclose(apart[1].flatten(), (p - q).abs() / torch.maximum(p.max(), q.max()))
    assert apart[1].max().item() == pytest.approx(1.0, abs=1e-3)

    image = out[0]
    row, panel = 512 + gap, 512 + gap
    below = slice(200, 512)  # below the captions
    # row 0: the noun's and the attribute's panel are the same picture; the disagreement panel is the cold end
    assert np.array_equal(image[below, :512], image[below, panel:panel + 512])
    cold = rendering.COLORMAPS["turbo"][0]
    assert np.abs(image[below, 2 * panel:2 * panel + 512] - cold).max() <= 1 / 255 + 1e-6
    # row 1: the disagreement is hot at both peaks (each map attends where the other does not), cold far away
    apart_panel = image[row:row + 512, 2 * panel:2 * panel + 512]
    for peak in ((4, 12), (12, 12)):
        y, x = _cell_centre(*peak, 512)
        assert _lut_positions(apart_panel[int(y), int(x)], "turbo")[0] > 0.95, peak
    assert _lut_positions(apart_panel[500, 10], "turbo")[0] < 0.02


def test_binding_mode_needs_subject_groups():
    assert visualiser.MODES[:5] == ("step", "average", "timeline", "overlap", "loss plot")  # saved values keep
    assert visualiser.MODES[-1] == "binding"
    record = _record([[_blob(8, 8), _blob(4, 4)]], ["cat", "frog"])
    with pytest.raises(ValueError, match=r"binding needs attributes: the subjects 'cat', 'frog' have none\. Name "
                                         r"subject groups such as 'red car, blue bench'"):
        render(record, "binding", 0, "turbo", 0.6, 0)


def test_loss_plot_draws_every_term_with_its_papers_name():
    names = ["attend_and_excite", "divide_and_bind_binding", "syngen", "conform"]
    values = {"attend_and_excite": 0.8, "divide_and_bind_binding": 0.4, "syngen": -1.5, "conform": 2.0}
    losses = []
    for step in range(4):
        terms = {name: [values[name] * (1 - 0.1 * step)] for name in names}
        losses.append(StepLoss(step, 14.6 / (step + 1), terms, [sum(v[0] for v in terms.values())]))
    plot = render(_with_losses(losses), "loss plot", 0, "turbo", 0.6, 0)[0]
    for index, name in enumerate(names):
        colour = np.array(rendering._TERM_COLOURS[index])
        assert (np.abs(plot * 255 - colour).max(-1) < 2).sum() > 150, name  # its line and legend swatch
    assert [rendering.loss_label(n) for n in names] == ["Attend-and-Excite", "Divide & Bind binding", "SynGen",
                                                        "CONFORM"]
    assert rendering.loss_label("some_new_loss") == "some new loss"


# ---------------------------------------------------------------- errors

def test_clear_errors():
    record = _record([[_blob(8, 8)]] * 4, ["cat"])
    with pytest.raises(ValueError, match=r"step 4 was not recorded; valid steps: 0\.\.3 .* or -4\.\.-1"):
        render(record, "step", 4, "turbo", 0.6, 0)
    with pytest.raises(ValueError, match=r"step -5 is out of range.*-4\.\.-1"):
        render(record, "overlap", -5, "turbo", 0.6, 0)
    with pytest.raises(ValueError, match=r"batch_index 1 is out of range.*1 image\(s\), valid 0\.\.0"):
        render(record, "step", 0, "turbo", 0.6, 1)
    with pytest.raises(ValueError, match="unknown mode 'heat'; valid: step, average, timeline, overlap, loss plot"):
        render(record, "heat", 0, "turbo", 0.6, 0)
    with pytest.raises(ValueError, match="unknown colormap 'hot'; valid: turbo, jet, inferno, viridis"):
        render(record, "step", 0, "hot", 0.6, 0)
    with pytest.raises(ValueError, match="image has 3 pictures and the attention record 1 images"):
        render(record, "step", 0, "turbo", 0.6, 0, torch.zeros(3, 64, 64, 3))
    with pytest.raises(ValueError, match="no guidance losses: the sampler ran without GUIDANCE"):
        render(record, "loss plot", 0, "turbo", 0.6, 0)
    empty = AttentionRecord(_subjects(["cat"]), (SIDE, SIDE), total_steps=4)
    for mode in ("step", "average", "timeline", "overlap"):
        with pytest.raises(ValueError, match="holds no attention maps: enable record_maps on the Attention KSampler"):
            render(empty, mode, -1, "turbo", 0.6, 0)
    with pytest.raises(ValueError, match="no ATTENTION connected"):
        render(None, "step", 0, "turbo", 0.6, 0)


def test_sparse_steps_are_named_by_their_sampling_step():
    record = _record([[_blob(8, 8)]] * 3, ["cat"])
    record.steps = [0, 1, 5]
    render(record, "step", 5, "turbo", 0.6, 0)
    with pytest.raises(ValueError, match=r"valid steps: 0\.\.1, 5 \(sampling steps\)"):
        render(record, "step", 2, "turbo", 0.6, 0)


# ---------------------------------------------------------------- the real sampler, through ComfyUI

def test_real_attention_ksampler_then_visualiser(runner):
    import folder_paths
    prompt = {
        "1": {"class_type": "TinyCheckpointLoader", "inputs": {"family": "sd15", "seed": 0}},
        "2": {"class_type": "AttnGuideTextEncode", "inputs": {"clip": ["1", 1], "text": "a cat and a frog",
                                                              "subjects": "cat, frog"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 192, "batch_size": 1}},
        "5": {"class_type": "AttnGuideGuidance", "inputs": {
            "attend_and_excite_weight": 1.0, "segregation_weight": 0.5, "retention_weight": 0.0,
            "attendance_weight": 0.0, "scale_factor": 20.0, "guidance_start": 0.0, "guidance_end": 0.5,
            "refinement": "", "max_refinement_steps": 0, "softmax_temperature": 100.0, "exclude_padding": False,
            "smoothing_sigma": 0.5, "retention_threshold": 0.5, "truncate_pass": True}},
        "6": {"class_type": "AttnGuideKSampler", "inputs": {
            "model": ["1", 0], "seed": 3, "steps": 2, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0,
            "subjects": ["2", 1], "attention_resolution": 0, "record_maps": True, "guidance": ["5", 0]}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "AttnGuideVisualize", "inputs": {
            "attention": ["6", 1], "mode": "step", "step": -1, "colormap": "turbo", "opacity": 0.6,
            "batch_index": 0, "image": ["7", 0]}},
        "9": {"class_type": "AttnGuideVisualize", "inputs": {
            "attention": ["6", 1], "mode": "loss plot", "step": 0, "colormap": "turbo", "opacity": 0.6,
            "batch_index": 0}},
        "10": {"class_type": "TestCapture", "inputs": {"label": "maps", "value": ["8", 0]}},
        "11": {"class_type": "TestCapture", "inputs": {"label": "attention", "value": ["6", 1]}},
        "12": {"class_type": "TestCapture", "inputs": {"label": "loss", "value": ["9", 0]}},
    }
    out = runner.run(prompt)
    record, maps = out["attention"], out["maps"]
    assert record.steps == [0, 1] and record.resolution == (6, 8) and len(record.losses) == 1
    assert maps.shape == (2, 192, 256, 3)  # one map per subject, at the decoded picture's size
    assert out["loss"].shape == (1, 540, 960, 3)
    # the map drawn is the record's: with opacity 1 (no picture) the hot end sits at the subject's peak
    direct = torch.from_numpy(render(record, "step", -1, "turbo", 1.0, 0))
    for index in range(2):
        raw = record.subject_maps(1)[0, index]
        peak_row, peak_col = divmod(int(raw.argmax()), raw.shape[1])
        position, _ = _lut_positions(direct[index].numpy(), "turbo")
        y, x = int((peak_row + 0.5) * 512 / 8), int((peak_col + 0.5) * 512 / 8)
        if y > 130:  # not under the caption
            assert position[y, x] > 0.97
    # both visualisers show their pictures on the node: PreviewImage files in ComfyUI's temp folder
    shown = runner.last_executor.history_result["outputs"]
    for node, count in (("8", 2), ("9", 1)):
        images = shown[node]["images"]
        assert len(images) == count and all(i["type"] == "temp" for i in images)
        for item in images:
            assert os.path.isfile(os.path.join(folder_paths.get_temp_directory(), item["subfolder"], item["filename"]))


def test_real_binding_run_then_visualiser(runner):
    """'red car, blue bench' guided with SynGen: the binding view and the loss plot of the real record."""
    prompt = {
        "1": {"class_type": "TinyCheckpointLoader", "inputs": {"family": "sd15", "seed": 0}},
        "2": {"class_type": "AttnGuideTextEncode", "inputs": {"clip": ["1", 1], "text": "a red car and a blue bench",
                                                              "subjects": "red car, blue bench"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 192, "batch_size": 1}},
        "5": {"class_type": "AttnGuideGuidance", "inputs": {
            "attend_and_excite_weight": 1.0, "segregation_weight": 0.0, "retention_weight": 0.0,
            "attendance_weight": 0.0, "syngen_weight": 1.0, "scale_factor": 20.0, "guidance_start": 0.0,
            "guidance_end": 0.5, "refinement": "", "max_refinement_steps": 0, "softmax_temperature": 100.0,
            "exclude_padding": False, "smoothing_sigma": 0.5, "retention_threshold": 0.5, "truncate_pass": True}},
        "6": {"class_type": "AttnGuideKSampler", "inputs": {
            "model": ["1", 0], "seed": 3, "steps": 2, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0,
            "subjects": ["2", 1], "attention_resolution": 0, "record_maps": True, "guidance": ["5", 0]}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "AttnGuideVisualize", "inputs": {
            "attention": ["6", 1], "mode": "binding", "step": -1, "colormap": "turbo", "opacity": 0.6,
            "batch_index": 0, "image": ["7", 0]}},
        "9": {"class_type": "AttnGuideVisualize", "inputs": {
            "attention": ["6", 1], "mode": "loss plot", "step": 0, "colormap": "turbo", "opacity": 0.6,
            "batch_index": 0}},
        "10": {"class_type": "TestCapture", "inputs": {"label": "binding", "value": ["8", 0]}},
        "11": {"class_type": "TestCapture", "inputs": {"label": "attention", "value": ["6", 1]}},
        "12": {"class_type": "TestCapture", "inputs": {"label": "loss", "value": ["9", 0]}},
    }
    out = runner.run(prompt)
    record = out["attention"]
    assert [a.label for _noun, a in record.subjects.attributes] == ["red", "blue"]
    assert len(record.losses) == 1 and set(record.losses[0].terms) == {"attend_and_excite", "syngen"}
    gap = rendering.BINDING_GAP
    assert out["binding"].shape == (1, 2 * 192 + gap, 3 * 256 + 2 * gap, 3)  # two pairs, panels the picture's size
    assert out["loss"].shape == (1, 540, 960, 3)
    # the divergence drawn is that of the record's raw maps at the last step
    _nouns, _attributes, _apart, divergence, _captions = visualiser.binding_panels(record, 1, 0)
    grid = record.grid_maps(1)[0].numpy()
    for (noun, attribute), value in zip(record.subjects.attributes, divergence.tolist()):
        noun_map = grid[:, list(record.subjects.subjects[noun].token_positions)].mean(-1)
        attribute_map = grid[:, list(attribute.token_positions)].mean(-1)
        assert value == pytest.approx(_jsd(noun_map, attribute_map), abs=1e-6)
