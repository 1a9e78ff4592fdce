"""The losses on hand-made maps where the answer is known, and their gradients."""
import math

import numpy as np
import pytest
import torch
from harness import pack_module
subjects_mod = pack_module("text.subjects")

L = pack_module("guidance.losses")


def _blob(center, size=16, radius=3.0):
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    return torch.exp(-((ys - center[0]) ** 2 + (xs - center[1]) ** 2) / (2 * radius ** 2))


def _square(top, left, side=6, size=16):
    out = torch.zeros(size, size)
    out[top:top + side, left:left + side] = 1.0
    return out


def test_reference_kernel_quirk():
    kernel = L.reference_gaussian_kernel(3, 0.5)
    # the reference's exp(-((x - mean) / (2 sigma))^2): neighbour/centre = exp(-1) for sigma 0.5
    assert kernel[1, 0] / kernel[1, 1] == pytest.approx(math.exp(-1.0), rel=1e-6)
    assert kernel.sum() == pytest.approx(1.0)
    assert kernel[0, 0] / kernel[1, 1] == pytest.approx(math.exp(-2.0), rel=1e-6)


def test_attend_and_excite_loss_is_the_weakest_subjects_gap():
    strong = torch.zeros(16, 16)
    strong[4:12, 4:12] = 1.0
    weak = torch.full((16, 16), 0.3)
    maps = torch.stack([strong, weak])[None]
    assert L.attend_and_excite_loss(maps).item() == pytest.approx(0.7, abs=1e-6)
    maps2 = torch.stack([strong, strong])[None]
    assert L.attend_and_excite_loss(maps2).item() == pytest.approx(0.0, abs=1e-6)


def test_segregation_identical_disjoint_half():
    a = _square(0, 0)
    identical = torch.stack([a, a])[None]
    disjoint = torch.stack([a, _square(9, 9)])[None]
    # half overlap: shift by half the side along one axis
    half = torch.stack([_square(0, 0, side=6), _square(0, 3, side=6)])[None]
    # compare on unsmoothed ratios via a tiny sigma (the smoothing is part of the loss; test both)
    seg = lambda m: L.segregation_loss(m, smoothing_sigma=0.05).item()  # noqa: E731
    assert seg(identical) == pytest.approx(0.5, abs=1e-4)
    assert seg(disjoint) == pytest.approx(0.0, abs=1e-4)
    # overlap 18 px, sum of both 72 px -> 0.25
    assert seg(half) == pytest.approx(18 / 72, abs=1e-3)
    # three subjects: pairs add up
    three = torch.stack([a, a, _square(9, 9)])[None]
    assert seg(three) == pytest.approx(0.5, abs=1e-4)


def test_retention_mask_and_loss():
    prev = torch.stack([_blob((4, 4)), _blob((11, 11))])[None]
    masks = L.retention_mask(prev, threshold=0.5)
    assert masks[0, 0, 4, 4] == 1 and masks[0, 0, 11, 11] == 0
    assert masks[0, 1, 11, 11] == 1 and masks[0, 1, 4, 4] == 0
    stayed = L.retention_loss(prev, masks).item()
    moved = L.retention_loss(prev.flip(1), masks).item()  # each subject now where the other was
    assert moved > stayed
    assert L.retention_loss(prev, None).item() == 0.0


def test_attendance_prefers_structured_maps():
    flat = torch.full((16, 16), 0.5)
    peaked = _blob((8, 8), radius=2.0)
    both_flat = torch.stack([flat, flat])[None]
    one_peaked = torch.stack([peaked, peaked])[None]
    assert L.attendance_loss(one_peaked).item() < L.attendance_loss(both_flat).item()


def _descends(loss_fn, maps, **kwargs):
    maps = maps.clone().requires_grad_(True)
    before = loss_fn(maps, **kwargs).sum()
    (grad,) = torch.autograd.grad(before, [maps])
    after = loss_fn((maps - 0.05 * grad / grad.abs().max()).detach(), **kwargs).sum()
    return before.item(), after.item(), grad


def test_gradients_point_the_right_way():
    a, b = _blob((6, 6)), _blob((9, 9))
    maps = torch.stack([a, b * 0.4])[None]
    before, after, grad = _descends(L.attend_and_excite_loss, maps)
    assert after < before
    assert grad[0, 1].sum() < 0  # raising the weak subject lowers the loss
    assert grad[0, 0].abs().sum() == 0  # the strong subject does not decide the loss
    before, after, grad = _descends(L.segregation_loss, maps)
    assert after < before
    prev_masks = L.retention_mask(torch.stack([a, b])[None])
    before, after, _ = _descends(L.retention_loss, torch.stack([b, a])[None], previous_masks=prev_masks)
    assert after < before
    before, after, _ = _descends(L.attendance_loss, maps)
    assert after < before


def test_combined_loss_weights_and_skips():
    maps = torch.stack([_blob((6, 6)), _blob((9, 9))])[None]
    total, terms = L.combined_loss(maps, {"attend_and_excite": 1.0, "segregation": 2.0, "retention": 0.0})
    assert set(terms) == {"attend_and_excite", "segregation"}
    assert total.item() == pytest.approx(terms["attend_and_excite"].item() + 2 * terms["segregation"].item())
    single = maps[:, :1]
    total, terms = L.combined_loss(single, {"segregation": 1.0})
    assert terms == {} and total.item() == 0.0


def test_text_attention_variants():
    aggregated = torch.rand(1, 4, 77)
    segment = subjects_mod.clip_segments(77, [6])[0]
    default = L.text_attention(aggregated, 0, 77, segment.softmax_range(False))
    assert default[:, :, 0].abs().sum() == 0 and default[:, :, 76].abs().sum() == 0
    assert torch.allclose(default.sum(-1), torch.ones(1, 4))
    sd2 = L.text_attention(aggregated, 0, 77, segment.softmax_range(True))
    assert sd2[:, :, 6:].abs().sum() == 0
    assert torch.allclose(sd2.sum(-1), torch.ones(1, 4))
    expected = torch.softmax(aggregated[:, :, 1:6] * 100, dim=-1)
    assert torch.allclose(sd2[:, :, 1:6], expected)


def test_group_maps_across_segments_average_the_views():
    """A group with positions in two segments (SD3: a word's CLIP and T5 tokens) is the mean of its per-segment
    maps, each segment re-normalised over its own kept range (T5: the pieces only, no </s>, no padding)."""
    segments = (subjects_mod.TextSegment("clip", 0, 77, 5, (1, 76)), subjects_mod.TextSegment("t5", 77, 10, 4, (0, 4)))
    subject = subjects_mod.Subject("cat", (2, 77 + 1, 77 + 2), 0)
    subjects = subjects_mod.Subjects((subject,), "a cat", 77, (5,), segments=segments)
    assert subjects.num_tokens == 87 and subjects.segment_of(80) == 1
    aggregated = torch.rand(2, 16, 87)
    maps = L.token_group_maps(aggregated, subjects, [subject.token_positions], (4, 4))
    clip = torch.softmax(aggregated[:, :, 1:76] * 100, dim=-1)[:, :, 1]
    t5 = torch.softmax(aggregated[:, :, 77:81] * 100, dim=-1)[:, :, 1:3].mean(-1)
    assert torch.allclose(maps.reshape(2, 16), (clip + t5) / 2, atol=1e-6)
    assert subjects.other_positions() == [1, 3, 4, 77, 80]


# ---------------------------------------------------------------- attribute binding

def _attribute_descends(loss_fn, maps, attribute_maps, **kwargs):
    """(before, after) for a small step along -grad w.r.t. the attribute maps only."""
    attribute_maps = attribute_maps.clone().requires_grad_(True)
    before = loss_fn(maps, attribute_maps=attribute_maps, **kwargs).sum()
    (grad,) = torch.autograd.grad(before, [attribute_maps])
    stepped = (attribute_maps - 0.05 * grad / grad.abs().max()).detach()
    return before.item(), loss_fn(maps, attribute_maps=stepped, **kwargs).sum().item()


def _drift(start, end, steps=7):
    """Blob centres from start to end, in equal steps."""
    return [(start[0] + (end[0] - start[0]) * t / (steps - 1), start[1] + (end[1] - start[1]) * t / (steps - 1))
            for t in range(steps)]


NOUNS = torch.stack([_blob((4, 4)), _blob((11, 11))])[None]  # two nouns, far apart
NO_OTHERS = torch.zeros(1, 0, 16, 16)


def _binding_losses():
    """Each attribute-binding loss as f(maps, attribute_maps=..., attribute_owner=...); SynGen with O = 0."""
    return {
        "divide_and_bind_binding": L.divide_and_bind_binding_loss,
        "syngen": lambda maps, **kw: L.syngen_loss(maps, other_maps=maps[:, :0], **kw),
        "conform": L.conform_loss,
    }


def test_jensen_shannon_and_symmetric_kl_by_hand():
    p = torch.tensor([0.5, 0.5, 0.0, 0.0])
    q = torch.tensor([0.5, 0.0, 0.5, 0.0])
    # M = (.5, .25, .25, 0): KL(P||M) = .5 ln(.5/.5) + .5 ln(.5/.25) = .5 ln 2, and the same for Q
    assert L.jensen_shannon_divergence(p, q).item() == pytest.approx(0.5 * math.log(2), abs=1e-6)
    assert L.jensen_shannon_divergence(p, p).item() == pytest.approx(0.0, abs=1e-7)
    assert L.jensen_shannon_divergence(p, torch.tensor([0.0, 0.0, 0.5, 0.5])).item() == pytest.approx(math.log(2))
    a = torch.tensor([3.0, 1.0, 1.0, 3.0]) / 8
    u = torch.full((4,), 0.25)
    # KL(a||u) = .75 ln 1.5 - .25 ln 2, KL(u||a) = -.5 ln 1.5 + .5 ln 2: the sum is .25 ln 3, SynGen's dist its half
    assert L.symmetric_kl(a, u).item() == pytest.approx(0.125 * math.log(3), abs=1e-6)
    assert L.symmetric_kl(a, 1 / 2 - a).item() == pytest.approx(0.5 * math.log(3), abs=1e-6)  # (1,3,3,1)/8: .5 ln 3 each way


def _divide_and_bind_reference(noun: np.ndarray, attribute: np.ndarray) -> float:
    """D&B's binding JSD of one pair of (already smoothed) maps [H, W], step by step in float64 loops."""
    height, width = noun.shape
    horizontal = sum(abs(noun[i, j + 1] - noun[i, j]) for i in range(height) for j in range(width - 1))
    vertical = sum(abs(noun[height - 1, j] - noun[i, j]) for i in range(1, height) for j in range(width))
    tv = horizontal / (height * (width - 1)) + vertical / ((height - 1) * width)
    quantile = 0.3 if tv < 0.1 else 0.2
    scaled = attribute * noun.max() / attribute.max()
    p = np.exp(noun.ravel()) / np.exp(noun.ravel()).sum()
    q = np.exp(scaled.ravel()) / np.exp(scaled.ravel()).sum()
    cut = quantile * p.max()
    p, q = np.maximum(p - cut, 0) + 1e-5, np.maximum(q - cut, 0) + 1e-5
    m = (p + q) / 2
    return float(0.5 * (p * np.log(p / m)).sum() + 0.5 * (q * np.log(q / m)).sum())


def test_divide_and_bind_binding_by_hand():
    unsmoothed = dict(smoothing_sigma=0.05)  # the reference kernel at sigma 0.05 is the identity to fp32
    noun = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    attribute = torch.tensor([[0.0, 0.0], [0.0, 0.5]])
    assert torch.allclose(L.smooth(noun[None, None], sigma=0.05)[0, 0], noun)
    # C' = C * 1 / .5 = [[0, 0], [0, 1]]; with s = e + 3: P_n = (e, 1, 1, 1) / s, P_a = (1, 1, 1, e) / s.
    # TV(N) = mean(|0 - 1|, 0) + mean(|0 - 0|, |0 - 0|) = .5 >= .1: q = .2, tau = .2 e / s, below every value.
    # p_n = (x, y, y, y), p_a = (y, y, y, x) with x = .8 e / s + 1e-5, y = (1 - .2 e) / s + 1e-5: the two
    # equal pixels add nothing, the other two give x ln(2x / (x + y)) + y ln(2y / (x + y)).
    s = math.e + 3
    x, y = 0.8 * math.e / s + 1e-5, (1 - 0.2 * math.e) / s + 1e-5
    expected = x * math.log(2 * x / (x + y)) + y * math.log(2 * y / (x + y))
    got = L.divide_and_bind_binding_loss(noun[None, None], attribute[None, None], (0,), **unsmoothed).item()
    assert got == pytest.approx(expected, rel=1e-4)
    assert got == pytest.approx(_divide_and_bind_reference(noun.numpy(), attribute.numpy()), rel=1e-4)
    # the attribute's scale does not matter (its peak is matched to the noun's); identical maps give 0
    assert L.divide_and_bind_binding_loss(noun[None, None], 7 * attribute[None, None], (0,),
                                          **unsmoothed).item() == pytest.approx(expected, rel=1e-4)
    assert L.divide_and_bind_binding_loss(noun[None, None], noun[None, None], (0,), **unsmoothed).item() \
        == pytest.approx(0.0, abs=1e-7)
    assert L.divide_and_bind_binding_loss(noun[None, None], torch.zeros(1, 0, 2, 2), ()).item() == 0.0


def test_divide_and_bind_binding_matches_a_step_by_step_reference():
    """Random maps, both of TV's branches (q = .2 for a structured noun, .3 for a flat one), pairs summed."""
    generator = torch.Generator().manual_seed(3)
    structured = torch.rand(2, 6, 6, generator=generator)
    flat = 0.5 + 0.02 * torch.rand(6, 6, generator=generator)
    attributes = torch.rand(3, 6, 6, generator=generator)
    nouns = torch.stack([structured[0], flat, structured[1]])[None]
    references = [_divide_and_bind_reference(nouns[0, s].double().numpy(), attributes[a].double().numpy())
                  for a, s in enumerate((0, 1, 1))]
    assert L.divide_and_bind_total_variation(flat).item() < 0.1 < L.divide_and_bind_total_variation(structured[0])
    got = L.divide_and_bind_binding_loss(nouns, attributes[None], (0, 1, 1), smoothing_sigma=0.05)
    assert got.item() == pytest.approx(sum(references), rel=1e-4)
    # the code's TV compares the last row with every row: a bright first row over 7 dark ones is 0 for it (q = .3),
    # where neighbouring rows would give 1/7 (q = .2)
    top_row = torch.zeros(8, 8)
    top_row[0] = 1.0
    assert L.divide_and_bind_total_variation(top_row).item() == 0.0
    assert L.divide_and_bind_total_variation(top_row.T).item() == pytest.approx(1 / 7)  # across: neighbours
    attribute = torch.rand(8, 8, generator=generator)
    assert L.divide_and_bind_binding_loss(top_row[None, None], attribute[None, None], (0,),
                                          smoothing_sigma=0.05).item() == pytest.approx(
        _divide_and_bind_reference(top_row.double().numpy(), attribute.double().numpy()), rel=1e-4)
    # smoothed (the default): the reference on the smoothed maps
    smoothed_nouns, smoothed_attributes = L.smooth(nouns)[0].double().numpy(), L.smooth(attributes).double().numpy()
    assert L.divide_and_bind_binding_loss(nouns, attributes[None], (0, 1, 1)).item() == pytest.approx(
        sum(_divide_and_bind_reference(smoothed_nouns[s], smoothed_attributes[a]) for a, s in enumerate((0, 1, 1))),
        rel=1e-4)


def test_divide_and_bind_binding_is_accurate_for_nearly_bound_maps():
    """An attribute almost on its noun: a JSD of about 1e-7, which float32 logs (p log p - p log m) get 3% wrong."""
    generator = torch.Generator().manual_seed(7)
    noun = torch.rand(16, 16, generator=generator)
    attribute = noun + 0.003 * torch.rand(16, 16, generator=generator)
    expected = _divide_and_bind_reference(noun.double().numpy(), attribute.double().numpy())
    assert 1e-8 < expected < 1e-6
    got = L.divide_and_bind_binding_loss(noun[None, None], attribute[None, None], (0,), smoothing_sigma=0.05)
    assert got.item() == pytest.approx(expected, rel=1e-3)


def test_divide_and_bind_binding_coefficient_schedule():
    """The code's coefficient by step i of 50: 1 (i < 10), 5 (i < 20), 10; by progress i / 50 here."""
    noun, attribute = _blob((4, 4))[None, None], _blob((9, 9))[None, None]
    base = L.divide_and_bind_binding_loss(noun, attribute, (0,)).item()
    assert base > 0
    for step, coefficient in [(0, 1), (9, 1), (10, 5), (19, 5), (20, 10), (24, 10)]:
        got = L.divide_and_bind_binding_loss(noun, attribute, (0,), progress=step / 50).item()
        assert got == pytest.approx(coefficient * base, rel=1e-6), step
    total, terms = L.combined_loss(noun, {"divide_and_bind_binding": 1.0}, attribute_maps=attribute,
                                   attribute_owner=(0,), progress=0.5)
    assert terms["divide_and_bind_binding"].item() == pytest.approx(10 * base, rel=1e-6)


def _symmetric_kl_reference(p: np.ndarray, q: np.ndarray) -> float:
    p, q = p.ravel() / p.sum(), q.ravel() / q.sum()
    return float(0.5 * (p * np.log(p / q)).sum() + 0.5 * (q * np.log(q / p)).sum())


def test_syngen_by_hand():
    a = torch.tensor([[3.0, 1.0], [1.0, 3.0]])
    n = torch.ones(2, 2)
    o = a.flip(1)  # [[1, 3], [3, 1]]
    # dist = the mean of the two KLs: dist(a, n) = dist(n, o) = 1/8 ln 3, dist(a, o) = 1/2 ln 3.
    # One group {a, n}, U = {o}: L_pos = 1/8 ln 3; L_neg = -1/1 * 1/2 (1/2 ln 3 + 1/8 ln 3) = -5/16 ln 3
    loss = L.syngen_loss(n[None, None], a[None, None], (0,), o[None, None]).item()
    assert loss == pytest.approx((1 / 8 - 5 / 16) * math.log(3), abs=1e-5)
    # no unrelated token: only L_pos
    assert L.syngen_loss(n[None, None], a[None, None], (0,), None).item() == pytest.approx(math.log(3) / 8, abs=1e-6)
    # o as a second noun without modifiers: the same U, and a group with no pair adds nothing
    assert L.syngen_loss(torch.stack([n, o])[None], a[None, None], (0,), None).item() == pytest.approx(loss, abs=1e-6)
    # two groups, each with its own U: the other noun's modifier is unrelated, the noun's own is not.
    # group 0 (a, n), U = {o, o}: 1/8 - 1/2 (1/2 + 1/8) = -3/16; group 1 (o, o), U = {n, a}: 0 - 1/2 * 2 * 5/16
    maps, attrs = torch.stack([n, o])[None], torch.stack([a, o])[None]
    assert L.syngen_loss(maps, attrs, (0, 1), None).item() == pytest.approx(-0.5 * math.log(3), abs=1e-5)


def test_syngen_takes_the_farthest_pieces_of_a_word():
    """SynGen's code on words of several wordpieces: the max of dist over their pieces' pairs; U token by token."""
    generator = torch.Generator().manual_seed(5)
    raw = torch.rand(1, 6, 4, 4, generator=generator) + 0.05
    # rows: noun 0 = pieces 0, 1; its modifier = piece 2; noun 1 = piece 3 (no modifier); other tokens 4, 5
    pieces = L.TokenPieceMaps(raw, nouns=((0, 1), (3,)), attributes=((2,),), others=(4, 5))
    r = raw[0].double().numpy()
    dist = _symmetric_kl_reference
    pull = max(dist(r[2], r[0]), dist(r[2], r[1]))
    unrelated = (3, 4, 5)
    modifier_push = sum(dist(r[2], r[u]) for u in unrelated) / 3
    noun_push = sum(max(dist(r[0], r[u]), dist(r[1], r[u])) for u in unrelated) / 3
    expected = pull - 0.5 * (modifier_push + noun_push)
    maps = torch.zeros(1, 2, 4, 4)  # the processed maps: SynGen does not read them when the raw ones are given
    got = L.syngen_loss(maps, torch.zeros(1, 1, 4, 4), (0,), token_piece_maps=pieces)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # the maps' scale does not matter: each is normalised over the pixels
    scaled = L.TokenPieceMaps(raw * torch.tensor([1.0, 3.0, 0.1, 2.0, 5.0, 0.5]).view(1, 6, 1, 1), pieces.nouns,
                              pieces.attributes, pieces.others)
    assert L.syngen_loss(maps, torch.zeros(1, 1, 4, 4), (0,), token_piece_maps=scaled).item() == pytest.approx(
        expected, rel=1e-5)


def test_binding_context_gives_syngen_the_raw_token_maps():
    """token_piece_maps: each noun's, attribute's and other token's own column of the captured attention, as is."""
    segment = subjects_mod.clip_segments(77, [7])[0]
    attribute = subjects_mod.Subject("red", (2,), 0)
    subjects = subjects_mod.Subjects((subjects_mod.Subject("red car", (3, 4), 0, (attribute,)),
                                      subjects_mod.Subject("bench", (6,), 0)), "a red sportscar and bench", 77, (7,))
    assert subjects.segments == (segment,) and subjects.other_positions() == [1, 5]
    aggregated = torch.rand(2, 9, 77)
    context = L.binding_context(aggregated, subjects, (3, 3))
    pieces = context["token_piece_maps"]
    rows = {p: r for r, p in enumerate([3, 4, 6, 2, 1, 5])}
    assert (pieces.nouns, pieces.attributes, pieces.others) == (((0, 1), (2,)), ((3,),), (4, 5))
    for position, row in rows.items():
        assert torch.equal(pieces.maps[:, row], aggregated[:, :, position].reshape(2, 3, 3))
    # the loss reads them: as computed from those raw maps, word by word
    raw = {p: aggregated[0, :, p].double().numpy() for p in rows}
    dist = _symmetric_kl_reference
    pull = max(dist(raw[2], raw[3]), dist(raw[2], raw[4]))
    unrelated = (6, 1, 5)
    expected = pull - 0.5 * (sum(dist(raw[2], raw[u]) for u in unrelated) / 3
                             + sum(max(dist(raw[3], raw[u]), dist(raw[4], raw[u])) for u in unrelated) / 3)
    maps = L.subject_attention_maps(aggregated, subjects, (3, 3))
    assert L.syngen_loss(maps, **context)[0].item() == pytest.approx(expected, rel=1e-5)


def test_syngen_identical_pair_is_zero_without_others():
    noun = _blob((6, 6))[None, None]
    assert L.syngen_loss(noun, noun.clone(), (0,), NO_OTHERS).item() == pytest.approx(0.0, abs=1e-6)


def test_conform_by_hand():
    n1 = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    a1 = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    n2 = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    # cos(a1, n1) = 1/sqrt 2, cos(a1, n2) = 1/2, cos(n1, n2) = 0; tau = .5. Anchors a1 and n1 (n2 has no positive):
    # l(a1 -> n1) = ln(1 + e^{(.5 - 1/sqrt 2)/.5}), l(n1 -> a1) = ln(1 + e^{(0 - 1/sqrt 2)/.5}); the mean of the two
    expected = 0.5 * (math.log(1 + math.exp(1 - math.sqrt(2))) + math.log(1 + math.exp(-math.sqrt(2))))
    loss = L.conform_loss(torch.stack([n1, n2])[None], a1[None, None], (0,), smoothing_sigma=0.05)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    # the minimum for non-negative maps: positives identical, negatives disjoint: ln(1 + |N| e^{-1/tau})
    square, far = _square(0, 0), _square(9, 9)
    best = L.conform_loss(torch.stack([square, far])[None], square[None, None], (0,))
    assert best.item() == pytest.approx(math.log(1 + math.exp(-2.0)), abs=1e-5)
    # without a second group or without a pair it is 0 (as CONFORM's code)
    assert L.conform_loss(square[None, None], square[None, None], (0,)).item() == 0.0
    assert L.conform_loss(torch.stack([square, far])[None], torch.zeros(1, 0, 16, 16), ()).item() == 0.0


def _nt_xent_by_loop(embeddings, labels, tau=0.5):
    """NT-Xent as pytorch-metric-learning defines it, pair by pair: the mean over positive pairs (i, j), i != j,
    of -log(e^{s_ij/tau} / (e^{s_ij/tau} + sum over k of another class e^{s_ik/tau}))."""
    e = torch.nn.functional.normalize(embeddings.double(), dim=-1)
    s = e @ e.T / tau
    pairs = []
    for i in range(len(labels)):
        for j in range(len(labels)):
            if i != j and labels[i] == labels[j]:
                negatives = [s[i, k].exp() for k in range(len(labels)) if labels[k] != labels[i]]
                pairs.append(-torch.log(s[i, j].exp() / (s[i, j].exp() + sum(negatives))))
    return torch.stack(pairs).mean()


def test_conform_adds_the_previous_steps_maps_to_their_groups():
    """CONFORM's add_previous_attention_maps: each token's previous map is one more member of its group."""
    generator = torch.Generator().manual_seed(0)
    nouns, attributes = torch.rand(1, 2, 6, 6, generator=generator), torch.rand(1, 2, 6, 6, generator=generator)
    previous = (torch.rand(1, 2, 6, 6, generator=generator), torch.rand(1, 2, 6, 6, generator=generator))
    got = L.conform_loss(nouns, attributes, (0, 1), previous_token_maps=previous)
    smoothed = L.smooth(torch.cat([nouns, attributes, *previous], dim=1)).flatten(2)[0]
    assert got.item() == pytest.approx(_nt_xent_by_loop(smoothed, [0, 1, 0, 1] * 2).item(), abs=1e-6)
    alone = L.conform_loss(nouns, attributes, (0, 1))
    assert alone.item() == pytest.approx(_nt_xent_by_loop(smoothed[:4], [0, 1, 0, 1]).item(), abs=1e-6)
    assert abs(got.item() - alone.item()) > 1e-3
    # previous maps of another grid (or token set) do not take part
    assert L.conform_loss(nouns, attributes, (0, 1), previous_token_maps=(previous[0][:, :1], previous[1])).item() \
        == pytest.approx(alone.item())


@pytest.mark.parametrize("name, margin", [("divide_and_bind_binding", 0.03), ("syngen", 5.0), ("conform", 0.5)])
def test_binding_identical_is_lower_than_disjoint(name, margin):
    """margin: what the loss gains here, by its scale (D&B's JSD of two near-uniform pixel softmaxes is small)."""
    loss = _binding_losses()[name]
    bound = NOUNS[:, :1].clone()  # the attribute of noun 0, where noun 0 is
    wrong = NOUNS[:, 1:].clone()  # ... where noun 1 is
    identical = loss(NOUNS, attribute_maps=bound, attribute_owner=(0,)).item()
    disjoint = loss(NOUNS, attribute_maps=wrong, attribute_owner=(0,)).item()
    assert disjoint > identical + margin


@pytest.mark.parametrize("name", ["divide_and_bind_binding", "syngen", "conform"])
def test_binding_rises_as_the_attribute_drifts_to_the_wrong_noun(name):
    loss = _binding_losses()[name]
    values = [loss(NOUNS, attribute_maps=_blob(c)[None, None], attribute_owner=(0,)).item()
              for c in _drift((4, 4), (11, 11))]
    assert all(b > a for a, b in zip(values, values[1:])), values


@pytest.mark.parametrize("name", ["divide_and_bind_binding", "syngen", "conform"])
def test_binding_gradient_step_lowers_the_loss(name):
    loss = _binding_losses()[name]
    attribute = _blob((8, 8))[None, None]  # halfway between its noun (0) and the other
    before, after = _attribute_descends(loss, NOUNS, attribute, attribute_owner=(0,))
    assert after < before
    two = torch.stack([_blob((6, 9)), _blob((9, 6))])[None]  # one attribute per noun, each off its noun
    before, after = _attribute_descends(loss, NOUNS, two, attribute_owner=(0, 1))
    assert after < before


@pytest.mark.parametrize("name", ["divide_and_bind_binding", "syngen", "conform"])
def test_binding_batch_independence(name):
    loss = _binding_losses()[name]
    maps = torch.cat([NOUNS, NOUNS.flip(1) * 0.5])
    attributes = torch.stack([_blob((5, 5)), _blob((10, 4))])[:, None].clone().requires_grad_(True)
    batched = loss(maps, attribute_maps=attributes, attribute_owner=(0,))
    assert batched.shape == (2,)
    for i in range(2):
        alone = loss(maps[i:i + 1], attribute_maps=attributes[i:i + 1].detach(), attribute_owner=(0,))
        assert batched[i].item() == pytest.approx(alone.item(), rel=1e-5, abs=1e-6)
    (grad,) = torch.autograd.grad(batched[0], [attributes])
    assert grad[1].abs().sum() == 0 and grad[0].abs().sum() > 0


def test_syngen_negative_term_pushes_off_other_tokens():
    noun = _blob((4, 4))[None, None]
    attribute = noun.clone()
    near, far = _blob((6, 6))[None, None], _blob((12, 12))[None, None]
    # with the pair bound, an unrelated token far away gives a lower loss than one nearby
    assert (L.syngen_loss(noun, attribute, (0,), far).item() < L.syngen_loss(noun, attribute, (0,), near).item() < 0)


def test_combined_loss_passes_context_and_skips_without_attributes():
    attributes = _blob((6, 6))[None, None]
    weights = {"attend_and_excite": 1.0, "divide_and_bind_binding": 1.0, "syngen": 1.0, "conform": 1.0}
    context = dict(attribute_maps=attributes, attribute_owner=(0,), other_maps=NO_OTHERS)
    total, terms = L.combined_loss(NOUNS, weights, None, 0.5, **context)
    assert set(terms) == set(weights)
    assert terms["divide_and_bind_binding"].item() == pytest.approx(
        L.divide_and_bind_binding_loss(NOUNS, attributes, (0,)).item())
    assert terms["syngen"].item() == pytest.approx(L.syngen_loss(NOUNS, attributes, (0,), NO_OTHERS).item())
    assert terms["conform"].item() == pytest.approx(L.conform_loss(NOUNS, attributes, (0,)).item())
    assert total.item() == pytest.approx(sum(t.item() for t in terms.values()), rel=1e-6)
    # A = 0 (and no attribute context at all): the attribute losses are skipped
    empty = dict(attribute_maps=torch.zeros(1, 0, 16, 16), attribute_owner=(), other_maps=NO_OTHERS)
    for ctx in (empty, {}):
        total, terms = L.combined_loss(NOUNS, weights, None, 0.5, **ctx)
        assert set(terms) == {"attend_and_excite"}
    # CONFORM needs two nouns (two groups); the others run with one
    _, terms = L.combined_loss(NOUNS[:, :1], weights, None, 0.5, **context)
    assert set(terms) == {"attend_and_excite", "divide_and_bind_binding", "syngen"}
    assert all(L.LOSSES[n].needs_attributes for n in ("divide_and_bind_binding", "syngen", "conform"))
    assert not any(L.LOSSES[n].needs_attributes for n in ("attend_and_excite", "segregation", "retention",
                                                          "attendance"))


def test_attribute_owner_is_checked():
    with pytest.raises(ValueError):
        L.divide_and_bind_binding_loss(NOUNS, _blob((6, 6))[None, None], (0, 1))
    with pytest.raises(ValueError):
        L.syngen_loss(NOUNS, _blob((6, 6))[None, None], (2,), NO_OTHERS)


# ---------------------------------------------------------------- Otsu

def _otsu_brute_force(values: np.ndarray) -> float:
    """Every distinct value t but the smallest as the cut {v >= t}: the t of the largest between-class variance."""
    values = np.asarray(values, dtype=np.float64)
    best, best_t = -1.0, float(values.min())
    for t in np.unique(values)[1:]:
        upper, lower = values[values >= t], values[values < t]
        w1 = upper.size / values.size
        variance = w1 * (1 - w1) * (upper.mean() - lower.mean()) ** 2
        if variance > best:
            best, best_t = variance, float(t)
    return best_t


def test_otsu_threshold_matches_brute_force():
    generator = torch.Generator().manual_seed(0)
    rows = [torch.rand(256, generator=generator),
            torch.cat([0.2 + 0.05 * torch.randn(100, generator=generator),
                       0.7 + 0.1 * torch.randn(156, generator=generator)]),
            (torch.rand(200, generator=generator) * 8).round() / 8,  # many ties
            torch.rand(300, generator=generator) ** 4]
    for row in rows:
        assert L.otsu_threshold(row).item() == pytest.approx(_otsu_brute_force(row.numpy()), abs=0)
    batched = L.otsu_threshold(torch.stack([rows[0], rows[1][:256]]))
    assert batched.shape == (2,)
    assert batched[1].item() == _otsu_brute_force(rows[1][:256].numpy())
    assert L.otsu_threshold(torch.full((10,), 0.3)).item() == pytest.approx(0.3)  # no split: everything is upper


def test_otsu_retention_mask_bimodal_and_independent():
    generator = torch.Generator().manual_seed(1)
    bimodal = 0.1 + 0.02 * torch.rand(16, 16, generator=generator)
    bimodal[3:9, 4:12] = 0.8 + 0.02 * torch.rand(6, 8, generator=generator)
    threshold = L.otsu_threshold(bimodal.flatten()).item()
    assert 0.12 < threshold <= bimodal[3:9, 4:12].min().item()  # in the gap: the upper class is the square
    maps = torch.stack([bimodal, _blob((5, 10)), _blob((11, 4), radius=2.0) + 0.3 * _blob((4, 4))])[None]
    masks = L.retention_mask(maps, method="otsu")
    smoothed = L.smooth(maps)
    for s in range(maps.shape[1]):
        t = _otsu_brute_force(smoothed[0, s].flatten().numpy())
        assert torch.equal(masks[0, s], (smoothed[0, s] >= t).float())
    # unsmoothed bimodal: the mask is the square
    exact = L.retention_mask(bimodal[None, None], smoothing_sigma=0.05, method="otsu")[0, 0]
    square = torch.zeros(16, 16)
    square[3:9, 4:12] = 1
    assert torch.equal(exact, square)
    # a constant map has no split: the whole map is the region, as with half_max
    assert L.retention_mask(torch.full((1, 1, 8, 8), 0.2), method="otsu").sum().item() == 64


def test_retention_mask_default_unchanged():
    maps = torch.stack([_blob((4, 4)), _blob((11, 11)) * 0.3])[None]
    smoothed = L.smooth(maps)
    expected = (smoothed >= 0.5 * smoothed.flatten(2).max(-1).values[..., None, None]).float()
    assert torch.equal(L.retention_mask(maps), expected)
    assert torch.equal(L.retention_mask(maps, 0.5, 0.5, "half_max"), expected)
    with pytest.raises(ValueError):
        L.retention_mask(maps, method="mean")
