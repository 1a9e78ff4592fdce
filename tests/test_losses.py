"""The losses on hand-made maps where the answer is known, and their gradients."""
import math

import pytest
import torch
from harness import pack_module

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
    default = L.text_attention(aggregated, 0, end_position=6, chunk_length=77)
    assert default[:, :, 0].abs().sum() == 0 and default[:, :, 76].abs().sum() == 0
    assert torch.allclose(default.sum(-1), torch.ones(1, 4))
    sd2 = L.text_attention(aggregated, 0, end_position=6, chunk_length=77, exclude_padding=True)
    assert sd2[:, :, 6:].abs().sum() == 0
    assert torch.allclose(sd2.sum(-1), torch.ones(1, 4))
    expected = torch.softmax(aggregated[:, :, 1:6] * 100, dim=-1)
    assert torch.allclose(sd2[:, :, 1:6], expected)
