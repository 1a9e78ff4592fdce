"""Trains the world model (issue 16): the narrow SD1.x UNet and CLIP-L text encoder of `world.model` on the scenes
of `world.scenes`, and saves it as one single-file SD1.x checkpoint that Load Checkpoint loads.

Run from the pack root with ComfyUI's Python (deterministic from --seed; resumes from the last save in --out).
The defaults are the shipped checkpoint's recipe (world/README.md), so this one command trains it:

    python world/train.py --out world_run
    python world/train.py --out world_run --batches 3000          # later: carries on from the last save

Per batch: `--batch-size` training scenes (scene index = batch * batch size + row, so the data depend only on
the seed and the batch number), 10% of the captions dropped to "" (for classifier-free guidance), one
timestep per image of SD1.x's 1000-step schedule, EPS loss. Two attention terms shape the cross-attention
(head-averaged probabilities of every attn2 layer, 16x16 and 8x8):

  grounding (--ground-weight, one-object scenes only): inside the object the share of a pixel's attention on
      each of the object's two words (colour, shape) should reach --ground-target: mean relu(target - share)
      over the two words, plus the words' share outside the object (mean). Per word, not their sum: with a
      target on the sum the colour word took it all, and A&E's x100 softmax then left the noun's map at 0. Two- and three-object scenes are not grounded, so that
      composing two objects stays hard for the plain model (grounding every scene removed the neglect
      while scoping this: TokenCompose's effect).
  sink (--sink-weight, every captioned scene): the share of attention on every token but the start token and
      the colour and shape words ('a', 'and', ',', the end token, the padding), so that what the words do not
      hold goes to the start token, as in SD. A&E's softmax drops the start token and keeps the rest: a sink
      there (the padding, or the first 'a', where the mass went with a padding-only term) leaves the
      subjects' maps at 0 after it (A&E's loss stuck at 1).

Options for making the shape word matter (world/README.md: the first world model's pictures ignored it; the
shipped recipe has the frozen text encoder and the shape-word term on, the other two off):

  --freeze-text true  the text encoder stays at its random start and only the UNet trains (SD1.x trained with
      CLIP frozen). Trained jointly, the encoder's outputs for circle, square and triangle collapsed (8% apart at
      the shape word's position; 45-80% for a random encoder).
  --object-weight W   EPS loss weight 1 + W on the objects' pixels and the ring around them (mean 1).
  --p2-gamma G        P2 weighting (Choi et al. 2022): EPS loss x 1 / (1 + SNR)^G, less weight on the low noise
      levels that only clean up detail.
  --shape-weight W    the shape-word term (`shape_word_term`): with the caption's shape word swapped, the EPS loss
      must rise by --shape-margin of the right caption's, on one-object scenes at sigma >= --shape-min-sigma.

The DiT world model (`--family sd3`, world/dit.py: ComfyUI's MMDiT with SD3's text stack, CLIP-L alone, frozen):
the same scenes, captions and terms on the joint attention's image-query x text-key slice (what the pack's DiT
capture reads), with a rectified-flow target (noise - x0, ComfyUI's CONST sampling) instead of EPS, and
`--ground-log true`: that slice is part of a softmax over the text AND the image keys, and with the plain hinge the
words' shares all fell to ~0 within 20 batches (so the hinge's gradient vanished); the log hinge inside and a log
bound outside (ground_target / 10) keep them on their objects. Its sink is taken within the text. Its checkpoint
is world_sd3.safetensors:

    python world/train.py --out world_dit_run --family sd3 --ground-log true

The UNet's widths: --model-channels and --channel-mult (default 64 and 1,2,2, the shipped model's). At 32 and
1,3,3 (the first world model's) the first level has one channel per GroupNorm group and the model cannot see the
initial noise's mean (world/README.md).

Saves (--save-every batches, and at the end or when --minutes is up): `state.pt` (weights, optimizer, batch
number, loss log) and `world_sd15.safetensors` (fp16 UNet and text encoder, the fixed VAE; `world_sd3.safetensors`
for --family sd3).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

PACK_DIR = Path(__file__).resolve().parent.parent
CHECKPOINT_NAME = "world_sd15.safetensors"
CHECKPOINT_NAMES = {"sd15": CHECKPOINT_NAME, "sd3": "world_sd3.safetensors"}
FAMILIES = tuple(CHECKPOINT_NAMES)
STATE_NAME = "state.pt"


@dataclass
class TrainConfig:
    # the defaults are the shipped checkpoint's recipe (world/README.md)
    seed: int = 0
    family: str = "sd15"            # sd15: the UNet of world.model; sd3: the MMDiT of world.dit (the DiT rows)
    depth: int = 3                  # sd3: the MMDiT's joint blocks (hidden 64 x depth)
    local_attention: float = 0.0    # sd3: > 0 starts the image self-attention local (world.dit.local_attention_init_)
    batch_size: int = 16
    lr: float = 8e-4
    warmup: int = 50
    lr_decay_start: int = 0         # from this batch the learning rate falls linearly to a tenth at lr_decay_end
    lr_decay_end: int = 0           # (0, 0: constant after warm-up, the SD1.x recipe's)
    cond_dropout: float = 0.1
    ground_weight: float = 0.2
    ground_target: float = 0.15
    ground_log: bool = False        # the grounding hinge on log shares (the MMDiT's: see `grounding_shortfall`)
    sink_weight: float = 0.05
    grad_clip: float = 1.0
    model_channels: int = 64        # the UNet's widths: world.model.SHIPPED_WIDTHS (this module loads the
    channel_mult: str = "1,2,2"     # pack only once the host is booted; a test checks they agree)
    freeze_text: bool = True        # keep the text encoder at its random start (SD trains with CLIP frozen)
    object_weight: float = 0.0      # extra EPS-loss weight on the objects' pixels and the ring around them
    p2_gamma: float = 0.0           # P2 weighting (Choi et al. 2022): EPS loss x (sigma^2 / (1 + sigma^2))^gamma
    shape_weight: float = 0.05      # weight of the shape-word term (one-object scenes, sigma >= shape_min_sigma)
    shape_margin: float = 0.1       # ... the wrong shape word must raise the EPS loss by this share of the right one's
    shape_min_sigma: float = 1.0


@dataclass
class Trainer:
    """Model, text encoder, optimizer and the batch counter; `step()` trains one batch."""
    config: TrainConfig
    model: object
    clip: object
    optimizer: object
    batch: int = 0
    log: list = field(default_factory=list)
    family: object = None           # _UNetFamily or _DiTFamily: everything that differs between the two

    @property
    def parameters(self):
        """The trained parameters: the UNet's, and the text encoder's unless it is frozen."""
        text = [] if self.config.freeze_text else list(self.clip.cond_stage_model.parameters())
        return list(self.model.diffusion_model.parameters()) + text


def _pack(name: str = ""):
    """The pack's modules world.model and world.scenes (or the one named): the ones ComfyUI loaded (tests,
    ComfyUI) or, for the command line, boot the host."""
    package = __package__ or ""
    if package.endswith(".world"):
        prefix = package[: -len(".world")]
    else:
        spec = importlib.util.spec_from_file_location("attn_guide_host", PACK_DIR / "runner" / "host.py")
        host = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(host)
        try:
            prefix = host.boot_host(host.find_host(), cpu=True)
        except host.HostNotFound as error:
            sys.exit(str(error))
    if name:
        return importlib.import_module(f"{prefix}.world.{name}")
    return importlib.import_module(f"{prefix}.world.model"), importlib.import_module(f"{prefix}.world.scenes")


class _UNetFamily:
    """sd15: world.model's UNet and CLIP-L text encoder, EPS target, the UNet's cross-attention probe."""

    def __init__(self, config: TrainConfig):
        self.world_model, _ = _pack()
        self.config = config
        self.model = self.world_model.make_unet_model(config.seed, config.model_channels, config.channel_mult.split(","))
        self.clip = self.world_model.make_clip(config.seed + 1)

    def conditioning(self, latent, captions) -> dict:
        """The batch's model latent and what `predict` reads for its captions."""
        return {"latent": latent, "tokens": self.world_model.tokenize(self.clip, captions)}

    @staticmethod
    def noised(x0, sigma, noise):
        """EPS (SD1.x): the input x0 + sigma * noise scaled by 1 / sqrt(1 + sigma^2), the target the noise, the
        level sigma itself."""
        import torch
        return (x0 + sigma * noise) / torch.sqrt(1 + sigma ** 2), noise, sigma

    def probe(self, model):
        return self.world_model.AttentionProbe(model.diffusion_model)

    def sink_maps(self, maps):
        return maps

    def predict(self, model, x_in, timesteps, data, captions, options):
        import torch
        tokens = self.world_model.tokenize(self.clip, captions) if captions is not None else data["tokens"]
        with torch.set_grad_enabled(not self.config.freeze_text and torch.is_grad_enabled()):
            context = self.world_model.encode_tokens(self.clip, tokens)
        return model.diffusion_model(x_in, timesteps, context=context, **options)

    def save_checkpoint(self, path, model, metadata):
        self.world_model.save_checkpoint(path, model, self.clip, metadata=metadata)


class _DiTFamily:
    """sd3: world.dit's MMDiT with SD3's text stack (frozen; its output cached per caption), the rectified-flow
    target, the joint-attention probe."""

    def __init__(self, config: TrainConfig):
        if not config.freeze_text:
            raise ValueError("--family sd3 trains with the text encoder frozen (--freeze-text true): the MMDiT reads "
                             "ComfyUI's own SD3 text encoder, whose in-place adds autograd cannot train through")
        self.dit = _pack("dit")
        self.model = self.dit.make_model(config.seed, config.depth, config.local_attention)
        self.clip = self.dit.make_clip(config.seed + 1)
        self.text = self.dit.TextCache(self.clip)

    def conditioning(self, latent, captions) -> dict:
        return {"latent": self.dit.to_model_latent(latent)}

    @staticmethod
    def noised(x0, sigma, noise):
        """Rectified flow, as ComfyUI's CONST sampling: the input (1 - sigma) * x0 + sigma * noise, the target
        noise - x0 (x0 = x - sigma * output), the level sigma / (1 - sigma) (the same signal-to-noise ratio)."""
        return (1 - sigma) * x0 + sigma * noise, noise - x0, sigma / (1 - sigma).clamp(min=1e-6)

    def probe(self, model):
        return self.dit.JointAttentionProbe(77)

    def sink_maps(self, maps):
        # the MMDiT's maps are a slice of a softmax over text AND image keys: its sink is taken within the text
        # (renormalised), else it empties the text altogether (every share went to 0 within 20 batches)
        return maps / maps.sum(-1, keepdim=True).clamp(min=1e-12)

    def predict(self, model, x_in, timesteps, data, captions, options):
        context, pooled = self.text(captions if captions is not None else data["captions"])
        return model.diffusion_model(x_in, timesteps, context=context, y=pooled, **options)

    def save_checkpoint(self, path, model, metadata):
        self.dit.save_checkpoint(path, model, self.clip, metadata=metadata)


FAMILY_CLASSES = {"sd15": _UNetFamily, "sd3": _DiTFamily}


def make_trainer(config: TrainConfig):
    import torch
    if config.family not in FAMILIES:
        raise ValueError(f"family {config.family!r} is not a world model; valid: {', '.join(FAMILIES)}")
    torch.manual_seed(config.seed)
    family = FAMILY_CLASSES[config.family](config)
    trainer = Trainer(config, family.model, family.clip, None, family=family)
    for p in trainer.parameters:
        p.requires_grad_(True)
    if config.freeze_text:
        trainer.clip.cond_stage_model.requires_grad_(False)
    trainer.optimizer = torch.optim.AdamW(trainer.parameters, lr=config.lr, weight_decay=0.0)
    return trainer


def batch_data(trainer: Trainer, batch: int):
    """Latents, token ids, caption kept flags, coverage and the objects' token positions of batch `batch`."""
    import numpy as np
    import torch
    _, scenes = _pack()
    config = trainer.config
    rng = np.random.default_rng([config.seed, batch, 1])
    drawn = scenes.sample_scenes(config.seed, config.batch_size, start=batch * config.batch_size)
    image, cover = scenes.render(drawn)
    kept = rng.random(config.batch_size) >= config.cond_dropout
    captions = [scene.caption if keep else "" for scene, keep in zip(drawn, kept)]
    latent = torch.from_numpy(scenes.rgb_to_latent(image))
    return {"captions": captions, "kept": torch.from_numpy(kept), "cover": torch.from_numpy(cover), "scenes": drawn,
            **trainer.family.conditioning(latent, captions)}


def noised(family: str, x0, sigma, noise):
    """(the model's input, its training target, the EPS-equivalent noise level) at `sigma` [B, 1, 1, 1] for the
    world model `family` (a FAMILIES name): the family's own `noised`. The level is what --shape-min-sigma reads, so
    that it means the same for both."""
    return FAMILY_CLASSES[family].noised(x0, sigma, noise)


def flow_sigma(level):
    """The rectified-flow sigma at the EPS-equivalent noise level `level` (the inverse of the sd3 family's level)."""
    return level / (1 + level)


def predict(trainer: Trainer, x_in, timesteps, data: dict | None = None, captions: list[str] | None = None,
            transformer_options: dict | None = None):
    """The diffusion model's output for the batch's conditioning (data: its token ids or captions) or for
    `captions`; sd15 takes the text encoder's output (trained through unless frozen), sd3 also the pooled vector."""
    options = {} if transformer_options is None else {"transformer_options": transformer_options}
    return trainer.family.predict(trainer.model, x_in, timesteps, data, captions, options)


def eps_loss_weight(sigma, cover, object_weight: float = 0.0, p2_gamma: float = 0.0):
    """Per-pixel weight [B, 1, H, W] of the EPS loss (1 when both are 0).
    object_weight: 1 + w on the objects' pixels and a one-pixel ring around them (where the shape is), scaled
        to mean 1 over the batch.
    p2_gamma: P2 weighting (Choi et al. 2022, 'Perception Prioritized Training'), (sigma^2 / (1 + sigma^2))^gamma
        = 1 / (1 + SNR)^gamma: less weight on the low noise levels, which only clean up detail, so that the
        levels where content (which shape) is decided carry more of the gradient."""
    import torch
    import torch.nn.functional as F
    weight = torch.ones(cover.shape[0], 1, *cover.shape[2:])
    if object_weight:
        weight = 1 + object_weight * F.max_pool2d(cover.sum(1, keepdim=True).clamp(max=1), 3, 1, 1)
        weight = weight / weight.mean()
    if p2_gamma:
        weight = weight * (sigma.reshape(-1, 1, 1, 1) ** 2 / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)) ** p2_gamma
    return weight


def losses(trainer: Trainer, data: dict, batch: int) -> dict:
    """The batch's loss terms (tensors); `total` is what is minimised."""
    import torch
    import torch.nn.functional as F
    config = trainer.config
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + batch)
    x0 = data["latent"]
    count = x0.shape[0]
    sampling = trainer.model.model_sampling
    timesteps = torch.randint(0, len(sampling.sigmas), (count,), generator=generator)
    sigma = sampling.sigmas[timesteps].float().reshape(-1, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=generator)
    x_in, target, level = trainer.family.noised(x0, sigma, noise)
    # what the sampler gives the model at sigma: SD1.x's index t, the flow's sigma x 1000
    model_timesteps = sampling.timestep(sigma.flatten()).float()
    probe = trainer.family.probe(trainer.model)
    eps = predict(trainer, x_in, model_timesteps, data, transformer_options=probe.transformer_options())
    terms = {"diffusion": F.mse_loss(eps, target)}
    weighted = (eps_loss_weight(level, data["cover"], config.object_weight, config.p2_gamma) * (eps - target) ** 2).mean()

    sink_tokens = torch.ones((count, 77), dtype=torch.float32)         # all but the start token and the words
    sink_tokens[:, 0] = 0.0
    for row, scene in enumerate(data["scenes"]):
        for colour_at, shape_at in scene.token_positions():
            sink_tokens[row, [colour_at, shape_at]] = 0.0
    kept = data["kept"]
    one = kept & torch.tensor([len(scene.objects) == 1 for scene in data["scenes"]])
    ground_in, ground_out, sink = [], [], []
    for maps in probe.maps:                                              # [B, h*w, 77]
        side = int(math.isqrt(maps.shape[1]))
        if kept.any():
            share = (trainer.family.sink_maps(maps) * sink_tokens[:, None]).sum(-1)
            sink.append(share[kept].mean())
        if one.any():
            cover = F.adaptive_avg_pool2d(data["cover"][:, 0], side).reshape(count, -1)[one]
            colour_share, shape_share = maps[one][:, :, 2], maps[one][:, :, 3]  # 'a <colour> <shape>'
            inside, outside = cover >= 0.5, cover <= 0.0
            ground_in.append((grounding_shortfall(colour_share[inside], config.ground_target, config.ground_log)
                              + grounding_shortfall(shape_share[inside], config.ground_target, config.ground_log)) / 2)
            ground_out.append(grounding_excess((colour_share + shape_share)[outside], config.ground_target / 10,
                                               config.ground_log))
    zero = eps.new_zeros(())
    terms["ground_in"] = torch.stack(ground_in).mean() if ground_in else zero
    terms["ground_out"] = torch.stack(ground_out).mean() if ground_out else zero
    terms["sink"] = torch.stack(sink).mean() if sink else zero
    terms["shape"] = zero
    if config.shape_weight:
        terms["shape"] = shape_word_term(trainer, data, x_in, model_timesteps, level.flatten(), eps, target, one)
    terms["total"] = (weighted + config.shape_weight * terms["shape"] + config.ground_weight * (terms["ground_in"] + terms["ground_out"])
                      + config.sink_weight * terms["sink"])
    return terms


def grounding_shortfall(share, target: float, log: bool = False):
    """Mean shortfall of a word's attention share below `target` on its object's pixels: relu(target - share),
    or with `log` relu(log target - log share). The MMDiT's shares are a slice of a softmax over text and image
    keys, and the diffusion loss first sends them all to ~0 (within 20 batches, every word's share fell below
    1e-4 with the plain hinge); there the plain hinge's gradient, share x (1 - share), vanishes, the log's does
    not."""
    import torch
    if log:
        return torch.relu(math.log(target) - torch.log(share.clamp(min=1e-8))).mean()
    return torch.relu(target - share).mean()


def grounding_excess(share, bound: float, log: bool = False):
    """The words' share outside their object: its mean, or with `log` the mean of relu(log share - log bound), as
    strong as the log shortfall inside (with the log hinge inside and the plain mean outside, the MMDiT gave every
    pixel the words' target share, inside and outside alike)."""
    import torch
    if log:
        return torch.relu(torch.log(share.clamp(min=1e-8)) - math.log(bound)).mean()
    return share.mean()


def shape_word_term(trainer: Trainer, data: dict, x_in, timesteps, sigma, eps, noise, one):
    """Makes the shape word matter: on one-object scenes at sigma >= shape_min_sigma (where the noisy picture
    leaves the shape open), the EPS loss with the caption's shape word swapped for another must exceed the right
    caption's by shape_margin of it: mean relu(margin - (L_wrong - L_right) / L_right). The swapped caption names
    another scene's right shape, so the only way to meet it is to draw the shape the word names. Without it the
    EPS loss fell to 0.006 with the pictures blind to the shape word (world/README.md): knowing the shape saves
    too little of that loss for training to find.
    timesteps: the model's; sigma: the EPS-equivalent noise level (`noised`); eps, noise: the model's output with
    the right caption and its target (for sd3 the flow's velocity, noise - x0)."""
    import torch
    _, scenes = _pack()
    config = trainer.config
    rows = (one & (sigma >= config.shape_min_sigma)).nonzero().flatten()
    if not len(rows):
        return eps.new_zeros(())
    wrong = []
    for row in rows.tolist():
        colour, shape = data["scenes"][row].objects[0].pair
        wrong.append(scenes.caption([(colour, scenes.other_shape(shape, 1 + row % 2))]))
    eps_wrong = predict(trainer, x_in[rows], timesteps[rows].float(), captions=wrong)
    right = ((eps[rows] - noise[rows]) ** 2).mean((1, 2, 3))
    wrong_loss = ((eps_wrong - noise[rows]) ** 2).mean((1, 2, 3))
    return torch.relu(config.shape_margin - (wrong_loss - right) / right.detach()).mean()


def learning_rate(config: TrainConfig, batch: int) -> float:
    """Linear warm-up over `warmup` batches, then constant, or falling linearly to a tenth between lr_decay_start
    and lr_decay_end (and a tenth after): a function of the batch number, so a resumed run follows it too."""
    lr = config.lr * min(1.0, (batch + 1) / max(config.warmup, 1))
    if config.lr_decay_end > config.lr_decay_start > 0:
        done = min(1.0, max(0.0, (batch - config.lr_decay_start) / (config.lr_decay_end - config.lr_decay_start)))
        lr *= 1 - 0.9 * done
    return lr


def step(trainer: Trainer) -> dict:
    """Trains one batch; returns its loss terms as floats."""
    import torch
    config = trainer.config
    lr = learning_rate(config, trainer.batch)
    for group in trainer.optimizer.param_groups:
        group["lr"] = lr
    terms = losses(trainer, batch_data(trainer, trainer.batch), trainer.batch)
    trainer.optimizer.zero_grad(set_to_none=True)
    terms["total"].backward()
    torch.nn.utils.clip_grad_norm_(trainer.parameters, config.grad_clip)
    trainer.optimizer.step()
    values = {name: float(value.detach()) for name, value in terms.items()}
    values["batch"] = trainer.batch
    trainer.log.append(values)
    trainer.batch += 1
    return values


def save(trainer: Trainer, out: Path, checkpoint: bool = True) -> None:
    """state.pt (atomically) and, with `checkpoint`, the single-file checkpoint."""
    import torch
    name = CHECKPOINT_NAMES[trainer.config.family]
    out.mkdir(parents=True, exist_ok=True)
    state = {"config": asdict(trainer.config), "batch": trainer.batch, "log": trainer.log,
             "unet": trainer.model.diffusion_model.state_dict(), "text": trainer.clip.cond_stage_model.state_dict(),
             "optimizer": trainer.optimizer.state_dict()}
    partial = out / (STATE_NAME + ".partial")
    torch.save(state, partial)
    partial.replace(out / STATE_NAME)
    if checkpoint:
        metadata = {"attn_guide_world": json.dumps({"batches": trainer.batch, "config": asdict(trainer.config)})}
        partial = out / (name + ".partial")
        trainer.family.save_checkpoint(partial, trainer.model, metadata)
        partial.replace(out / name)


def load(out: Path, config: TrainConfig | None = None) -> Trainer:
    """A trainer resumed from out/state.pt (its own config unless one is given), else a fresh one."""
    import torch
    path = out / STATE_NAME
    if not path.is_file():
        return make_trainer(config or TrainConfig())
    state = torch.load(path, weights_only=False)
    trainer = make_trainer(config or TrainConfig(**state["config"]))
    trainer.model.diffusion_model.load_state_dict(state["unet"])
    trainer.clip.cond_stage_model.load_state_dict(state["text"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.batch, trainer.log = state["batch"], state["log"]
    return trainer


def train(out: Path, batches: int, config: TrainConfig | None = None, save_every: int = 100,
          minutes: float | None = None, progress: bool = True) -> Trainer:
    """Trains from the last save in `out` (or from scratch) up to `batches` batches in all."""
    from tqdm import tqdm
    trainer = load(out, config)
    start = time.monotonic()
    bar = tqdm(total=batches, initial=trainer.batch, disable=not progress, unit="batch", dynamic_ncols=True)
    while trainer.batch < batches:
        values = step(trainer)
        bar.update(1)
        bar.set_postfix(loss=f"{values['diffusion']:.4f}", ground=f"{values['ground_in']:.4f}", shape=f"{values['shape']:.3f}",
                        sink=f"{values['sink']:.3f}")
        timed_out = minutes is not None and time.monotonic() - start > minutes * 60
        if trainer.batch % save_every == 0 or trainer.batch == batches or timed_out:
            save(trainer, out)
        if timed_out:
            break
    bar.close()
    if trainer.log and trainer.batch % save_every and trainer.batch != batches:
        save(trainer, out)
    return trainer


def _flag(text: str) -> bool:
    """A boolean option's value ('--freeze-text true'); bool('false') would be True."""
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean: use true or false")


def main(argv=None) -> None:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder of state.pt and the checkpoint")
    parser.add_argument("--batches", type=int, default=2400, help="train up to this many batches in all")
    parser.add_argument("--minutes", type=float, default=None, help="stop (and save) after this much wall time")
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    for name, value in asdict(defaults).items():
        parser.add_argument("--" + name.replace("_", "-"), type=_flag if isinstance(value, bool) else type(value),
                            default=None, help=f"default {value}; on resume the saved run's value")
    args = parser.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    given = {name: getattr(args, name) for name in asdict(defaults) if getattr(args, name) is not None}
    config = None
    if given or not (args.out / STATE_NAME).is_file():
        saved = {}
        if (args.out / STATE_NAME).is_file():
            saved = torch.load(args.out / STATE_NAME, weights_only=False)["config"]
        config = TrainConfig(**{**asdict(defaults), **saved, **given})
    started = time.monotonic()
    trainer = train(args.out, args.batches, config, args.save_every, args.minutes)
    last = trainer.log[-50:]
    mean = {k: sum(v[k] for v in last) / len(last) for k in ("diffusion", "ground_in", "ground_out", "sink")} if last else {}
    print(json.dumps({"batches": trainer.batch, "seconds": round(time.monotonic() - started, 1),
                      "last_50_mean": mean}))


if __name__ == "__main__":
    main()
