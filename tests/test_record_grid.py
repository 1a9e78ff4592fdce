"""AttentionRecord entries of another size (Deep Shrink) or covering an area (ConditioningSetArea): put on
the record's grid, then drawn by the Attention Map Visualiser in every mode."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from harness import pack_module

rendering = pack_module("pictures.rendering")
visualiser = pack_module("nodes.visualiser")
record_mod = pack_module("attention_patch.record")
subjects_mod = pack_module("text.subjects")

AttentionRecord, StepLoss = record_mod.AttentionRecord, record_mod.StepLoss
SIDE = 16  # the nominal grid of the hand-made records
TOKENS = 77
QUANTUM = 1 / 255 + 1e-6  # one 8-bit step: the pictures pass through PIL


def _subjects(labels):
    subjects = tuple(subjects_mod.Subject(label, (2 + i,), 0) for i, label in enumerate(labels))
    return subjects_mod.Subjects(subjects, " ".join(labels), TOKENS, (2 + len(labels),))


def _probabilities(batch, rows, cols, seed):
    """Random softmax maps [batch, rows*cols, TOKENS]: each pixel sums to 1 over the tokens."""
    logits = torch.randn(batch, rows * cols, TOKENS, generator=torch.Generator().manual_seed(seed)) * 3
    return logits.softmax(dim=-1)


def _blob_maps(batch, rows, cols, centres, width=1.0):
    """[batch, rows*cols, TOKENS]: subject i (token 2 + i) a Gaussian blob at centres[i], the rest of each
    pixel's probability spread over the other tokens, so each pixel sums to 1."""
    yy, xx = torch.meshgrid(torch.arange(rows, dtype=torch.float32), torch.arange(cols, dtype=torch.float32),
                            indexing="ij")
    maps = torch.full((batch, rows * cols, TOKENS), 0.0)
    taken = torch.zeros(rows * cols)
    for i, (row, col) in enumerate(centres):
        blob = 0.4 * torch.exp(-((yy - row) ** 2 + (xx - col) ** 2) / (2 * width ** 2)).flatten() + 0.01
        maps[:, :, 2 + i] = blob
        taken += blob
    others = [t for t in range(TOKENS) if t not in range(2, 2 + len(centres))]
    maps[:, :, others] = ((1 - taken) / len(others))[None, :, None]
    return maps


def _independent_resize(maps, rows, cols, size):
    """[B, rows*cols, T] -> [B, H*W, T] the way the brief describes it: bilinear per token."""
    batch, _, tokens = maps.shape
    grid = maps.reshape(batch, rows, cols, tokens).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=size, mode="bilinear", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(batch, size[0] * size[1], tokens)


# ---------------------------------------------------------------- the record

def test_nominal_entries_are_stored_and_returned_unchanged():
    record = AttentionRecord(_subjects(["cat"]), (SIDE, SIDE))
    maps = _probabilities(2, SIDE, SIDE, 0)
    record.add_maps(0, 14.6, maps)
    assert record.resolutions == [(SIDE, SIDE)] and record.areas == [None] and not record.has_areas
    assert record.grid_maps(0) is record.maps[0] and torch.equal(record.maps[0], maps)
    assert torch.equal(record.subject_maps(0), maps[:, :, 2].reshape(2, 1, SIDE, SIDE))
    assert torch.equal(record.grid_coverage(0), torch.ones(SIDE, SIDE))
    # a record whose maps were appended by hand (older code) reads as nominal, whole-image entries
    legacy = AttentionRecord(_subjects(["cat"]), (SIDE, SIDE), steps=[0], sigmas=[1.0], maps=[maps])
    assert legacy.entry_resolution(0) == (SIDE, SIDE) and legacy.entry_area(-1) is None
    assert legacy.grid_maps(0) is maps


def test_a_smaller_entry_is_resized_bilinearly_onto_the_grid():
    record = AttentionRecord(_subjects(["cat", "frog"]), (8, 8))
    small = _probabilities(2, 4, 4, 1)
    record.add_maps(3, 2.0, small, resolution=(4, 4))
    assert record.resolutions == [(4, 4)] and torch.equal(record.maps[0], small)  # the raw entry is kept
    grid = record.grid_maps(0)
    assert grid.shape == (2, 64, TOKENS)
    assert torch.allclose(grid, _independent_resize(small, 4, 4, (8, 8)), atol=1e-7)
    # by hand: at 2x, grid pixel (1, 1) lies a quarter of a source pixel from source (0, 0) towards (1, 1)
    source = small.reshape(2, 4, 4, TOKENS)
    by_hand = (9 * source[:, 0, 0] + 3 * source[:, 0, 1] + 3 * source[:, 1, 0] + source[:, 1, 1]) / 16
    assert torch.allclose(grid.reshape(2, 8, 8, TOKENS)[:, 1, 1], by_hand, atol=1e-7)
    assert torch.allclose(grid.reshape(2, 8, 8, TOKENS)[:, 0, 0], source[:, 0, 0], atol=1e-7)  # the clamped corner
    assert torch.allclose(grid.sum(-1), torch.ones(2, 64), atol=1e-5)  # still a distribution per pixel
    subject = record.subject_maps(0)
    assert subject.shape == (2, 2, 8, 8)
    assert torch.allclose(subject[:, 1], grid[:, :, 3].reshape(2, 8, 8))
    # non-square and larger than the grid work the same way
    wide = AttentionRecord(_subjects(["cat"]), (6, 8))
    for size in ((3, 4), (12, 16)):
        entry = _probabilities(1, *size, 2)
        wide.add_maps(len(wide.maps), 1.0, entry, resolution=size)
        assert torch.allclose(wide.grid_maps(-1), _independent_resize(entry, *size, (6, 8)), atol=1e-7)
        assert torch.allclose(wide.grid_maps(-1).sum(-1), torch.ones(1, 48), atol=1e-5)


@pytest.mark.parametrize("area, box", [
    ((0.25, 0.5, 0.5, 0.5), (2, 4, 4, 4)),     # on grid lines
    ((0.1, 0.0, 0.3, 1.0), (1, 0, 2, 8)),      # rows 0.8..3.2 -> 1..3
    ((0.0, 0.9, 1.0, 0.1), (0, 7, 8, 1)),      # 7.2..8 -> one column
    ((0.5, 0.5, 0.01, 0.01), (4, 4, 1, 1)),    # below a pixel: still one
])
def test_area_boxes_round_their_edges(area, box):
    assert record_mod.area_box(area, (8, 8)) == box


def test_an_area_entry_is_placed_into_its_rectangle_with_zeros_outside():
    record = AttentionRecord(_subjects(["cat", "frog"]), (8, 8))
    entry = _probabilities(2, 2, 2, 3)
    record.add_maps(0, 1.0, entry, resolution=(2, 2), area=(0.25, 0.5, 0.5, 0.5))  # rows 2..5, columns 4..7
    assert record.areas == [(0.25, 0.5, 0.5, 0.5)] and record.has_areas
    grid = record.grid_maps(0).reshape(2, 8, 8, TOKENS)
    inside = grid[:, 2:6, 4:8]
    assert torch.allclose(inside.reshape(2, 16, TOKENS), _independent_resize(entry, 2, 2, (4, 4)), atol=1e-7)
    outside = grid.clone()
    outside[:, 2:6, 4:8] = 0
    assert not outside.any()
    assert torch.allclose(inside.sum(-1), torch.ones(2, 4, 4), atol=1e-5)
    expected = torch.zeros(8, 8)
    expected[2:6, 4:8] = 1
    assert torch.equal(record.grid_coverage(0), expected)
    subject = record.subject_maps(0)
    assert torch.allclose(subject[:, 0, 2:6, 4:8], inside[..., 2]) and subject[:, :, :2].abs().max() == 0
    # an entry already at its rectangle's size goes in unchanged
    exact = _probabilities(1, 4, 8, 4)
    record2 = AttentionRecord(_subjects(["cat"]), (8, 8))
    record2.add_maps(0, 1.0, exact, resolution=(4, 8), area=(0.5, 0.0, 0.5, 1.0))
    assert torch.equal(record2.grid_maps(0).reshape(1, 8, 8, TOKENS)[:, 4:], exact.reshape(1, 4, 8, TOKENS))
    assert not record2.grid_maps(0).reshape(1, 8, 8, TOKENS)[:, :4].any()


def test_add_maps_checks_its_arguments():
    record = AttentionRecord(_subjects(["cat"]), (8, 8))
    with pytest.raises(ValueError, match=r"shape \(1, 16, 77\) do not hold 8x8 pixels: expected \[batch, 64, tokens\]"):
        record.add_maps(0, 1.0, _probabilities(1, 4, 4, 0))
    with pytest.raises(ValueError, match=r"do not hold 2x2 pixels"):
        record.add_maps(0, 1.0, _probabilities(1, 4, 4, 0), resolution=(2, 2))
    for area in ((0.5, 0.0, 0.6, 1.0), (0.0, 0.0, 0.0, 1.0), (-0.1, 0.0, 0.5, 0.5), (0.0, 0.0, 1.0)):
        with pytest.raises(ValueError, match="area"):
            record.add_maps(0, 1.0, _probabilities(1, 8, 8, 0), area=area)
    assert record.maps == [] and record.resolutions == [] and record.areas == []  # nothing half-added


# ---------------------------------------------------------------- the visualiser, every mode

AREA = (0.5, 0.0, 0.5, 0.5)  # the bottom-left quarter: grid rows 8..15, columns 0..7


def _mixed_record(batch=2):
    """Four steps on a 16x16 grid: nominal; Deep Shrink (8x8); an 8x8 area entry; a nominal one again.
    Image b of the batch has its cat blob shifted b pixels to the right (in the entry's own pixels)."""
    record = AttentionRecord(_subjects(["cat", "frog"]), (SIDE, SIDE), total_steps=4)
    entries = [((SIDE, SIDE), None, [(3, 12), (12, 3)]),
               ((8, 8), None, [(5, 2), (6, 6)]),
               ((8, 8), AREA, [(2, 5), (6, 1)]),
               ((SIDE, SIDE), None, [(8, 8), (2, 2)])]
    for step, (size, area, centres) in enumerate(entries):
        maps = torch.cat([_blob_maps(1, *size, [(centres[0][0], centres[0][1] + b), centres[1]])
                          for b in range(batch)])
        record.add_maps(step, 14.6 / (step + 1), maps, resolution=size, area=area)
    record.losses = [StepLoss(s, 14.6 / (s + 1), {"attend_and_excite": [0.9 - 0.2 * s] * batch},
                              [0.9 - 0.2 * s] * batch) for s in range(3)]
    return record


def _execute(record, mode, step=-1, colormap="turbo", opacity=0.6, batch_index=0, image=None):
    out = visualiser.AttentionVisualize.execute(record, mode, step, colormap, opacity, batch_index, image)
    return out.args[0].numpy()


def _grid_subject_maps(record, index, batch_index):
    """The subject maps of entry `index` on the grid, computed here from the raw entry."""
    raw, size, area = record.maps[index], record.resolutions[index], record.areas[index]
    top, left, height, width = record_mod.area_box(area, record.resolution)
    grid = torch.zeros(raw.shape[0], *record.resolution, TOKENS)
    grid[:, top:top + height, left:left + width] = _independent_resize(raw, *size, (height, width)).reshape(
        raw.shape[0], height, width, TOKENS)
    return grid[batch_index, :, :, 2:4].permute(2, 0, 1)


def _hottest(image, colormap="turbo", below=130):
    """(y, x) of the hottest colormap pixel below the caption."""
    lut = rendering.COLORMAPS[colormap][::2]
    distances = ((image[below::2, ::2, None, :] - lut) ** 2).sum(-1)
    position = distances.argmin(-1) / (len(lut) - 1)
    y, x = np.unravel_index(position.argmax(), position.shape)
    return 2 * y + below, 2 * x


def test_step_mode_draws_each_entry_on_the_grid():
    record = _mixed_record()
    # the Deep Shrink step: the cat blob at 8x8 cell (5, 2 + b) -> 512 px ((5.5 / 8) * 512, ((2.5 + b) / 8) * 512)
    for batch_index in range(2):
        out = _execute(record, "step", 1, batch_index=batch_index)
        assert out.shape == (2, 512, 512, 3)
        y, x = _hottest(out[0])
        assert abs(y - 352) <= 24 and abs(x - (160 + 64 * batch_index)) <= 24, (batch_index, y, x)
        # what is drawn is the independently resized map, normalised and coloured
        want = rendering.render_heatmaps(_grid_subject_maps(record, 1, batch_index), ["cat", "frog"], "turbo")
        assert np.abs(out[:, 200:] - want[:, 200:]).max() <= QUANTUM  # below the captions
    # with a picture: its size
    picture = torch.rand(1, 96, 128, 3, generator=torch.Generator().manual_seed(0))
    assert _execute(record, "step", 1, image=picture).shape == (2, 96, 128, 3)


def test_area_steps_leave_the_picture_uncovered_outside_their_rectangle():
    record = _mixed_record()
    picture = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(1))
    out = _execute(record, "step", 2, opacity=1.0, image=picture)  # the area step
    assert out.shape == (2, 128, 128, 3)
    outside = np.ones((128, 128), bool)
    outside[64:, :64] = False  # grid rows 8..15, columns 0..7 at 8 px per grid pixel
    below = np.zeros((128, 128), bool)
    below[70:] = True  # below the caption
    for subject in range(2):
        assert np.abs(out[subject][outside & below] - picture[0].numpy()[outside & below]).max() <= QUANTUM
        # inside: the map alone (opacity 1), normalised over the rectangle only, so it reaches both ends
        maps = _grid_subject_maps(record, 2, 0)[subject]
        region = rendering.upsample(maps[None], (128, 128))[0][64:, :64]
        low, high = region.min(), region.max()
        heat = rendering.apply_colormap((region - low) / (high - low), "turbo")
        assert np.abs(out[subject][64:, :64] - heat).max() <= QUANTUM
    # the cat blob of the area entry at its cell (2, 5) of 8x8 over the bottom-left quarter
    y, x = _hottest(out[0][:, :64], below=64)  # inside the rectangle (the picture is random colours)
    assert abs(y - (64 + 2.5 * 8)) <= 8 and abs(x - 5.5 * 8) <= 8
    # without a picture, outside the rectangle is flat grey
    alone = _execute(record, "step", 2)
    assert alone.shape == (2, 512, 512, 3)
    assert np.abs(alone[0, 200:256, 300:] - rendering.UNCOVERED).max() <= QUANTUM
    assert np.abs(alone[0, 300:, 300:] - rendering.UNCOVERED).max() <= QUANTUM
    assert alone[0, 300:, :250].std() > 0.1  # the heat map inside


def test_average_mode_is_the_mean_of_the_grid_maps():
    record = _mixed_record()
    out = _execute(record, "average", batch_index=1)
    assert out.shape == (2, 512, 512, 3)
    mean = torch.stack([_grid_subject_maps(record, i, 1) for i in range(4)]).mean(0)
    # some steps cover the whole image, so the average covers it all: plain heat maps
    want = rendering.render_heatmaps(mean, ["cat", "frog"], "turbo")
    assert np.abs(out[:, 200:] - want[:, 200:]).max() <= QUANTUM
    # a record of area entries only: the average covers their union, the rest stays grey
    areas_only = AttentionRecord(_subjects(["cat"]), (SIDE, SIDE), total_steps=2)
    areas_only.add_maps(0, 2.0, _blob_maps(1, 4, 4, [(1, 1)]), resolution=(4, 4), area=(0.5, 0.0, 0.5, 0.5))
    areas_only.add_maps(1, 1.0, _blob_maps(1, 4, 4, [(2, 2)]), resolution=(4, 4), area=(0.5, 0.5, 0.5, 0.5))
    average = _execute(areas_only, "average")
    assert np.abs(average[0, 200:256] - rendering.UNCOVERED).max() <= QUANTUM  # the top half is in neither
    assert average[0, 256:].std() > 0.1


def test_timeline_tiles_show_each_entry_on_the_grid():
    record = _mixed_record()
    out = _execute(record, "timeline", colormap="viridis")
    assert out.ndim == 4 and out.shape[0] == 1
    image = out[0]
    # the tiles of the whole-image steps are fully coloured; find them and the grid they lie on
    from scipy import ndimage
    coloured = (image.max(-1) - image.min(-1)) > 0.08
    labelled, _ = ndimage.label(coloured)
    boxes = [(s[0].start, s[1].start, s[0].stop, s[1].stop) for s in ndimage.find_objects(labelled)]
    side = max(b[2] - b[0] for b in boxes)
    tiles = sorted(b for b in boxes if b[2] - b[0] == side and b[3] - b[1] == side)
    assert side >= 48 and len(tiles) == 3 * 2  # three whole-image steps, two subjects
    tops, lefts = sorted({t[0] for t in tiles}), sorted({t[1] for t in tiles})
    assert len(tops) == 2 and len(lefts) == 3
    pitch = (lefts[1] - lefts[0])
    area_left = lefts[1] + pitch  # step 2 is the third column
    assert lefts[2] == area_left + pitch
    for row, top in enumerate(tops):
        # each whole-image tile is the independent grid map, normalised, coloured
        for column, step in ((0, 0), (1, 1), (2, 3)):
            maps = _grid_subject_maps(record, step, 0)[row]
            want = rendering.apply_colormap(rendering.normalise(rendering.upsample(maps[None], (side, side))),
                                            "viridis")[0]
            got = image[top:top + side, lefts[column]:lefts[column] + side]
            assert np.abs(got - want).max() <= QUANTUM, (row, step)
        # the area step's tile: grey in the top half and the right half, coloured in the bottom-left quarter
        tile = image[top:top + side, area_left:area_left + side]
        half = side // 2
        assert np.abs(tile[:half - 1] - rendering.UNCOVERED).max() <= QUANTUM
        assert np.abs(tile[:, half + 1:] - rendering.UNCOVERED).max() <= QUANTUM
        assert (np.abs(tile[half + 1:, :half - 1] - rendering.UNCOVERED).max(-1) > 0.05).mean() > 0.95


def test_overlap_mode_on_the_grid():
    record = _mixed_record()
    out = _execute(record, "overlap", 1)
    assert out.shape == (1, 512, 512, 3)
    red, green = rendering.subject_colour(0), rendering.subject_colour(1)
    # Deep Shrink step: the cat at 8x8 cell (5, 2), the frog at (6, 6): their own colours there
    assert np.abs(out[0, int(5.5 * 64), int(2.5 * 64)] - red).max() < 0.05
    assert np.abs(out[0, int(6.5 * 64), int(6.5 * 64)] - green).max() < 0.05
    # the area step: black (no subject) inside the rectangle away from the blobs, grey outside it
    area = _execute(record, "overlap", 2)[0]
    assert np.abs(area[300:, 300:] - rendering.UNCOVERED).max() <= QUANTUM
    assert np.abs(area[int(256 + 2.5 * 32), int(5.5 * 32)] - red).max() < 0.05  # the cat at cell (2, 5)
    assert np.abs(area[int(256 + 6.5 * 32), int(1.5 * 32)] - green).max() < 0.05  # the frog at (6, 1)
    assert np.abs(area[int(256 + 6.5 * 32), int(6.5 * 32)]).max() < 0.1


def test_loss_plot_and_error_paths_with_mixed_entries(monkeypatch):
    record = _mixed_record()
    plot = _execute(record, "loss plot")
    assert plot.shape == (1, 540, 960, 3)
    with pytest.raises(ValueError, match=r"batch_index 2 is out of range.*2 image\(s\)"):
        _execute(record, "step", batch_index=2)
    # captions say how a step was put on the grid
    details = []
    original = rendering.render_heatmaps

    def spy(maps, labels, colormap, picture=None, opacity=0.6, details_=None, long_side=512, coverage=None):
        details.append(details_)
        return original(maps, labels, colormap, picture, opacity, details_, long_side, coverage)

    monkeypatch.setattr(visualiser.rendering, "render_heatmaps", spy)
    for step in range(4):
        _execute(record, "step", step)
    assert [d[0].split(", peak")[0] for d in details] == [
        "step 0 of 0..3", "step 1 of 0..3 (captured 8x8)", "step 2 of 0..3 (captured 8x8, area)", "step 3 of 0..3"]
