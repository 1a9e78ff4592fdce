"""Attention losses, one pure function each, named as in the papers.

Every loss takes the subjects' processed maps A: [B, S, H, W] (fp32; B images, S subjects) and
returns a per-image loss [B]. The guidance minimises the weighted sum of the selected losses.
Adding a loss is adding a function and one `LOSSES` entry; the sampler needs no change.

The attribute-binding losses also read the context `combined_loss` passes on (`binding_context`):
`attribute_maps` [B, A, H, W] (the processed maps of the attribute token groups, processed as A),
`attribute_owner` (length A: the index s in A of each attribute's noun), `other_maps` [B, O, H, W] (the
prompt's other content tokens; O may be 0) and `token_piece_maps` (`TokenPieceMaps`: every one of those
tokens' raw, unprocessed map, which SynGen reads). Every loss swallows the keys it does not use.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------- map processing (Attend-and-Excite)

def reference_gaussian_kernel(kernel_size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """The 2-D smoothing kernel of the Attend-and-Excite reference code, reproduced exactly.

    Quirk: the reference writes exp(-((x - mean) / (2 * sigma)) ** 2), not exp(-(x - mean)**2 / (2 sigma**2)),
    so its effective standard deviation is sigma * sqrt(2) (0.707 for the default 0.5). The
    normalisation constant cancels in the final division by the sum.
    """
    coords = torch.arange(kernel_size, dtype=torch.float32)
    mean = (kernel_size - 1) / 2
    one_d = 1 / (sigma * math.sqrt(2 * math.pi)) * torch.exp(-(((coords - mean) / (2 * sigma)) ** 2))
    kernel = one_d[:, None] * one_d[None, :]
    return kernel / kernel.sum()


def smooth(maps: torch.Tensor, kernel_size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """Gaussian smoothing with reflect padding, as the reference: [..., H, W] -> [..., H, W]."""
    shape = maps.shape
    flat = maps.reshape(-1, 1, *shape[-2:])
    pad = kernel_size // 2
    flat = F.pad(flat, (pad, pad, pad, pad), mode="reflect")
    kernel = reference_gaussian_kernel(kernel_size, sigma).to(flat)[None, None]
    return F.conv2d(flat, kernel).reshape(shape)


def text_attention(aggregated: torch.Tensor, start: int, length: int, kept: tuple[int, int],
                   temperature: float = 100.0) -> torch.Tensor:
    """Attend-and-Excite's re-weighting of one text segment: keep its positions [kept), scale, softmax over them.

    aggregated: [B, N, T]. For a CLIP chunk kept is the reference's `[:, :, 1:-1]` (start token dropped, end
    token and padding included) or 1..end-1 (the authors' SD2 variant, for SD2's '!' padding); for T5 the prompt's
    own pieces. Returns [B, N, length] with the dropped positions set to 0, so that positions index it directly.
    """
    first, stop = kept
    probs = (aggregated[:, :, start + first:start + stop].float() * temperature).softmax(dim=-1)
    out = probs.new_zeros(*probs.shape[:2], length)
    out[:, :, first:stop] = probs
    return out


def token_group_maps(aggregated: torch.Tensor, subjects, groups, resolution: tuple[int, int],
                     temperature: float = 100.0, exclude_padding: bool = False) -> torch.Tensor:
    """[B, N, T] -> [B, G, H, W]: the re-weighted map of each group of token positions, unsmoothed.

    Within a segment a group's map is the mean over its positions (a word's pieces); a group with positions in
    several segments (SD3: a word's CLIP and T5 tokens) is the mean of its per-segment maps, so that each
    encoder's view counts once and the map keeps the scale A&E's thresholds assume."""
    batch = aggregated.shape[0]
    per_segment = {}
    maps = []
    for positions in groups:
        by_segment: dict[int, list[int]] = {}
        for position in positions:
            by_segment.setdefault(subjects.segment_of(position), []).append(position)
        views = []
        for index, members in by_segment.items():
            segment = subjects.segments[index]
            if index not in per_segment:
                per_segment[index] = text_attention(aggregated, segment.start, segment.length,
                                                    segment.softmax_range(exclude_padding), temperature)
            views.append(per_segment[index][:, :, [p - segment.start for p in members]].mean(dim=-1))
        maps.append(torch.stack(views).mean(dim=0))
    if not maps:
        return aggregated.new_zeros(batch, 0, *resolution, dtype=torch.float32)
    return torch.stack(maps, dim=1).reshape(batch, len(maps), *resolution)


def subject_attention_maps(aggregated: torch.Tensor, subjects, resolution: tuple[int, int],
                           temperature: float = 100.0, exclude_padding: bool = False) -> torch.Tensor:
    """[B, N, T] -> [B, S, H, W]: each subject's (noun's) re-weighted map (mean over its word pieces), unsmoothed."""
    return token_group_maps(aggregated, subjects, [s.token_positions for s in subjects.subjects], resolution,
                            temperature, exclude_padding)


@dataclass(frozen=True)
class TokenPieceMaps:
    """The raw cross-attention map of each prompt token the binding losses compare, and whose token each is.

    maps: [B, K, H, W], the model's own attention probabilities of each token (its softmax over all the text's
    keys), averaged over heads and layers as captured: no re-weighting, no smoothing. nouns (per subject) and
    attributes (per attribute, in `Subjects.attributes` order): the rows of maps of each word's tokens (its
    CLIP BPE pieces or T5 pieces; SD3: both). others: the rows of the prompt's other content tokens, one each."""
    maps: torch.Tensor
    nouns: tuple[tuple[int, ...], ...]
    attributes: tuple[tuple[int, ...], ...]
    others: tuple[int, ...]


def binding_context(aggregated: torch.Tensor, subjects, resolution: tuple[int, int], temperature: float = 100.0,
                    exclude_padding: bool = False) -> dict:
    """What the binding losses read beside the nouns' maps: attribute_maps [B, A, H, W] (processed as the nouns'),
    attribute_owner (the index of each attribute's noun), other_maps [B, O, H, W] (the prompt's other content
    tokens, processed alike; with exclude_padding off A&E's softmax also spans end and padding, which stay out),
    and token_piece_maps (`TokenPieceMaps`: the raw map of every token of the nouns, attributes and others)."""
    pairs = subjects.attributes
    attribute_maps = token_group_maps(aggregated, subjects, [a.token_positions for _i, a in pairs], resolution,
                                      temperature, exclude_padding)
    others = subjects.other_positions()
    other_maps = token_group_maps(aggregated, subjects, [(p,) for p in others], resolution,
                                  temperature, exclude_padding)
    positions: dict[int, int] = {}  # token position -> its row in the raw maps

    def rows(token_positions) -> tuple[int, ...]:
        return tuple(positions.setdefault(p, len(positions)) for p in token_positions)
    nouns = tuple(rows(s.token_positions) for s in subjects.subjects)
    attributes = tuple(rows(a.token_positions) for _i, a in pairs)
    other_rows = rows(others)
    raw = aggregated[:, :, list(positions)].float().transpose(1, 2).reshape(aggregated.shape[0], len(positions),
                                                                            *resolution)
    return {"attribute_maps": attribute_maps, "attribute_owner": tuple(i for i, _a in pairs), "other_maps": other_maps,
            "token_piece_maps": TokenPieceMaps(raw, nouns, attributes, other_rows)}


def max_attention_per_subject(maps: torch.Tensor, kernel_size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """[B, S, H, W] -> [B, S]: the peak of each smoothed subject map."""
    return smooth(maps, kernel_size, sigma).flatten(2).max(dim=-1).values


# ---------------------------------------------------------------- losses

def attend_and_excite_loss(maps: torch.Tensor, smoothing_sigma: float = 0.5, **_) -> torch.Tensor:
    """Attend-and-Excite (Chefer et al. 2023, Eq. 1): L = max_s (1 - max_ij G * A_s), floored at 0.

    The most neglected subject decides the loss; minimising it raises that subject's peak attention.
    """
    peaks = max_attention_per_subject(maps, sigma=smoothing_sigma)
    return (1.0 - peaks).clamp(min=0.0).max(dim=1).values


def _soft_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_ij min(a, b) / sum_ij (a + b) over the last two dims."""
    return torch.minimum(a, b).flatten(-2).sum(-1) / (a + b).flatten(-2).sum(-1).clamp(min=1e-12)


def segregation_loss(maps: torch.Tensor, smoothing_sigma: float = 0.5, **_) -> torch.Tensor:
    """A-STAR segregation (Agarwal et al. 2023): L_seg = sum_{m<n} sum_ij min(A_m, A_n) / sum_ij (A_m + A_n).

    A are the smoothed subject maps. Zero when no two subjects share a pixel; 0.5 per pair when
    they coincide. Undefined for fewer than two subjects (the sampler skips it then).
    """
    smoothed = smooth(maps, sigma=smoothing_sigma)
    count = smoothed.shape[1]
    total = smoothed.new_zeros(smoothed.shape[0])
    for m in range(count):
        for n in range(m + 1, count):
            total = total + _soft_iou(smoothed[:, m], smoothed[:, n])
    return total


def otsu_threshold(values: torch.Tensor) -> torch.Tensor:
    """Otsu's threshold (Otsu 1979) of each row of values [..., N] -> [...].

    Over the sorted values v_1 <= ... <= v_N, the split after k puts v_1..v_k in the lower class and
    maximises the between-class variance
        sigma_b^2(k) = w_0 w_1 (mu_0 - mu_1)^2,  w_0 = k / N,  w_1 = 1 - w_0,
        mu_0 = mean(v_1..v_k),  mu_1 = mean(v_k+1..v_N).
    This is Otsu's criterion on the exact empirical distribution (one histogram bin per distinct value,
    so no bin count to choose); splits inside a run of equal values are not candidates, and the first
    maximum wins on ties. Returns the lowest value of the upper class, so the upper class is exactly
    {v >= threshold}. A row with a single distinct value has no split: its threshold is that value
    (every element is in the upper class).
    """
    ordered = values.sort(dim=-1).values
    count = ordered.shape[-1]
    if count < 2:
        return ordered[..., 0]
    centred = ordered - ordered.mean(dim=-1, keepdim=True)  # the variance is shift-invariant; less cancellation
    lower_sum = centred.cumsum(dim=-1)[..., :-1]  # k = 1..N-1
    total = centred.sum(dim=-1, keepdim=True)
    k = torch.arange(1, count, device=values.device, dtype=centred.dtype)
    w0 = k / count
    between = w0 * (1 - w0) * (lower_sum / k - (total - lower_sum) / (count - k)) ** 2
    valid = ordered[..., 1:] > ordered[..., :-1]
    best = between.masked_fill(~valid, -1.0).argmax(dim=-1, keepdim=True)
    threshold = ordered[..., 1:].gather(-1, best).squeeze(-1)
    return torch.where(valid.any(dim=-1), threshold, ordered[..., 0])


def retention_mask(maps: torch.Tensor, threshold: float = 0.5, smoothing_sigma: float = 0.5,
                   method: str = "half_max") -> torch.Tensor:
    """B_m: the binary high-attention region of each subject's smoothed map G * A_m. [B,S,H,W].

    method "half_max": {G * A_m >= threshold * max G * A_m} (A-STAR's mask; threshold 0.5).
    method "otsu": {G * A_m >= otsu_threshold(values of G * A_m)}, per subject map; `threshold` is unused.
    """
    smoothed = smooth(maps, sigma=smoothing_sigma).detach()
    if method == "half_max":
        cut = threshold * smoothed.flatten(2).max(dim=-1).values
    elif method == "otsu":
        cut = otsu_threshold(smoothed.flatten(2))
    else:
        raise ValueError(f"unknown retention mask method {method!r}; valid: 'half_max', 'otsu'")
    return (smoothed >= cut[..., None, None]).to(maps.dtype)


def retention_loss(maps: torch.Tensor, previous_masks: torch.Tensor | None = None, smoothing_sigma: float = 0.5,
                   **_) -> torch.Tensor:
    """A-STAR retention: L_ret = sum_m [1 - sum_ij min(A_m(t), B_m(t+1)) / sum_ij (A_m(t) + B_m(t+1))].

    B_m(t+1) is subject m's binary mask from the previous (noisier) step (`retention_mask`). Zero
    loss is not reachable (the ratio is at most 1/2); lower means the map stays inside its region.
    Without a previous mask (the first guided step) the loss is 0.
    """
    if previous_masks is None:
        return maps.new_zeros(maps.shape[0])
    smoothed = smooth(maps, sigma=smoothing_sigma)
    return (1.0 - _soft_iou(smoothed, previous_masks)).sum(dim=1)


def total_variation(maps: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation over the last two dims: sum |dA/di| + |dA/dj|."""
    return ((maps[..., 1:, :] - maps[..., :-1, :]).abs().flatten(-2).sum(-1)
            + (maps[..., :, 1:] - maps[..., :, :-1]).abs().flatten(-2).sum(-1))


def attendance_loss(maps: torch.Tensor, smoothing_sigma: float = 0.5, **_) -> torch.Tensor:
    """Divide & Bind attendance (Li et al. 2023): L_attend = -min_s TV(G * A_s).

    Total variation is high where a subject's map has strong, structured activations; maximising the
    weakest subject's TV makes every subject attended somewhere.
    """
    return -total_variation(smooth(maps, sigma=smoothing_sigma)).min(dim=1).values


# ---------------------------------------------------------------- attribute binding

_EPS = 1e-12  # floor inside the logarithms: a pixel with no mass adds nothing, and no log(0) reaches the gradient


def spatial_distribution(maps: torch.Tensor) -> torch.Tensor:
    """[..., H, W] -> [..., H*W]: each map divided by its sum, a distribution over pixels (an all-zero map stays 0)."""
    flat = maps.flatten(-2)
    return flat / flat.sum(dim=-1, keepdim=True).clamp(min=_EPS)


def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) = sum_i P_i (log P_i - log Q_i) over the last dim (logs floored at 1e-12)."""
    return (p * (p.clamp(min=_EPS).log() - q.clamp(min=_EPS).log())).sum(dim=-1)


def jensen_shannon_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """JSD(P || Q) = 1/2 KL(P || M) + 1/2 KL(Q || M), M = (P + Q) / 2. In [0, ln 2]: 0 iff P = Q, ln 2 iff disjoint."""
    middle = 0.5 * (p + q)
    return 0.5 * kl_divergence(p, middle) + 0.5 * kl_divergence(q, middle)


def symmetric_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """SynGen's distance between two maps: dist(P, Q) = 1/2 [KL(P || Q) + KL(Q || P)] over the last dim.

    The mean of the two directions, as SynGen's code (`_symmetric_kl` in compute_loss.py) takes it."""
    return 0.5 * (kl_divergence(p, q) + kl_divergence(q, p))


def _attribute_owners(maps: torch.Tensor, attribute_maps: torch.Tensor, attribute_owner) -> list[int]:
    """attribute_owner as a list, checked against attribute_maps [B, A, H, W] and the S subjects of maps."""
    owners = [int(s) for s in attribute_owner]
    if len(owners) != attribute_maps.shape[1]:
        raise ValueError(f"attribute_owner names {len(owners)} nouns for {attribute_maps.shape[1]} attribute maps")
    if any(not 0 <= s < maps.shape[1] for s in owners):
        raise ValueError(f"attribute_owner {tuple(owners)} indexes outside the {maps.shape[1]} subjects")
    return owners


_DB_FLOOR = 1e-5  # Divide & Bind's code adds it to both distributions after the cut, so no pixel is 0


def divide_and_bind_total_variation(maps: torch.Tensor) -> torch.Tensor:
    """The total variation Divide & Bind's code computes of a map [..., H, W] -> [...] (its `tv_loss`):

        TV(A) = mean_{i, j} |A[i, j+1] - A[i, j]| + mean_{i >= 1, j} |A[H-1, j] - A[i, j]|

    Means, not sums (torch's L1Loss). The second term is the code's as written (`image[-1:, :]` against
    `image[1:, :]`: the last row against each row from the second on), not the difference of neighbouring rows; it
    is kept because the binding term uses TV only to choose its cut (`divide_and_bind_binding_loss`), by thresholds
    the authors tuned on this quantity."""
    horizontal = (maps[..., :, 1:] - maps[..., :, :-1]).abs().mean(dim=(-2, -1))
    vertical = (maps[..., -1:, :] - maps[..., 1:, :]).abs().mean(dim=(-2, -1))
    return horizontal + vertical


def divide_and_bind_binding_weight(progress: float | None) -> float:
    """Divide & Bind's binding coefficient c: by the code's denoising step i of 50, 1 for i < 10, 5 for 10 <= i < 20,
    10 from 20 on; here by progress = step / steps (< 0.2: 1, < 0.4: 5, else 10). None (not known): 1."""
    if progress is None:
        return 1.0
    return 1.0 if progress < 0.2 else 5.0 if progress < 0.4 else 10.0


def divide_and_bind_binding_loss(maps: torch.Tensor, attribute_maps: torch.Tensor, attribute_owner,
                                 smoothing_sigma: float = 0.5, progress: float | None = None, **_) -> torch.Tensor:
    """Divide & Bind binding (Li et al., BMVC 2023): the Jensen-Shannon divergence between each attribute's map
    and its noun's, computed as the authors' code does.

        L_bind = c(progress) * sum_{(a, n) in P} JSD(p_n, p_a)

    P: the attribute-noun pairs (a, attribute_owner[a]). Per pair, from the smoothed maps N = G * A_n and
    C = G * A_a (the pack's processed maps: A&E's softmax over the prompt's tokens at temperature 100, then the 3x3
    Gaussian, as D&B's code processes both):
        C' = C * max N / max C                          the attribute's map brought to the noun's peak
        P_n = softmax(vec N),  P_a = softmax(vec C')    distributions over the H*W pixels (temperature 1)
        tau = q * max P_n,  q = 0.3 if TV(N) < 0.1 else 0.2   (`divide_and_bind_total_variation`; no gradient
                                                               through the choice of q)
        p_n = relu(P_n - tau) + 1e-5,  p_a = relu(P_a - tau) + 1e-5    (not renormalised; one cut, the noun's, for
                                                                        both, as the code)
        JSD(p, p') = 1/2 sum_i p_i log(p_i / m_i) + 1/2 sum_i p'_i log(p'_i / m_i),  m = (p + p') / 2
    JSD >= 0, 0 iff p_n = p_a. c(progress): `divide_and_bind_binding_weight` (1, then 5 from a fifth of the steps,
    10 from two fifths); 1 when the caller passes no progress.

    The paper gives the term as a JSD between the attribute's and the object's normalised maps; its code
    (boschresearch/Divide-and-Bind, divide_and_bind/pipeline_divide_and_bind_latest.py,
    `_compute_loss_geiven_attn_map` with loss_mode 'tv_bind'; read, not copied: this is written from the steps
    above) settles the rest: both maps smoothed, the peak matching, the softmax over pixels, the cut at q max P_n
    with q chosen by TV, the 1e-5 floor, the unnormalised JSD and the coefficient schedule.
    Where this differs from that code:
    - its attribute map comes from the 64x64 and 32x32 cross-attention layers, nearest-downsampled to 16x16 and
      averaged (`aggregate_attention_intermediate`); here both maps come from the captured layers.
    - it adds c * JSD_n to noun n's attendance term inside the max over nouns, L = max_n [-TV_n + c JSD_n] (one
      attribute per noun). Here binding is a loss of its own, added to `attendance_loss` by the weights, and the
      pairs are summed, each with the code's c. The two agree for a single noun with its attribute.
    """
    owners = _attribute_owners(maps, attribute_maps, attribute_owner)
    if not owners:
        return maps.new_zeros(maps.shape[0])
    nouns = smooth(maps, sigma=smoothing_sigma)[:, owners]  # [B, P, H, W], pair p's noun
    attributes = smooth(attribute_maps, sigma=smoothing_sigma)  # [B, P, H, W]
    peak = nouns.amax(dim=(-2, -1), keepdim=True)
    attributes = attributes / attributes.amax(dim=(-2, -1), keepdim=True).clamp(min=_EPS) * peak
    noun_dist, attribute_dist = nouns.flatten(2).softmax(dim=-1), attributes.flatten(2).softmax(dim=-1)
    quantile = torch.where(divide_and_bind_total_variation(nouns.detach()) < 0.1, 0.3, 0.2)[..., None]
    cut = quantile * noun_dist.amax(dim=-1, keepdim=True)
    noun_dist = F.relu(noun_dist - cut) + _DB_FLOOR
    attribute_dist = F.relu(attribute_dist - cut) + _DB_FLOOR
    # JSD = 1/2 sum [p log(2p / s) + p' log(2p' / s)] = 1/4 sum s [2 d atanh(d) + log(1 - d^2)], s = p + p',
    # d = (p - p') / s: the same sum without the first-order terms that cancel between p and p' (computed as
    # p log p - p log m, near-equal maps lose the result to float32 rounding of the logs); |d| < 1 by the floor
    total = noun_dist + attribute_dist
    relative = (noun_dist - attribute_dist) / total
    divergence = 0.25 * (total * (2 * relative * torch.atanh(relative)
                                  + torch.log1p(-relative ** 2))).sum(dim=-1)
    return divide_and_bind_binding_weight(progress) * divergence.sum(dim=1)


def _one_token_per_word(maps: torch.Tensor, attribute_maps: torch.Tensor,
                        other_maps: torch.Tensor | None) -> TokenPieceMaps:
    """The given maps as SynGen's raw token maps, one token per noun, attribute and other token."""
    others = other_maps if other_maps is not None else maps[:, :0]
    count, attributes = maps.shape[1], attribute_maps.shape[1]
    return TokenPieceMaps(torch.cat([maps, attribute_maps, others], dim=1), tuple((s,) for s in range(count)),
                          tuple((count + a,) for a in range(attributes)),
                          tuple(range(count + attributes, count + attributes + others.shape[1])))


def syngen_loss(maps: torch.Tensor, attribute_maps: torch.Tensor, attribute_owner,
                other_maps: torch.Tensor | None = None, token_piece_maps: TokenPieceMaps | None = None,
                **_) -> torch.Tensor:
    """SynGen (Rassin et al., NeurIPS 2023): L = L_pos + L_neg over the groups S_i, a noun n_i with its modifiers M_i.

        L_pos = sum_i sum_{m in M_i} dist(m, n_i)
        L_neg = - sum_i sum_{m in M_i} 1/|U_i| sum_{u in U_i} 1/2 [dist(m, u) + dist(n_i, u)]
        dist(X, Y) = 1/2 [KL(P_X || P_Y) + KL(P_Y || P_X)]   (`symmetric_kl`)

    P_t: token t's raw cross-attention map (the model's own softmax over the text's keys, averaged over the heads of
    the captured layers: for SD1.x at 512 px the 16x16 layers, as SynGen's code), not smoothed and not re-weighted by
    A&E's softmax, divided by its sum: a distribution over pixels. A word of several tokens (CLIP BPE pieces, T5
    pieces; on SD3 its CLIP tokens and its T5 pieces) is as far from another word as its farthest pair of tokens:
    dist(x, y) = max over tokens s of x and t of y of dist(P_s, P_t). U_i: every content token of the prompt outside
    group i, one by one (articles, punctuation, the other nouns and their modifiers; not the end token, not
    padding). A noun without modifiers forms no group and adds no term; it is in the other groups' U. With U_i
    empty L_neg is 0 for that group. L_pos is 0 when every modifier's map equals its noun's, and L is negative when
    the groups also keep off the other tokens.

    The paper leaves open what its code (RoyiRa/Linguistic-Binding-in-Diffusion-Models, compute_loss.py and
    syngen_diffusion_pipeline.py; read, not copied: written from the equations above) settles: the maps are the raw
    attention (the code multiplies them by 100 and takes no softmax over tokens; torch's Categorical then normalises
    each over the pixels), dist is the mean of the two KLs, a multi-piece word takes the max over its pieces, U is
    every token between the start and end tokens outside the group, each pair's two negative halves are averaged,
    and a noun without modifiers is no group (its `include_entities` option, off by default, would add one).
    Logs are floored at 1e-12 (Categorical would give inf for a pixel of zero attention; softmax has none).

    token_piece_maps: the raw token maps (`binding_context` builds them; `TokenPieceMaps`). Without it, maps,
    attribute_maps and other_maps are taken as the raw maps of one-token words (maps made by hand).
    """
    owners = _attribute_owners(maps, attribute_maps, attribute_owner)
    tokens = token_piece_maps if token_piece_maps is not None else _one_token_per_word(maps, attribute_maps,
                                                                                        other_maps)
    distributions = spatial_distribution(tokens.maps)  # [B, K, H*W]
    total = maps.new_zeros(maps.shape[0])
    for noun, noun_rows in enumerate(tokens.nouns):
        group = [a for a, s in enumerate(owners) if s == noun]
        if not group:
            continue
        inside = set(noun_rows).union(*(tokens.attributes[a] for a in group))
        outside = [k for k in range(distributions.shape[1]) if k not in inside]
        noun_tokens = distributions[:, list(noun_rows)]  # [B, Tn, H*W]
        noun_push = None
        if outside:
            unrelated = distributions[:, outside][:, None]  # [B, 1, U, H*W]
            noun_push = symmetric_kl(noun_tokens[:, :, None], unrelated).amax(dim=1).mean(dim=1)  # [B]
        for a in group:
            modifier_tokens = distributions[:, list(tokens.attributes[a])]  # [B, Tm, H*W]
            pull = symmetric_kl(modifier_tokens[:, :, None], noun_tokens[:, None]).flatten(1).amax(dim=1)
            total = total + pull
            if noun_push is not None:
                modifier_push = symmetric_kl(modifier_tokens[:, :, None], unrelated).amax(dim=1).mean(dim=1)
                total = total - 0.5 * (modifier_push + noun_push)
    return total


def conform_loss(maps: torch.Tensor, attribute_maps: torch.Tensor, attribute_owner, temperature: float = 0.5,
                 smoothing_sigma: float = 0.5, previous_token_maps: tuple | None = None, **_) -> torch.Tensor:
    """CONFORM (Meral et al., CVPR 2024): InfoNCE over the token maps, a group = a noun and its attributes.

        L = 1/|P| sum_{(i, j) in P} -log [ exp(s_ij / tau) / (exp(s_ij / tau) + sum_{k in N(i)} exp(s_ik / tau)) ]

    s_ij = cos(vec(G * A_i), vec(G * A_j)): cosine similarity of the flattened Gaussian-smoothed maps,
    tau = temperature (0.5, CONFORM's default). P: the ordered pairs i != j in the same group; N(i):
    the tokens of every other group. A noun without attributes is a group of one: never an anchor
    (no positive), a negative for all the others. This is the NT-Xent loss of pytorch-metric-learning
    with mean reduction over positive pairs, which CONFORM's code calls on the smoothed, flattened,
    otherwise unnormalised maps (read in gemlab-vt/CONFORM, pipeline_conform.py). The minimum for
    non-negative maps is ln(1 + |N(i)| e^{-1/tau}): positives identical, negatives disjoint.
    Defined as 0 without a positive pair or with a single group (CONFORM's code returns 0 there too);
    `LOSSES` asks for two subjects and the attributes for a pair, so both exist when it runs.
    `previous_token_maps` = (maps, attribute_maps) of the previous guided step (constants): as CONFORM's
    `add_previous_attention_maps` (its default), each token's previous map joins its group as one more member,
    an anchor and a positive like the current ones (CONFORM's code appends it with the token's class before the
    NT-Xent call), so a token is also pulled towards where its group was.
    """
    owners = _attribute_owners(maps, attribute_maps, attribute_owner)
    count = maps.shape[1]
    if count < 2 or not owners:
        return maps.new_zeros(maps.shape[0])
    labels = list(range(count)) + owners
    tokens = torch.cat([maps, attribute_maps], dim=1)
    if previous_token_maps is not None:
        previous = torch.cat([previous_token_maps[0], previous_token_maps[1]], dim=1).to(tokens)
        if previous.shape == tokens.shape:  # (a changed grid or token set: the previous step does not take part)
            tokens, labels = torch.cat([tokens, previous], dim=1), labels + labels
    labels = torch.tensor(labels, device=maps.device)
    embeddings = F.normalize(smooth(tokens, sigma=smoothing_sigma).flatten(2), dim=-1)
    logits = embeddings @ embeddings.transpose(1, 2) / temperature  # [B, T, T]
    same_group = labels[:, None] == labels[None, :]
    positive = same_group & ~torch.eye(len(labels), dtype=torch.bool, device=maps.device)
    negatives = logits.masked_fill(same_group, float("-inf")).logsumexp(dim=-1, keepdim=True)  # [B, T, 1]
    pair_losses = torch.logaddexp(logits, negatives) - logits
    return pair_losses[:, positive].mean(dim=-1)


@dataclass(frozen=True)
class LossSpec:
    function: Callable[..., torch.Tensor]
    min_subjects: int = 1
    needs_previous_masks: bool = False
    needs_attributes: bool = False
    description: str = ""


LOSSES: dict[str, LossSpec] = {
    "attend_and_excite": LossSpec(attend_and_excite_loss, description="raise the weakest subject's peak attention"),
    "segregation": LossSpec(segregation_loss, min_subjects=2, description="keep subjects off each other's pixels"),
    "retention": LossSpec(retention_loss, needs_previous_masks=True, description="keep each subject in its region"),
    "attendance": LossSpec(attendance_loss, description="Divide & Bind: maximise the weakest subject's total variation"),
    "divide_and_bind_binding": LossSpec(
        divide_and_bind_binding_loss, needs_attributes=True,
        description="Divide & Bind: pull each attribute's attention onto its noun's (Jensen-Shannon)"),
    "syngen": LossSpec(
        syngen_loss, needs_attributes=True,
        description="SynGen: align each modifier's map with its noun's, push both off other tokens' (symmetric KL)"),
    "conform": LossSpec(
        conform_loss, min_subjects=2, needs_attributes=True,
        description="CONFORM: contrast the maps, each noun with its attributes against the other nouns (InfoNCE)"),
}


def _attribute_count(context: dict) -> int:
    attribute_maps = context.get("attribute_maps")
    return 0 if attribute_maps is None else attribute_maps.shape[1]


def combined_loss(maps: torch.Tensor, weights: dict[str, float], previous_masks: torch.Tensor | None = None,
                  smoothing_sigma: float = 0.5, **context) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the selected losses: ([B] total, {name: [B] term}).

    Skipped: zero weights, losses with fewer subjects than they need, and losses that need attributes
    when there are none (no `attribute_maps`, or A = 0). `context` (attribute_maps, attribute_owner,
    other_maps) is passed on to every loss.
    """
    terms = {}
    total = maps.new_zeros(maps.shape[0])
    for name, weight in weights.items():
        spec = LOSSES[name]
        if weight == 0 or maps.shape[1] < spec.min_subjects:
            continue
        if spec.needs_attributes and _attribute_count(context) == 0:
            continue
        term = spec.function(maps, previous_masks=previous_masks, smoothing_sigma=smoothing_sigma, **context)
        terms[name] = term
        total = total + weight * term
    return total, terms
