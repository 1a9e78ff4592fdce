"""InitNO (Guo et al., CVPR 2024): optimise the initial noise before sampling, so that every subject is attended
and the subjects do not compete for the same pixels, while the noise stays a standard normal sample.

The noise z is reparameterised as z' = z * exp(log_var / 2) + mu (mu, log_var start at 0) and (mu, log_var) are
optimised with Adam on the joint score of one conditional forward at the first sigma:

- response score  S_res = max_s (1 - max_ij G * A_s)   (cross-attention; Attend-and-Excite's loss, top-1)
- conflict score  S_con = mean over subject pairs of sum min(M_m, M_n) / sum (M_m + M_n), where M_s is the
  (smoothed) self-attention row of subject s's peak pixel, reshaped to the map grid. It only counts once every
  subject responds (S_res <= 0.5), as in the authors' code.
- after each step, KL(N(mu, exp(log_var)) || N(0, 1)) (mean over elements) is brought below `kl_bound` by extra
  Adam steps on it alone: the optimised noise stays close to a standard normal draw.

An optimisation succeeds when S_res < tau_response and S_con < tau_conflict. `rounds` restarts from fresh noise
(seeded: seed + round), each up to `iterations` steps; the first success is kept, else the round with the lowest
S_res + S_con is optimised again for `final_iterations` steps from its starting noise (the authors' schedule:
5 rounds of 10, then 50). All of this is per image of a batch, as the authors' code runs one image at a time.
Followed from the authors' code (xiefan-guo/initno, Apache-2.0): the clean-up term of their cross-attention (an
Otsu mask of each map kept to the peak's component) is left out; the paper's objective has the two scores and the
KL term only.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

import comfy.model_patcher

from ..attention_patch.capture import _cond_rows, attention_probabilities, layer_grid
from . import losses as L

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InitNOConfig:
    rounds: int = 5
    iterations: int = 10
    final_iterations: int = 50
    learning_rate: float = 1e-2
    tau_response: float = 0.2
    tau_conflict: float = 0.3
    kl_bound: float = 1e-3


# ---------------------------------------------------------------- scores (pure)

def response_score(maps: torch.Tensor, smoothing_sigma: float = 0.5) -> torch.Tensor:
    """S_res = max_s (1 - max_ij G * A_s): [B, S, H, W] -> [B] (Attend-and-Excite's loss)."""
    return L.attend_and_excite_loss(maps, smoothing_sigma=smoothing_sigma)


def peak_self_attention(self_maps: torch.Tensor, maps: torch.Tensor, smoothing_sigma: float = 0.5) -> torch.Tensor:
    """M_s: the self-attention row of each subject's peak pixel (of its smoothed cross-attention map).
    self_maps [B, HW, HW], maps [B, S, H, W] -> [B, S, H, W]."""
    batch, count, height, width = maps.shape
    peaks = L.smooth(maps, sigma=smoothing_sigma).detach().flatten(2).argmax(dim=-1)  # [B, S]
    rows = torch.gather(self_maps, 1, peaks[..., None].expand(batch, count, self_maps.shape[-1]))
    return rows.reshape(batch, count, height, width)


def conflict_score(self_maps: torch.Tensor, maps: torch.Tensor, smoothing_sigma: float = 0.5) -> torch.Tensor:
    """S_con = mean_{m<n} sum min(M_m, M_n) / sum (M_m + M_n) over the smoothed peak self-attention rows: [B]."""
    rows = L.smooth(peak_self_attention(self_maps, maps, smoothing_sigma), sigma=smoothing_sigma)
    count = rows.shape[1]
    pairs = [(m, n) for m in range(count) for n in range(m + 1, count)]
    if not pairs:
        return rows.new_zeros(rows.shape[0])
    overlaps = [torch.minimum(rows[:, m], rows[:, n]).flatten(1).sum(-1)
                / (rows[:, m] + rows[:, n]).flatten(1).sum(-1).clamp(min=1e-6) for m, n in pairs]
    return torch.stack(overlaps, dim=1).mean(dim=1)


def kl_to_standard_normal(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(log_var)) || N(0, 1)), mean over elements: -1/2 mean(1 + log_var - mu^2 - exp(log_var))."""
    return -0.5 * torch.mean(1 + log_var - mu ** 2 - log_var.exp())


def joint_score(response: torch.Tensor, conflict: torch.Tensor) -> torch.Tensor:
    """What is minimised: S_res + S_con, the conflict counted only where every subject responds (S_res <= 0.5)."""
    return response + torch.where(response > 0.5, torch.zeros_like(conflict), conflict)


# ---------------------------------------------------------------- self-attention capture (this stage only)

class SelfAttentionCapture:
    """attn1 replace patches on the captured layers that compute the self-attention explicitly (differentiable)
    and keep the subjects' cond rows, averaged over heads and layers, on the map grid: [B, HW, HW]."""

    def __init__(self, layers, target_uuid=None):
        self.layers, self.target_uuid = layers, target_uuid
        self._downsample = {(layer.key[0], layer.key[1]): layer.downsample for layer in layers}
        self.maps: list[torch.Tensor] = []

    def __call__(self, q, k, v, extra_options, inner=None):
        heads = extra_options["n_heads"]
        probs = attention_probabilities(q, k, heads)  # [B, heads, N, N]
        rows = _cond_rows(extra_options, q.shape[0], self.target_uuid)
        if rows is not None:
            downsample = self._downsample.get(tuple(extra_options.get("block") or ()), self.layers[0].downsample)
            actual, nominal = layer_grid(extra_options, probs.shape[-1], downsample)
            if actual == nominal:  # patches that resize the latent (Deep Shrink) change the grid: those steps skip
                self.maps.append(probs[rows].mean(dim=1))
        if inner is not None:
            return inner(q, k, v, extra_options)
        batch, tokens, _ = v.shape
        v_heads = v.reshape(batch, tokens, heads, -1).transpose(1, 2).to(probs.dtype)
        return (probs @ v_heads).transpose(1, 2).reshape(batch, q.shape[1], -1).to(q.dtype)

    def install(self, model_options: dict) -> dict:
        replaces = model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
        for layer in self.layers:
            block_name, number, index = layer.key
            inner = replaces.get(layer.key, replaces.get((block_name, number)))
            model_options = comfy.model_patcher.set_model_options_patch_replace(
                model_options, _SelfPatch(self, inner), "attn1", block_name, number, index)
        return model_options

    def take(self) -> torch.Tensor | None:
        maps, self.maps = self.maps, []
        return torch.stack(maps).mean(dim=0).float() if maps else None


class _SelfPatch:
    def __init__(self, capture: SelfAttentionCapture, inner):
        self.capture, self.inner = capture, inner

    def __call__(self, q, k, v, extra_options):
        return self.capture(q, k, v, extra_options, self.inner)


# ---------------------------------------------------------------- the stage

@dataclass
class InitNOImage:
    """One image's outcome: its kept noise, whether it succeeded, that noise's scores, the KL of its
    reparameterisation and the round it came from (round `config.rounds` is the final optimisation of a failed
    image's best round, which keeps that round's index)."""
    noise: torch.Tensor
    succeeded: bool
    response: float
    conflict: float
    kl: float
    round: int


@dataclass
class InitNOResult:
    """The batch's images in order, and `history`: (round, iteration, S_res, S_con), the worst of the images
    optimised in that pass."""
    images: list[InitNOImage]
    history: list[tuple[int, int, float, float]]

    @property
    def noise(self) -> torch.Tensor:
        return torch.stack([image.noise for image in self.images])

    def column(self, name: str) -> list:
        """One field of every image, in batch order."""
        return [getattr(image, name) for image in self.images]

    def record(self) -> dict:
        """What the ATTENTION record keeps: per-image lists and the history."""
        return {**{name: self.column(name) for name in ("succeeded", "response", "conflict", "kl")},
                "rounds": self.column("round"), "history": self.history}


def optimise_noise(scores, noise: torch.Tensor, fresh_noise, config: InitNOConfig) -> InitNOResult:
    """InitNO's rounds around `scores(z) -> (S_res [B], S_con [B])` (differentiable in z; image i's scores depend
    on z[i] only). fresh_noise(round) gives the starting noise of round >= 1 (round 0 starts from `noise`).

    Each image of the batch is optimised as if alone, as the authors' code runs one image at a time: its own Adam
    state and KL bound, its own first success, its own restarts (row i of the fresh noise) and its own best round.
    The batch is scored together; images that stopped keep their noise and take no more steps. Scoring only the
    images still running would save their passes, but ComfyUI fits per-image conditioning to a batch by its
    first rows (comfy.utils.repeat_to_batch_size: an inpainting model's concat latent, say), so a sub-batch of
    images 3 and 5 would be scored with rows 0 and 1's."""
    history: list[tuple[int, int, float, float]] = []
    kept: list[InitNOImage | None] = [None] * noise.shape[0]
    pool: list[list[tuple[float, int, torch.Tensor]]] = [[] for _ in kept]

    def one_round(starts: list[torch.Tensor], optimised: list[int], round_index: int, iterations: int) -> dict:
        mus = {i: torch.zeros_like(starts[i], requires_grad=True) for i in optimised}
        log_vars = {i: torch.zeros_like(starts[i], requires_grad=True) for i in optimised}
        optimizers = {i: torch.optim.Adam([mus[i], log_vars[i]], lr=config.learning_rate, eps=1e-3)
                      for i in optimised}

        def current(i):
            return starts[i] * torch.exp(0.5 * log_vars[i]) + mus[i] if i in mus else kept[i].noise

        running, ended = list(optimised), {}
        for iteration in range(iterations + 1):
            response, conflict = scores(torch.stack([current(i) for i in range(len(kept))]))
            history.append((round_index, iteration, max(float(response[i].detach()) for i in running),
                            max(float(conflict[i].detach()) for i in running)))
            for i in list(running):
                succeeded = bool(response[i] < config.tau_response and conflict[i] < config.tau_conflict)
                if succeeded or iteration == iterations:
                    running.remove(i)
                    kl = float(kl_to_standard_normal(mus[i], log_vars[i]).detach())
                    ended[i] = InitNOImage(current(i).detach(), succeeded, float(response[i].detach()),
                                     float(conflict[i].detach()), kl, round_index)
            if not running:
                return ended
            for optimizer in optimizers.values():
                optimizer.zero_grad()
            joint_score(response[running], conflict[running]).sum().backward()
            for i in running:
                optimizers[i].step()
                for _ in range(1000):  # keep the noise a standard normal draw (the authors' loop, capped)
                    kl = kl_to_standard_normal(mus[i], log_vars[i])
                    if float(kl.detach()) <= config.kl_bound:
                        break
                    optimizers[i].zero_grad()
                    kl.backward()
                    optimizers[i].step()
        return ended

    starts = list(noise)
    for round_index in range(config.rounds):
        if round_index:
            starts = list(fresh_noise(round_index))
        waiting = [i for i, entry in enumerate(kept) if entry is None]
        for i, entry in one_round(starts, waiting, round_index, config.iterations).items():
            if entry.succeeded:
                kept[i] = entry
            else:
                pool[i].append((entry.response + entry.conflict, round_index, starts[i]))
        if all(entry is not None for entry in kept):
            break
    failed = [i for i, entry in enumerate(kept) if entry is None]
    if failed:
        best = {i: min(pool[i], key=lambda entry: entry[:2]) for i in failed}
        starts = [best[i][2] if i in best else None for i in range(len(kept))]
        for i, entry in one_round(starts, failed, config.rounds, config.final_iterations).items():
            entry.round = best[i][1]
            kept[i] = entry
    return InitNOResult(kept, history)
