"""Attention losses, one pure function each, named as in the papers.

Every loss takes the subjects' processed maps A: [B, S, H, W] (fp32; B images, S subjects) and
returns a per-image loss [B]. The guidance minimises the weighted sum of the selected losses.
Adding a loss is adding a function and one `LOSSES` entry; the sampler needs no change.

The attribute-binding losses also read the context `combined_loss` passes on: `attribute_maps`
[B, A, H, W] (the processed maps of the attribute token groups, processed as A), `attribute_owner`
(length A: the index s in A of each attribute's noun) and `other_maps` [B, O, H, W] (the prompt's
other content tokens; O may be 0). Every loss swallows the keys it does not use.
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


def binding_context(aggregated: torch.Tensor, subjects, resolution: tuple[int, int], temperature: float = 100.0,
                    exclude_padding: bool = False) -> dict:
    """What the binding losses read beside the nouns' maps, processed as those: attribute_maps [B, A, H, W],
    attribute_owner (the index of each attribute's noun) and other_maps [B, O, H, W] (the prompt's other
    content tokens; with exclude_padding off A&E's softmax also spans end and padding, which stay out)."""
    pairs = subjects.attributes
    attribute_maps = token_group_maps(aggregated, subjects, [a.token_positions for _i, a in pairs], resolution,
                                      temperature, exclude_padding)
    other_maps = token_group_maps(aggregated, subjects, [(p,) for p in subjects.other_positions()], resolution,
                                  temperature, exclude_padding)
    return {"attribute_maps": attribute_maps, "attribute_owner": tuple(i for i, _a in pairs), "other_maps": other_maps}


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
    """dist(P, Q) = KL(P || Q) + KL(Q || P) over the last dim (SynGen's distance between two maps)."""
    return kl_divergence(p, q) + kl_divergence(q, p)


def _attribute_owners(maps: torch.Tensor, attribute_maps: torch.Tensor, attribute_owner) -> list[int]:
    """attribute_owner as a list, checked against attribute_maps [B, A, H, W] and the S subjects of maps."""
    owners = [int(s) for s in attribute_owner]
    if len(owners) != attribute_maps.shape[1]:
        raise ValueError(f"attribute_owner names {len(owners)} nouns for {attribute_maps.shape[1]} attribute maps")
    if any(not 0 <= s < maps.shape[1] for s in owners):
        raise ValueError(f"attribute_owner {tuple(owners)} indexes outside the {maps.shape[1]} subjects")
    return owners


def divide_and_bind_binding_loss(maps: torch.Tensor, attribute_maps: torch.Tensor, attribute_owner,
                                 smoothing_sigma: float = 0.5, **_) -> torch.Tensor:
    """Divide & Bind binding (Li et al., BMVC 2023): L_bind = 1/|P| sum_{(a, n) in P} JSD(P_a || P_n).

    P: the attribute-noun pairs (a, attribute_owner[a]). P_x = G * A_x / sum_ij G * A_x: the
    Gaussian-smoothed map normalised to a distribution over pixels. JSD as `jensen_shannon_divergence`:
    0 when the attribute attends exactly where its noun does, ln 2 when the two maps are disjoint.
    Left open, chosen here: the maps are smoothed first, as for the attendance term (the pack's
    processed map G * A; smoothing_sigma -> 0 gives the unsmoothed maps); the pairs are averaged, not
    summed, so the term stays in [0, ln 2] whatever the number of attributes and its weight need not
    change with the prompt (the attendance term it is paired with is a min over subjects, also
    independent of their number).
    """
    owners = _attribute_owners(maps, attribute_maps, attribute_owner)
    if not owners:
        return maps.new_zeros(maps.shape[0])
    attributes = spatial_distribution(smooth(attribute_maps, sigma=smoothing_sigma))
    nouns = spatial_distribution(smooth(maps, sigma=smoothing_sigma))[:, owners]
    return jensen_shannon_divergence(attributes, nouns).mean(dim=1)


def syngen_loss(maps: torch.Tensor, attribute_maps: torch.Tensor, attribute_owner,
                other_maps: torch.Tensor | None = None, **_) -> torch.Tensor:
    """SynGen (Rassin et al., NeurIPS 2023): L = L_pos + L_neg, over the groups S_i (a noun n_i and its modifiers).

        L_pos = sum_i sum_{(m, n_i) in P(S_i)} dist(A_m, A_n_i)
        L_neg = - sum_i 1/|U(S_i)| sum_{(m, n_i) in P(S_i)} sum_{u in U(S_i)} 1/2 [dist(A_m, A_u) + dist(A_n_i, A_u)]

    dist = `symmetric_kl`; every map normalised to a distribution over pixels (`spatial_distribution`),
    unsmoothed. P(S_i): the modifier-noun pairs of group i (a noun without modifiers has none and adds
    nothing). U(S_i): every token outside the group: the other nouns, their modifiers, and other_maps.
    L_pos is 0 when each modifier's map equals its noun's; L_neg rewards both maps of a pair for
    staying off the unrelated tokens' maps, so L is negative there, not 0 (bounded below only through
    the log floor). With U(S_i) empty (one noun, no other tokens) L_neg is 0.
    Fixed here: a pair is a modifier with its noun (two modifiers of one noun are no pair); the
    modifiers of the same noun belong to the group, not to U (pushing them apart would fight the
    binding); the sums over groups and pairs are plain sums and L_pos, L_neg weigh 1 each, as written.
    """
    owners = _attribute_owners(maps, attribute_maps, attribute_owner)
    nouns = spatial_distribution(maps)
    modifiers = spatial_distribution(attribute_maps)
    others = spatial_distribution(other_maps) if other_maps is not None else nouns[:, :0]
    total = maps.new_zeros(maps.shape[0])
    for noun in range(maps.shape[1]):
        group = [a for a, s in enumerate(owners) if s == noun]
        if not group:
            continue
        pair_modifiers, pair_noun = modifiers[:, group], nouns[:, noun:noun + 1]  # [B, M, N], [B, 1, N]
        total = total + symmetric_kl(pair_modifiers, pair_noun).sum(dim=1)
        unrelated = torch.cat([nouns[:, [s for s in range(maps.shape[1]) if s != noun]],
                               modifiers[:, [a for a, s in enumerate(owners) if s != noun]], others], dim=1)
        if unrelated.shape[1]:
            to_modifier = symmetric_kl(pair_modifiers[:, :, None], unrelated[:, None])  # [B, M, U]
            to_noun = symmetric_kl(pair_noun[:, :, None], unrelated[:, None])  # [B, 1, U], the same for every pair
            total = total - (0.5 * (to_modifier + to_noun)).sum(dim=(1, 2)) / unrelated.shape[1]
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
