"""What a guided step costs, in time and memory, against plain sampling and diffusers' pipeline (issue 6).

For each model (the tiny SD1.5/SDXL/SD3/Flux-shaped models; ComfyUI's real SD1.5 and SDXL UNets and SD3.5
medium's MMDiT-X at full size, and Flux.1's blocks at full width with 2 double + 2 single blocks, all with small
random weights), in a fresh subprocess per model, medians of --reps repetitions:

  plain        one CFG model evaluation (cond + uncond), the model call every sampler step makes
  guide        one `GuidanceRun.guide` call, A&E loss, no refinement: guided forward of the positive
               prompt + backward to the latent + update; with the truncated pass (the default, the
               forward stops after the last captured layer) and with the full pass
  overhead     guide / plain: what a guided step adds to a plain step
  reference    the same overhead of diffusers' StableDiffusionAttendAndExcitePipeline on the same
               weights (SD1.x-shaped models only; diffusers has no SDXL Attend-and-Excite): its
               per-step time with every step guided (thresholds {}, so no refinement), minus a plain
               CFG evaluation of the same UNet with diffusers' default attention, over the latter
  memory       peak extra memory of each operation over what was resident before it. CUDA:
               torch.cuda.max_memory_allocated. CPU: the process's peak resident set (VmHWM, reset
               to the current RSS through /proc/self/clear_refs before the operation) minus its
               RSS before; the worker runs with glibc's mmap threshold fixed at 64 KiB, so freed
               tensors leave the RSS and the numbers do not depend on what ran before
  parity       the pack's Attention KSampler without guidance and with record_maps off against
               nodes.common_ksampler on the same model, seed and steps (runs interleaved)
  grad check   max |g_truncated - g_full| / max |g_full| of the loss gradient with respect to the latent
  blocks       flux-width only: one double and one single block alone, forward as a plain step runs it and
               forward + backward as the guided pass runs it (capture, recomputed feed-forwards, frozen
               weights), and what a block's forward keeps for the backward; from them the model's numbers
               extrapolated to Flux.1's 19 double + 38 single blocks

and the targets as PASS/FAIL lines: our truncated overhead <= 0.5x the reference's; unguided sampling
within 5% of KSampler; truncated-pass peak memory <= 0.6x the full pass's; on Flux.1 (extrapolated) a
guided step <= 1.0x a plain step and the guided pass's peak memory <= 0.6x the full pass's.

DiT models (SD3/SD3.5, Flux) sample with their own CFG (SD3 4.5; Flux.1 dev 1.0, i.e. one model call per
plain step, with its guidance embedding at 3.5). The full-size ones are conditioned on random tensors of
the encoders' shapes (T5-XXL 4096 wide: Flux 256 tokens; SD3 77 CLIP-L/G tokens padded to 4096, then 77 T5
tokens) and their SUBJECTS are the real tokenizers' positions of the prompt's words.

    python benchmarks/guidance_cost.py --quick                 # tiny models, < 1 minute
    python benchmarks/guidance_cost.py                         # tiny + full SD1.5 + full SDXL (CPU: long)
    python benchmarks/guidance_cost.py --models tiny-sd3,tiny-flux,flux-width,sd35 --reps 3
    python benchmarks/guidance_cost.py --device cuda --models sd15,sdxl --reps 10
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# before torch is imported: OpenMP threads sleep instead of spinning (a busy machine slowed runs 10x)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # also reaches the worker subprocesses
sys.path.insert(0, str(Path(__file__).resolve().parent))
from losses_effect import PACK_DIR, boot_host, emit, find_host, pack_module  # noqa: E402

DEFAULT_MODELS = ("tiny-sd15", "tiny-sdxl", "sd15", "sdxl")
DIT_MODELS = ("tiny-sd3", "tiny-flux", "sd35", "flux-width")
MODELS = DEFAULT_MODELS + DIT_MODELS
# the model family of each name (runner/tiny_models.py's families for the tiny ones)
FAMILY = {"tiny-sd15": "sd15", "tiny-sdxl": "sdxl", "sd15": "sd15", "sdxl": "sdxl", "tiny-sd3": "sd3",
          "tiny-flux": "flux", "sd35": "sd3", "flux-width": "flux"}
FULL_DIT = ("sd35", "flux-width")
CFG = {"sd15": 7.5, "sdxl": 7.5, "sd3": 4.5, "flux": 1.0}  # Flux.1 dev: no negative pass, guidance embedding
FLUX_GUIDANCE = 3.5
FLUX1_BLOCKS = (19, 38)  # Flux.1 dev/schnell: double, single blocks
PROMPT, SUBJECTS = "a cat and a frog", "cat, frog"

_COMMON = {"use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
           "use_spatial_transformer": True, "legacy": False, "use_temporal_attention": False,
           "use_temporal_resblock": False}
# The unet_config ComfyUI detects for SD1.5 and SDXL checkpoints (comfy.model_detection).
FULL_CONFIGS = {
    "sd15": {**_COMMON, "adm_in_channels": None, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
             "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
             "transformer_depth_middle": 1, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
             "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8, "num_head_channels": -1},
    "sdxl": {**_COMMON, "num_classes": "sequential", "adm_in_channels": 2816, "model_channels": 320,
             "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10],
             "transformer_depth_middle": 10, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
             "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64, "num_heads": -1},
}
# What comfy.model_detection reads off the checkpoints (detect_unet_config): SD3.5 medium's MMDiT-X (depth 24 =
# hidden 1536 / 64, RMS q/k norm, the image-only self-attention in joint blocks 0-12, a 384 x 384 position
# embedding, T5's 4096 -> 1536 context embedder, CLIP-L + CLIP-G pooled 2048), and Flux.1 dev's blocks at full
# width (hidden 3072, 24 heads of 128, RoPE axes 16/56/56) but 2 double + 2 single blocks instead of 19 + 38.
DIT_CONFIGS = {
    "sd35": {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 24, "input_size": None,
             "adm_in_channels": 2048,
             "context_embedder_config": {"target": "torch.nn.Linear",
                                         "params": {"in_features": 4096, "out_features": 1536}},
             "num_patches": 384 * 384, "pos_embed_max_size": 384, "qk_norm": "rms", "pos_embed_scaling_factor": None,
             "x_block_self_attn_layers": list(range(13))},
    "flux-width": {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 768,
                   "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 2,
                   "depth_single_blocks": 2, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True,
                   "guidance_embed": True, "txt_ids_dims": []},
}
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# storage formats of the weights (--weight-format); computed in --dtype through ComfyUI's manual cast
WEIGHT_FORMATS = {**DTYPES, "fp8_e4m3fn": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}


# ================================================================ worker (one model, fresh process)

class Clock:
    def __init__(self, device: str):
        import torch
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def __call__(self, fn):
        self.sync()
        start = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - start, out


class PeakMemory:
    """Peak extra bytes of one call over what was resident before it (see the module docstring)."""

    def __init__(self, device: str):
        import torch
        self.torch = torch
        self.device = device
        self.libc = ctypes.CDLL("libc.so.6") if device == "cpu" else None
        self.available = device == "cuda" or self._can_reset()

    @staticmethod
    def _can_reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field} not in /proc/self/status")

    def __call__(self, fn) -> float | None:
        if not self.available:
            return None
        gc.collect()
        if self.device == "cuda":
            torch = self.torch
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            return float(torch.cuda.max_memory_allocated() - before)
        self.libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = self._status("VmRSS")
        fn()
        return float(self._status("VmHWM") - before)

    def retained(self, fn) -> float | None:
        """Extra bytes held while fn's result is alive (a forward's graph: what it keeps for the backward)."""
        if not self.available:
            return None
        gc.collect()
        if self.device == "cuda":
            self.torch.cuda.synchronize()
            before = self.torch.cuda.memory_allocated()
            out = fn()
            self.torch.cuda.synchronize()
            held = self.torch.cuda.memory_allocated() - before
        else:
            self.libc.malloc_trim(0)
            before = self._status("VmRSS")
            out = fn()
            held = self._status("VmRSS") - before
        del out
        return float(held)


def build_model(name: str, device: str, dtype_name: str, weights: str, weight_format: str | None = None):
    """(MODEL, positive, negative, subjects) for one model spec; full models get random conds.

    weights 'inference': the UNet is built inside torch.inference_mode, as ComfyUI's checkpoint loaders
    build it inside the executor, so its parameters are inference tensors (what a real workflow hands the
    sampler); 'normal': built outside, ordinary tensors.
    """
    import contextlib

    import torch
    building = torch.inference_mode if weights == "inference" else contextlib.nullcontext
    with building():
        return _build_model(name, dtype_name, weight_format or dtype_name)


def _build_model(name: str, dtype_name: str, weight_format: str):
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    import nodes
    tiny = pack_module("runner.tiny_models")
    family = FAMILY[name]
    dtype = getattr(torch, DTYPES[dtype_name])
    storage = getattr(torch, WEIGHT_FORMATS[weight_format])
    manual_cast = dtype if storage != dtype else None
    if name in FULL_DIT:
        return _build_full_dit(name, storage, manual_cast)
    clip = tiny.make_clip(family)
    if name.startswith("tiny-"):
        model = comfy.model_patcher.ModelPatcher(tiny.make_unet_model(family, 0, storage, manual_cast),
                                                 load_device=comfy.model_management.get_torch_device(),
                                                 offload_device=comfy.model_management.unet_offload_device())
        positive, subjects = pack_module("nodes.text_encode").AttentionTextEncode.execute(clip, PROMPT, SUBJECTS).args
        negative = nodes.CLIPTextEncode().encode(clip, "")[0]
        if family == "flux":  # guidance-distilled: the guidance goes in as a cond value, as FluxGuidance sets it
            import node_helpers
            positive = node_helpers.conditioning_set_values(positive, {"guidance": FLUX_GUIDANCE})
        return model, positive, negative, subjects
    config = dict(FULL_CONFIGS[family], dtype=storage)
    model_config = comfy.supported_models.SD15(config) if family == "sd15" else comfy.supported_models.SDXL(config)
    model_config.set_inference_dtype(storage, manual_cast)  # before the model: it picks its ops from these
    if family == "sd15":
        base = comfy.model_base.BaseModel(model_config, model_type=comfy.model_base.ModelType.EPS)
    else:
        base = comfy.model_base.SDXL(model_config, model_type=comfy.model_base.ModelType.EPS)
    tiny._init_weights_(base.diffusion_model, seed=0)  # randn / sqrt(fan_in): small, well-scaled activations
    base.diffusion_model.to(storage)
    model = comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                             offload_device=comfy.model_management.unet_offload_device())
    subjects = pack_module("text.subjects").resolve_subjects(clip.tokenizer, PROMPT, SUBJECTS)
    generator = torch.Generator().manual_seed(1)
    context = config["context_dim"]

    def cond():
        extra = {}
        if family == "sdxl":
            extra = {"pooled_output": torch.randn(1, 1280, generator=generator), "width": 512, "height": 512}
        return [[torch.randn(1, 77, context, generator=generator), extra]]

    return model, cond(), cond(), subjects


def _build_full_dit(name: str, storage, manual_cast):
    """SD3.5 medium's MMDiT-X or Flux.1's blocks at full width, built as ComfyUI's checkpoint loader builds them
    (the detected unet_config, the family's supported_models class and its get_model), small random weights.
    Conditioning: random tensors of the text encoders' shapes; SUBJECTS: the real tokenizers' positions of the
    prompt's words (SD3: 77 CLIP positions, then 77 T5 ones; Flux: the 256 T5 positions), no fingerprints (the
    positive holds one cond)."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import torch
    tiny = pack_module("runner.tiny_models")
    if name == "sd35":
        import comfy.text_encoders.sd3_clip as text_module
        model_config = comfy.supported_models.SD3(dict(DIT_CONFIGS[name], dtype=storage))
        tokenizer = text_module.SD3Tokenizer()
    else:
        import comfy.ldm.flux.model
        import comfy.text_encoders.flux as text_module
        fields = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)} | {"image_model"}
        config = {k: v for k, v in DIT_CONFIGS[name].items() if k in fields}  # the fields this host's Flux has
        model_config = comfy.supported_models.Flux(dict(config, dtype=storage))
        tokenizer = text_module.FluxTokenizer()
    model_config.set_inference_dtype(storage, manual_cast)
    base = model_config.get_model({})
    tiny._init_weights_(base.diffusion_model, seed=0)  # randn / sqrt(fan_in): small, well-scaled activations
    tiny._init_dit_buffers_(base.diffusion_model)      # MMDiT's sin-cos position embedding
    base.diffusion_model.to(storage)
    model = comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                             offload_device=comfy.model_management.unet_offload_device())
    subjects = pack_module("text.subjects").resolve_subjects(tokenizer, PROMPT, SUBJECTS)
    generator = torch.Generator().manual_seed(1)
    pooled = 2048 if name == "sd35" else 768  # SD3: CLIP-L (768) + CLIP-G (1280) pooled; Flux: CLIP-L's

    def cond(extra=None):
        values = {"pooled_output": torch.randn(1, pooled, generator=generator), **(extra or {})}
        return [[torch.randn(1, subjects.num_tokens, 4096, generator=generator), values]]

    positive = cond({"guidance": FLUX_GUIDANCE} if name == "flux-width" else None)
    return model, positive, cond(), subjects


class _Probe:
    """A SAMPLER that, instead of sampling, hands the prepared CFG guider to `body` (then returns the latent)."""

    def __new__(cls, body):
        import comfy.samplers

        class Probe(comfy.samplers.KSAMPLER):
            def __init__(self):
                super().__init__(None)

            def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                       disable_pbar=False):
                body(model_wrap, sigmas, extra_args, noise, latent_image)
                return latent_image

        return Probe()


BLOCK_COST_MODELS = ("flux-width",)


class FluxBlocks:
    """One double block (the last) and one single block (the first) of a Flux model, run alone on the inputs they
    got in a real model call: forward on a plain step's inputs (inference mode, as a sampler step runs them), and
    forward + backward to their inputs on a guided pass's, as the guided pass runs them (the capture's
    differentiable maps of the captured double block, feed-forwards recomputed or stored, frozen weights). From
    these the flux-width numbers are extrapolated to Flux.1's 19 double + 38 single blocks (see `report`)."""

    def __init__(self, diffusion_model, capture, plain, guided):
        import torch
        self.torch = torch
        self.model, self.capture = diffusion_model, capture
        self.blocks = {"double": diffusion_model.double_blocks[-1], "single": diffusion_model.single_blocks[0]}
        self.plain_inputs = self._grab(plain)
        self.guided_inputs = self._grab(guided)  # a full guided pass: every block runs
        self.cotangents: dict = {}

    def _grab(self, run) -> dict:
        """{kind: (args, kwargs, the capture's ForwardState)} of each block's first call during run()."""
        torch = self.torch
        grabbed, needs_grad = {}, []

        def held(value):
            if isinstance(value, torch.Tensor):
                copy_ = value.detach().clone()
                if value.requires_grad:  # on the latent's path: a leaf of the block's backward
                    needs_grad.append(copy_)
                return copy_
            return dict(value) if isinstance(value, dict) else value  # transformer_options: this block's index

        def hook(kind):
            def pre_hook(_module, args, kwargs):
                if kind not in grabbed:
                    with torch.no_grad():
                        grabbed[kind] = (tuple(held(a) for a in args), {k: held(v) for k, v in kwargs.items()},
                                         copy.copy(self.capture.forward))
            return pre_hook
        handles = [block.register_forward_pre_hook(hook(kind), with_kwargs=True) for kind, block in self.blocks.items()]
        try:
            run()
        finally:
            for handle in handles:
                handle.remove()
        for tensor in needs_grad:
            tensor.requires_grad_(True)
        return grabbed

    def _fresh(self, args, kwargs):
        """Copies of the inputs for one call: Flux's blocks add to their input in place (`img += ...`)."""
        def fresh(value):
            return value.clone() if isinstance(value, self.torch.Tensor) else value
        return tuple(fresh(a) for a in args), {k: fresh(v) for k, v in kwargs.items()}

    def forward(self, kind: str):
        args, kwargs, _state = self.plain_inputs[kind]
        with self.torch.inference_mode():
            args, kwargs = self._fresh(args, kwargs)
            return self.blocks[kind](*args, **kwargs)

    def guided(self, kind: str, recompute: bool, backward: bool = True, maps: bool = True):
        """The block's forward as the guided pass runs it, then (backward) the gradient to its inputs; without
        backward, the outputs, whose graph holds what the forward keeps for the backward. maps off: the capture
        does not compute the block's differentiable maps (what they cost)."""
        torch = self.torch
        dit = pack_module("attention_patch.dit")
        differentiable = pack_module("guidance.differentiable")
        cast_weights = pack_module("guidance.cast_weights")
        args, kwargs, state = self.guided_inputs[kind]
        capture = self.capture
        with torch.inference_mode(False), torch.enable_grad(), dit.differentiable_host(), \
                cast_weights.per_call_weights(self.model):
            with differentiable.GuidedPassMode(set()), differentiable.recompute_feedforward(
                    self.model, recompute, capture.feedforwards(self.model)):
                capture.begin_evaluation()
                capture.guided, capture.truncate, capture.recompute_attention = True, False, recompute
                capture.forward = copy.copy(state) if maps else None  # None: the override runs the host's alone
                try:
                    fresh_args, fresh_kwargs = self._fresh(args, kwargs)  # clones of the leaves: on their path
                    out = self.blocks[kind](*fresh_args, **fresh_kwargs)
                    outputs = list(out) if isinstance(out, (tuple, list)) else [out]
                    captured = capture.aggregated()  # the captured double block's differentiable maps
                    if captured is not None:
                        outputs.append(captured)
                finally:
                    capture.guided, capture.forward = False, None
                    capture.begin_evaluation()
            if not backward:
                return outputs
            leaves = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.requires_grad]
            outputs = [o for o in outputs if o.requires_grad]
            if kind not in self.cotangents:
                generator = torch.Generator().manual_seed(5)
                self.cotangents[kind] = [torch.randn(o.shape, generator=generator).to(o) for o in outputs]
            return torch.autograd.grad(outputs, leaves, self.cotangents[kind])

    def operations(self) -> dict:
        """Timed: forward (plain), forward + backward (guided: on = feed-forwards and attention recomputed; stored,
        as Flux's default and the full pass run it)."""
        return {"double_forward": lambda: self.forward("double"),
                "single_forward": lambda: self.forward("single"),
                "double_guided_on": lambda: self.guided("double", True),
                "double_guided_stored": lambda: self.guided("double", False),
                "double_guided_no_maps": lambda: self.guided("double", False, maps=False),
                "single_guided": lambda: self.guided("single", False)}

    def forwards(self) -> dict:
        """What each guided block forward keeps for its backward (measured while its outputs are alive)."""
        return {"double_guided_on": lambda: self.guided("double", True, backward=False),
                "double_guided_stored": lambda: self.guided("double", False, backward=False),
                "single_guided": lambda: self.guided("single", False, backward=False)}


def first_guided_gradient(model, positive, negative, subjects, args):
    """dL/dx of the first guided step (A&E loss) as the guided sampler computes it, through ComfyUI's sampling
    set-up (so the model is loaded as the host decides: fully, or partially with --lowvram)."""
    import comfy.sample
    import comfy.samplers
    import torch
    sampler_module = pack_module("guidance.sampler")
    grads = []

    def update(self, x, total, sigma, step_size, active=None):
        grads.append(torch.autograd.grad(total.sum(), [x], retain_graph=True)[0].double().cpu())
        return original(self, x, total, sigma, step_size, active)

    original = sampler_module.GuidanceRun.update
    latent = torch.zeros(1, latent_channels(model), args.latent, args.latent)
    noise = comfy.sample.prepare_noise(latent, 0)
    config = sampler_module.GuidanceConfig(refinement=(), guidance_end=1.0)  # the one step given
    sampler = sampler_module.AttentionSampler(comfy.samplers.sampler_object("euler"), subjects, config,
                                              record_maps=False)
    sigmas = comfy.samplers.KSampler(model, steps=50, device=model.load_device, sampler="euler", scheduler="normal",
                                     denoise=1.0, model_options=model.model_options).sigmas[:2]
    sampler_module.GuidanceRun.update = update
    try:
        with torch.inference_mode():
            comfy.sample.sample_custom(model, noise, CFG[FAMILY[args.worker]], sampler, sigmas, positive, negative,
                                       latent, disable_pbar=True, seed=0)
    finally:
        sampler_module.GuidanceRun.update = original
    return grads[0]


def measure_format_gradient(model, positive, negative, subjects, args, results: dict) -> None:
    """The gradient on weights stored in --weight-format against the same (rounded) weights stored in the compute
    dtype and fully loaded: what casting, partial loading and streaming must not change."""
    import contextlib

    import comfy.model_management
    import comfy.model_patcher
    import torch
    gradient = first_guided_gradient(model, positive, negative, subjects, args)
    dtype = getattr(torch, DTYPES[args.dtype])
    with torch.inference_mode():
        twin, *_ = _build_model(args.worker, args.dtype, args.dtype)
        state = {k: v.to(dtype) for k, v in model.model.diffusion_model.state_dict().items()}
        twin.model.diffusion_model.load_state_dict(state)
    # the twin fully loaded even under --lowvram: that is the gradient to equal
    normal = getattr(comfy.model_management.VRAMState, "NORMAL_VRAM", None)
    saved_state = comfy.model_management.vram_state
    with contextlib.ExitStack() as stack:
        if normal is not None and saved_state in (comfy.model_management.VRAMState.LOW_VRAM,
                                                  comfy.model_management.VRAMState.NO_VRAM):
            comfy.model_management.vram_state = normal
            stack.callback(setattr, comfy.model_management, "vram_state", saved_state)
        reference = first_guided_gradient(twin, positive, negative, subjects, args)
    results["format_grad_rel_err"] = float((gradient - reference).norm() / reference.norm())
    results["partially_loaded"] = any(getattr(m, "comfy_cast_weights", False) and not m.__class__.__module__.endswith(
        "manual_cast") for m in model.model.diffusion_model.modules())


def measure_steps(model, positive, negative, subjects, args, results: dict) -> None:
    """plain / guide (truncated, full) times and memory, and the gradient check, inside a real sampling setup."""
    import comfy.sample
    import comfy.samplers
    import torch
    sampler_module = pack_module("guidance.sampler")
    capture_module = pack_module("attention_patch.capture")
    record_module = pack_module("attention_patch.record")
    clock, peak = Clock(args.device), PeakMemory(args.device)
    steps, step = 50, 1  # one early step of A&E's 50-step schedule (refinement is off: any step is alike)

    def body(model_wrap, sigmas, extra_args, noise, latent_image):
        sigma = sigmas[step]
        s_in = torch.ones(noise.shape[0], device=noise.device)
        model_sampling = model_wrap.inner_model.model_sampling
        x = model_sampling.noise_scaling(sigma, noise, latent_image)
        layout = pack_module("attention_patch.families").select_capture(model_wrap.inner_model.diffusion_model,
                                                                        noise.shape)
        layers, resolution = layout.units, layout.resolution
        binding = sampler_module.bind_subjects(subjects, model_wrap.conds)
        capture = capture_module.AttentionCapture.for_layout(layout, binding.cond.get("uuid"))
        options = capture.install(extra_args["model_options"])
        model_k = comfy.samplers.KSamplerX0Inpaint(model_wrap, sigmas)
        model_k.latent_image, model_k.noise = latent_image, noise
        record = record_module.AttentionRecord(subjects, resolution, total_steps=steps)
        config = sampler_module.GuidanceConfig(loss_weights={"attend_and_excite": 1.0}, refinement=())
        variants = {  # (truncate_pass, recompute: None = the family's choice, or feed-forwards and attention both)
            "guide": (True, None),          # the pack's default
            "guide_stored": (True, False),  # truncated, activations stored
            "guide_full": (False, False),   # the naive full-pass backward (what the reference pays)
        }
        runs = {name: sampler_module.GuidanceRun(
                    model_k, options, capture, binding,
                    dataclasses.replace(config, truncate_pass=truncate, recompute_feedforward=recompute,
                                        recompute_attention=recompute), record, steps)
                for name, (truncate, recompute) in variants.items()}
        if args.weight_format != args.dtype:  # the same pass with autograd keeping the cast weights (no re-cast)
            runs["guide_kept"] = sampler_module.GuidanceRun(model_k, options, capture, binding,
                                                            dataclasses.replace(config, recast_weights=False), record,
                                                            steps)
        operations = {
            "plain": lambda: model_wrap(x, sigma * s_in, model_options=extra_args["model_options"],
                                        seed=extra_args.get("seed")),
            **{name: (lambda run=run: run.guide(x, step, sigma)) for name, run in runs.items()},
        }
        for operation in operations.values():  # warm-up: first-call allocations and kernel choices
            operation()
        results["attention_resolution"] = list(resolution)
        results["captured_layers"] = len(layers)
        blocks = None
        if args.worker in BLOCK_COST_MODELS:
            blocks = FluxBlocks(model_wrap.inner_model.diffusion_model, capture, operations["plain"],
                                lambda: runs["guide_full"].guide(x, step, sigma))
            results["blocks"] = [len(blocks.model.double_blocks), len(blocks.model.single_blocks)]
            results["recompute_default"] = list(capture.recompute_defaults())  # (feed-forwards, attention)
        if args.measure == "memory":
            results["peak_bytes"] = {name: peak(operation) for name, operation in operations.items()}
            results["peak_bytes_repeat"] = {name: peak(operation) for name, operation in operations.items()}
            if blocks is not None:
                results["block_kept_bytes"] = {name: peak.retained(operation)
                                               for name, operation in blocks.forwards().items()}
                results["block_peak_bytes"] = {name: peak(operation) for name, operation in blocks.operations().items()}
            return
        if blocks is not None:
            operations.update({f"block_{name}": operation for name, operation in blocks.operations().items()})
            for name, operation in blocks.operations().items():  # warm-up
                operation()
        times = {name: [] for name in operations}
        for _ in range(args.reps):  # interleaved, so drift of a shared machine hits all alike
            for name, operation in operations.items():
                times[name].append(clock(operation)[0])
        results["seconds"] = {name: statistics.median(values) for name, values in times.items()}
        results["seconds_all"] = times

        grads = {}
        cast_weights = pack_module("guidance.cast_weights")
        with torch.inference_mode(False), torch.enable_grad(), pack_module("attention_patch.dit").differentiable_host(), \
                cast_weights.per_call_weights(model_wrap.inner_model.diffusion_model):
            for name, run in runs.items():
                latent = x.detach().clone().requires_grad_(True)
                total, _terms, _maps = run.loss(latent, sigma)
                grads[name] = torch.autograd.grad(total.sum(), [latent])[0].double()
        scale = grads["guide_full"].abs().max().clamp(min=1e-30)
        results["grad_max_rel_err"] = {name: float((grads[name] - grads["guide_full"]).abs().max() / scale)
                                       for name in ("guide", "guide_stored")}
        results["grad_max_abs"] = float(grads["guide_full"].abs().max())

    latent = torch.zeros(1, latent_channels(model), args.latent, args.latent)
    noise = comfy.sample.prepare_noise(latent, 0)
    sigmas = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler="euler",
                                     scheduler="normal", denoise=1.0, model_options=model.model_options).sigmas
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        comfy.sample.sample_custom(model, noise, CFG[FAMILY[args.worker]], _Probe(body), sigmas, positive, negative,
                                   latent, disable_pbar=True, seed=0)


def latent_channels(model) -> int:
    return int(model.model.latent_format.latent_channels)


def measure_parity(model, positive, negative, subjects, args, results: dict) -> None:
    """Attention KSampler (no guidance, record_maps off) vs KSampler, interleaved, medians."""
    import torch

    import nodes
    ksampler = pack_module("nodes.sampler").AttentionKSampler
    latent = {"samples": torch.zeros(1, latent_channels(model), args.latent, args.latent)}
    steps = args.parity_steps
    cfg = CFG[FAMILY[args.worker]]
    clock = Clock(args.device)
    runs = {
        "ksampler": lambda: nodes.common_ksampler(model, 0, steps, cfg, "euler", "normal", positive, negative,
                                                  latent)[0]["samples"],
        "attention_ksampler": lambda: ksampler.execute(model, 0, steps, cfg, "euler", "normal", positive, negative,
                                                       latent, 1.0, subjects, 0, False).args[0]["samples"],
    }
    times = {name: [] for name in runs}
    outputs = {}
    with torch.inference_mode():
        for name, run in runs.items():  # warm-up
            outputs[name] = run()
        for _ in range(args.parity_reps):
            for name, run in runs.items():
                times[name].append(clock(run)[0] / steps)
    results["parity_seconds_per_step"] = {name: statistics.median(values) for name, values in times.items()}
    results["parity_all"] = times
    results["parity_max_abs_diff"] = float((outputs["ksampler"] - outputs["attention_ksampler"]).abs().max())


def measure_reference(model, subjects, args, results: dict) -> None:
    """diffusers' Attend-and-Excite pipeline on the same weights: guided step time vs a plain CFG evaluation."""
    try:
        import diffusers  # noqa: F401
    except ImportError:
        results["reference"] = "n/a: diffusers is not installed"
        return
    if FAMILY[args.worker] in ("sd3", "flux"):
        results["reference"] = "n/a: diffusers has no Attend-and-Excite pipeline for SD3 or Flux"
        return
    if model.model.model_config.unet_config.get("adm_in_channels"):
        results["reference"] = "n/a: diffusers has no Attend-and-Excite pipeline for SDXL"
        return
    sys.path.insert(0, str(PACK_DIR / "tests"))
    try:
        from reference.diffusers_twin import attend_and_excite_pipeline, ddim_scheduler, diffusers_unet
    except ImportError as error:
        results["reference"] = f"n/a: tests/reference/diffusers_twin.py not importable ({error})"
        return
    import torch
    device = torch.device(args.device)
    dtype = model.model.diffusion_model.dtype
    unet = diffusers_unet(model.model).to(device, dtype)
    pipe = attend_and_excite_pipeline(unet, ddim_scheduler(), find_host()).to(device)
    context = unet.config.cross_attention_dim
    generator = torch.Generator().manual_seed(3)
    embeds = torch.randn(1, 77, context, generator=generator).to(device, dtype)
    negative = torch.randn(1, 77, context, generator=generator).to(device, dtype)
    indices = [subject.token_positions[0] for subject in subjects.subjects]
    clock = Clock(args.device)
    stamps = []

    def callback(step, timestep, latents):
        clock.sync()
        stamps.append(time.perf_counter())

    steps = args.reps + 2  # the first two intervals (setup, warm-up step) are dropped
    side = args.latent * 8
    clock.sync()
    stamps.append(time.perf_counter())
    pipe(prompt=None, prompt_embeds=embeds, negative_prompt_embeds=negative, token_indices=indices,
         num_inference_steps=steps, max_iter_to_alter=steps, thresholds={}, height=side, width=side,
         attn_res=(args.latent // 4, args.latent // 4), output_type="latent", callback=callback,
         generator=torch.Generator().manual_seed(0))
    intervals = [b - a for a, b in zip(stamps[:-1], stamps[1:])][2:]
    # plain: the same UNet with diffusers' default attention (the pipeline puts it back after the call)
    latents = torch.randn(2, 4, args.latent, args.latent, generator=generator).to(device, dtype)
    hidden = torch.cat([negative, embeds])
    timestep = pipe.scheduler.timesteps[1]
    plain = []
    with torch.no_grad():
        unet(latents, timestep, encoder_hidden_states=hidden)  # warm-up
        for _ in range(args.reps):
            plain.append(clock(lambda: unet(latents, timestep, encoder_hidden_states=hidden))[0])
    guided_step, plain_step = statistics.median(intervals), statistics.median(plain)
    results["reference"] = {"guided_step": guided_step, "plain_step": plain_step,
                            "overhead": (guided_step - plain_step) / plain_step, "intervals": intervals,
                            "plain_all": plain, "diffusers": diffusers.__version__}


def worker(args) -> int:
    if args.pytorch_attention:
        # ComfyUI reads its options from comfy.cli_args when comfy.model_management is imported; the boot imports
        # cli_args without parsing a command line, so the option is set on it before the boot
        host = str(find_host())
        if host not in sys.path:
            sys.path.insert(0, host)
        from comfy.cli_args import args as host_options
        host_options.use_pytorch_cross_attention = True
    boot_host(args.device, args.host_args.split())
    import comfy.ldm.modules.attention
    import comfy.utils
    import torch
    comfy.utils.PROGRESS_BAR_ENABLED = False
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results: dict = {"model": args.worker, "threads": torch.get_num_threads(), "torch": torch.__version__,
                     "dtype": args.dtype, "attention": comfy.ldm.modules.attention.optimized_attention.__name__}
    model, positive, negative, subjects = build_model(args.worker, args.device, args.dtype, args.weights,
                                                      args.weight_format)
    results["weight_format"] = args.weight_format
    results["weight_bytes"] = sum(p.numel() * p.element_size() for p in model.model.diffusion_model.parameters())
    results["weights_are_inference_tensors"] = next(model.model.diffusion_model.parameters()).is_inference()
    results["parameters"] = sum(p.numel() for p in model.model.diffusion_model.parameters())
    results["build_seconds"] = time.perf_counter() - started
    log = lambda what: print(f"  [{args.worker}] {what} ({time.perf_counter() - started:.0f} s)",  # noqa: E731
                             file=sys.stderr, flush=True)
    log(f"built, {results['parameters'] / 1e6:.1f} M parameters")
    measure_steps(model, positive, negative, subjects, args, results)
    log(f"steps measured ({args.measure})")
    if args.measure == "memory":
        print("RESULT " + json.dumps(results), flush=True)
        return 0
    if args.weight_format != args.dtype or args.host_args:
        measure_format_gradient(model, positive, negative, subjects, args, results)
        log("weight-format gradient measured")
    if args.parity_reps > 0:
        measure_parity(model, positive, negative, subjects, args, results)
        log("parity measured")
    else:
        results["parity_seconds_per_step"] = None
    if args.reference:
        measure_reference(model, subjects, args, results)
        log("reference measured")
    else:
        results["reference"] = "n/a: skipped (--no-reference)"
    print("RESULT " + json.dumps(results), flush=True)
    return 0


# ================================================================ driver

def run_worker(name: str, args, reps: int, parity_reps: int, parity_steps: int, measure: str,
               weight_format: str) -> dict:
    """One model in a fresh process: times (and parity, reference, gradient checks) or memory."""
    latent = args.tiny_latent if name.startswith("tiny-") else args.latent
    dtype = args.dit_dtype if name in FULL_DIT else args.dtype
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--measure", measure,
               "--device", args.device, "--dtype", dtype, "--latent", str(latent), "--weights", args.weights,
               "--reps", str(reps), "--parity-reps", str(parity_reps), "--parity-steps", str(parity_steps),
               "--weight-format", weight_format, f"--host-args={args.host_args}"]
    if not args.reference:
        command.append("--no-reference")
    if args.pytorch_attention:
        command.append("--pytorch-attention")
    if args.threads:
        command += ["--threads", str(args.threads)]
    env = dict(os.environ)
    if measure == "memory":  # freed tensors leave the RSS; not for timing (every large allocation is an mmap)
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    process = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)
    for line in process.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"worker for {name} failed (exit {process.returncode}); output:\n{process.stdout[-3000:]}")


def mib(value) -> str:
    return "n/a" if value is None else f"{value / 2 ** 20:.0f}"


def report(all_results: list[dict], args) -> str:
    built = "inside" if args.weights == "inference" else "outside"
    lines = [f"guidance_cost: device {args.device}, dtype {args.dtype} (full models), torch {all_results[0]['torch']}, "
             f"{all_results[0]['threads']} threads, UNet built {built} inference_mode;",
             f"latent {args.latent}x{args.latent} (full models), {args.tiny_latent}x{args.tiny_latent} (tiny); "
             "medians; A&E loss, no refinement",
             "",
             "seconds per step; overhead = guided step / plain step (what a guided step adds to a plain step)",
             "guide = the pack's default guided pass (truncated; recomputed in the backward: UNets their feed-forwards, "
             "SD3 feed-forwards and attention, Flux nothing);",
             "stored = truncated, activations stored; full = full model forward + backward, all stored",
             f"{'model':<10} {'reps':>4} {'plain':>8} {'guide':>8} {'stored':>8} {'full':>8} {'ovh':>6} "
             f"{'ovh-st':>6} {'ovh-full':>8} {'ref-ovh':>7} {'ours/ref':>8}  grad rel err (guide, stored vs full)"]
    dits = [r["model"] for r in all_results if r["model"] in DIT_MODELS]
    if dits or args.pytorch_attention:
        attention = sorted({r.get("attention", "?") for r in all_results})
        lines[0] = lines[0].replace(" threads,", f" threads, host attention {', '.join(attention)}"
                                               f"{' (--pytorch-attention)' if args.pytorch_attention else ''},")
    if dits:
        full_dits = [m for m in dits if m in FULL_DIT]
        if full_dits:
            lines[0] = lines[0].replace(" (full models)", f" (full models; {', '.join(full_dits)}: {args.dit_dtype})")
        lines[0] = lines[0].replace("UNet built", "models built")
        lines[5] = lines[5].replace("full UNet forward", "full model forward")
        lines[1:1] = ["DiT models (" + ", ".join(dits) + "): plain = one CFG evaluation as the family samples, SD3 cond + "
                      f"uncond (cfg {CFG['sd3']}), Flux.1 dev the cond alone (cfg {CFG['flux']}, guidance "
                      f"{FLUX_GUIDANCE}); captured blocks: SD3 every joint block, Flux its double blocks"]
    checks = []
    for r in all_results:
        s = r["seconds"]
        overhead = {name: s[name] / s["plain"] for name in ("guide", "guide_stored", "guide_full")}
        reference = r["reference"]
        if isinstance(reference, dict):
            ref_cell, ratio_cell = f"{reference['overhead']:.2f}", f"{overhead['guide'] / reference['overhead']:.2f}"
            checks.append((f"{r['model']}: our overhead <= 0.5x the reference pipeline's",
                           overhead["guide"] <= 0.5 * reference["overhead"],
                           f"{overhead['guide']:.2f} vs 0.5 x {reference['overhead']:.2f}"))
        else:
            ref_cell = ratio_cell = "n/a"
        errors = r["grad_max_rel_err"]
        lines.append(f"{r['model']:<10} {len(r['seconds_all']['plain']):>4} {s['plain']:>8.3f} {s['guide']:>8.3f} "
                     f"{s['guide_stored']:>8.3f} {s['guide_full']:>8.3f} {overhead['guide']:>6.2f} "
                     f"{overhead['guide_stored']:>6.2f} {overhead['guide_full']:>8.2f} {ref_cell:>7} {ratio_cell:>8}  "
                     f"{errors['guide']:.1e}, {errors['guide_stored']:.1e}")
        checks.append((f"{r['model']}: the guided pass's gradient equals the full pass's (max rel err <= 1e-5)",
                       max(errors.values()) <= 1e-5, f"{max(errors.values()):.1e}"))
    lines += ["", "reference (diffusers StableDiffusionAttendAndExcitePipeline, same weights):"]
    for r in all_results:
        reference = r["reference"]
        if isinstance(reference, dict):
            lines.append(f"  {r['model']}: guided step {reference['guided_step']:.3f} s (median of "
                         f"{len(reference['intervals'])}), plain CFG eval {reference['plain_step']:.3f} s, overhead "
                         f"{reference['overhead']:.2f} (diffusers {reference['diffusers']})")
        else:
            lines.append(f"  {r['model']}: {reference}")

    unit = "bytes allocated (torch.cuda)" if args.device == "cuda" else "resident set (VmHWM - VmRSS before)"
    lines += ["", f"peak extra memory, MiB ({unit}); two measurements each",
              f"{'model':<10} {'plain':>11} {'guide':>11} {'stored':>11} {'full':>11} {'guide/full':>10} "
              f"{'stored/full':>11} {'guide/plain':>11}"]
    for r in all_results:
        p, q = r["peak_bytes"], r["peak_bytes_repeat"]
        names = ("plain", "guide", "guide_stored", "guide_full")
        cells = [f"{mib(p[k])}/{mib(q[k])}" for k in names]
        peak = {k: max(p[k], q[k]) if p[k] is not None else None for k in names}
        if peak["guide_full"]:
            ratio = peak["guide"] / peak["guide_full"]
            if r["model"] not in BLOCK_COST_MODELS:  # judged extrapolated to the whole model (block_report)
                checks.append((f"{r['model']}: guided-pass peak memory <= 0.6x the full-pass backward's",
                               ratio <= 0.6, f"{ratio:.2f}"))
            vs_plain = peak["guide"] / peak["plain"] if peak["plain"] else float("nan")
            lines.append(f"{r['model']:<10} {cells[0]:>11} {cells[1]:>11} {cells[2]:>11} {cells[3]:>11} {ratio:>10.2f} "
                         f"{peak['guide_stored'] / peak['guide_full']:>11.2f} {vs_plain:>11.2f}")
        else:
            lines.append(f"{r['model']:<10} " + " ".join(f"{c:>11}" for c in cells) + "  (n/a)")

    for r in all_results:
        if "blocks" in r and "block_double_forward" in r["seconds"]:
            lines += [""] + block_report(r, checks)

    lines += ["", "unguided sampling: Attention KSampler (record_maps off, no guidance) vs KSampler, s/step",
              f"{'model':<10} {'reps':>4} {'steps':>5} {'KSampler':>9} {'ours':>9} {'ratio':>7}  max |diff|"]
    for r in all_results:
        parity = r["parity_seconds_per_step"]
        if parity is None:
            lines.append(f"{r['model']:<10}  (not measured)")
            continue
        ratio = parity["attention_ksampler"] / parity["ksampler"]
        lines.append(f"{r['model']:<10} {len(r['parity_all']['ksampler']):>4} {r.get('parity_steps', ''):>5} "
                     f"{parity['ksampler']:>9.3f} {parity['attention_ksampler']:>9.3f} {ratio:>7.3f}  "
                     f"{r['parity_max_abs_diff']:.1e}")
        checks.append((f"{r['model']}: unguided steps within 5% of KSampler", ratio <= 1.05, f"{ratio:.3f}"))

    lines += ["", "targets:"]
    lines += [f"  {'PASS' if ok else 'FAIL'}  {what}: {detail}" for what, ok, detail in checks]
    return "\n".join(lines)


def block_report(r: dict, checks: list) -> list[str]:
    """flux-width's per-block costs, and its step times and memory extrapolated to Flux.1's 19 double + 38 single
    blocks (each extra block costs what the measured one does: same width, same tokens)."""
    s = r["seconds"]
    doubles, singles = r["blocks"]
    extra_d, extra_s = FLUX1_BLOCKS[0] - doubles, FLUX1_BLOCKS[1] - singles
    d, sb = s["block_double_forward"], s["block_single_forward"]
    g_on, g_st, g_s = s["block_double_guided_on"], s["block_double_guided_stored"], s["block_single_guided"]
    default_on = any(r.get("recompute_default", (False, False)))  # Flux's family default: store
    g = g_on if default_on else g_st
    rest = s["plain"] - doubles * d - singles * sb
    plain = s["plain"] + extra_d * d + extra_s * sb
    guided = {"guide": s["guide"] + extra_d * g, "guide_stored": s["guide_stored"] + extra_d * g_st,
              "guide_full": s["guide_full"] + extra_d * g_st + extra_s * g_s,
              # not run as a whole pass: the stored pass with every double block as the "on" block costs
              "guide_on": s["guide_stored"] + doubles * (g_on - g_st) + extra_d * g_on}
    name = r["model"]
    lines = [f"per block ({name}: Flux.1's blocks at full width, {doubles} double + {singles} single; s, medians): "
             "forward as a plain step runs it; fwd+bwd as the guided pass runs it",
             f"{'model':<10} {'double':>8} {'single':>8} {'double fwd+bwd':>14} {'(on)':>9} {'(no maps)':>9} "
             f"{'single fwd+bwd':>14} {'rest of plain':>13}",
             f"{name:<10} {d:>8.3f} {sb:>8.3f} {g_st:>14.3f} {g_on:>9.3f} "
             f"{s.get('block_double_guided_no_maps', 0):>9.3f} {g_s:>14.3f} {rest:>13.3f}",
             "  (double fwd+bwd: the captured block with its differentiable maps, activations stored (Flux's default,",
             "   as in the stored and full passes), or with feed-forwards and attention recomputed in the backward",
             "   (recompute_feedforward on), or stored and without the maps (what they cost);",
             "   rest of plain = plain - the blocks: embeddings, final layer, the sampler's CFG function)",
             f"extrapolated to Flux.1 ({FLUX1_BLOCKS[0]} double + {FLUX1_BLOCKS[1]} single blocks): plain = rest + "
             f"{FLUX1_BLOCKS[0]} x double + {FLUX1_BLOCKS[1]} x single;",
             f"  guide, stored = the measured pass + {extra_d} more double blocks' fwd+bwd (the truncated pass runs "
             f"the embeddings and the {FLUX1_BLOCKS[0]} double blocks); on = stored with every double block's "
             "fwd+bwd as the (on) column's;",
             f"  full = the measured full pass + {extra_d} double + {extra_s} single blocks' fwd+bwd",
             f"{'model':<10} {'plain':>8} {'guide':>8} {'stored':>8} {'on':>8} {'full':>8} {'ovh':>6} {'ovh-st':>6} "
             f"{'ovh-on':>6} {'ovh-full':>8}",
             f"{'Flux.1':<10} {plain:>8.3f} {guided['guide']:>8.3f} {guided['guide_stored']:>8.3f} "
             f"{guided['guide_on']:>8.3f} {guided['guide_full']:>8.3f} {guided['guide'] / plain:>6.2f} "
             f"{guided['guide_stored'] / plain:>6.2f} {guided['guide_on'] / plain:>6.2f} "
             f"{guided['guide_full'] / plain:>8.2f}"]
    checks.append((f"{name} extrapolated to Flux.1: guided step overhead <= 1.0x a plain step",
                   guided["guide"] / plain <= 1.0,
                   f"{guided['guide'] / plain:.2f} ({guided['guide']:.2f} s vs {plain:.2f} s)"))
    kept = r.get("block_kept_bytes")
    if kept and all(v is not None for v in kept.values()):
        p, q = r["peak_bytes"], r["peak_bytes_repeat"]
        peak = {k: max(p[k], q[k]) for k in ("guide", "guide_stored", "guide_full")}
        kept_default = kept["double_guided_on"] if default_on else kept["double_guided_stored"]
        memory = {"guide": peak["guide"] + extra_d * kept_default,
                  "guide_stored": peak["guide_stored"] + extra_d * kept["double_guided_stored"],
                  "guide_on": peak["guide_stored"] + FLUX1_BLOCKS[0] * kept["double_guided_on"]
                  - doubles * kept["double_guided_stored"],
                  "guide_full": peak["guide_full"] + extra_d * kept["double_guided_stored"]
                  + extra_s * kept["single_guided"]}
        block_peaks = r.get("block_peak_bytes") or {}
        lines += [f"memory a block's guided forward keeps for its backward, MiB: double "
                  f"{mib(kept['double_guided_stored'])} (on {mib(kept['double_guided_on'])}), single "
                  f"{mib(kept['single_guided'])}; peak of one block's fwd+bwd: double "
                  f"{mib(block_peaks.get('double_guided_stored'))} (on {mib(block_peaks.get('double_guided_on'))}), "
                  f"single {mib(block_peaks.get('single_guided'))}",
                  "extrapolated peak memory = the measured peak + the extra blocks' kept memory, MiB: "
                  f"guide {mib(memory['guide'])}, stored {mib(memory['guide_stored'])}, on {mib(memory['guide_on'])}, "
                  f"full {mib(memory['guide_full'])}; guide/full {memory['guide'] / memory['guide_full']:.2f}, "
                  f"stored/full {memory['guide_stored'] / memory['guide_full']:.2f}, "
                  f"on/full {memory['guide_on'] / memory['guide_full']:.2f}"]
        ratio = memory["guide"] / memory["guide_full"]
        checks.append((f"{name} extrapolated to Flux.1: guided-pass peak memory <= 0.6x the full-pass backward's",
                       ratio <= 0.6, f"{ratio:.2f}"))
    return lines


def _ratio(a, b) -> str:
    return "n/a" if not a or not b else f"{a / b:.2f}"


def format_report(all_results: list[dict], args) -> str:
    """Per weight format: guided-pass peak memory against the weights and the --dtype run, time per guided step,
    and the gradient against the same weights in --dtype fully loaded."""
    lines = [f"weight formats (computed in {args.dtype}{', ComfyUI ' + args.host_args if args.host_args else ''}): "
             "peak = guided-pass peak extra memory (default pass); time = s per guided step",
             f"{'model':<10} {'format':<11} {'weights MiB':>11} {'peak MiB':>9} {'peak/weights':>12} "
             f"{'peak/base':>9} {'time':>8} {'time/base':>9} {'ovh':>5} {'recast':>6} {'peak kept':>9}  "
             f"grad rel err vs {args.dtype} fully loaded",
             "(ovh = guided step / plain step of the same format: what the guidance adds there; recast = guided step /",
             " the same pass with autograd keeping the cast weights, i.e. what making them again costs; peak kept = that",
             " pass's peak memory / the base run's)"]
    checks = []
    for r in all_results:
        base = next(b for b in all_results if b["model"] == r["model"] and b["weight_format"] == b.get("dtype", args.dtype))
        peak = max(r["peak_bytes"]["guide"], r["peak_bytes_repeat"]["guide"])
        base_peak = max(base["peak_bytes"]["guide"], base["peak_bytes_repeat"]["guide"])
        weights = r.get("weight_bytes") or base.get("weight_bytes") or float("nan")
        time_ratio = r["seconds"]["guide"] / base["seconds"]["guide"]
        error = r.get("format_grad_rel_err")
        lines.append(f"{r['model']:<10} {r['weight_format']:<11} {mib(r.get('weight_bytes')):>11} {mib(peak):>9} "
                     f"{peak / weights:>12.2f} {peak / base_peak:>9.2f} {r['seconds']['guide']:>8.3f} "
                     f"{time_ratio:>9.2f} {r['seconds']['guide'] / r['seconds']['plain']:>5.2f} "
                     f"{_ratio(r['seconds'].get('guide'), r['seconds'].get('guide_kept')):>6} "
                     f"{_ratio(max(r['peak_bytes'].get('guide_kept') or 0, r['peak_bytes_repeat'].get('guide_kept') or 0) or None, base_peak):>9}  "
                     f"{'n/a (baseline)' if error is None else f'{error:.1e}'}")
        if r is base and not args.host_args:
            continue
        if r is not base:
            checks.append((f"{r['model']} {r['weight_format']}: guided-pass extra memory <= 1.05x the {args.dtype} "
                           "run's", peak / base_peak <= 1.05, f"{peak / base_peak:.2f}"))
            checks.append((f"{r['model']} {r['weight_format']}: time per guided step <= 1.3x the {args.dtype} run's",
                           time_ratio <= 1.3, f"{time_ratio:.2f}"))
            kept = r["seconds"].get("guide_kept")
            if kept:
                checks.append((f"{r['model']} {r['weight_format']}: making the cast weights again costs <= 1.3x "
                               "the pass that keeps them", r["seconds"]["guide"] / kept <= 1.3,
                               f"{r['seconds']['guide'] / kept:.2f}"))
        if error is not None:
            checks.append((f"{r['model']} {r['weight_format']}: gradient equals the fully loaded {args.dtype} one "
                           "(rel err <= 1e-4)", error <= 1e-4, f"{error:.1e}"))
    lines += ["", "weight-format targets:"]
    lines += [f"  {'PASS' if ok else 'FAIL'}  {what}: {detail}" for what, ok, detail in checks]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="full models' weights (default fp32 cpu, fp16 cuda)")
    parser.add_argument("--models", help=f"comma separated, from {', '.join(MODELS)} (default: "
                        f"{','.join(DEFAULT_MODELS)}; --quick: tiny-sd15,tiny-sdxl)")
    parser.add_argument("--quick", action="store_true", help="tiny models only, few repetitions (< 1 minute)")
    parser.add_argument("--reps", type=int, help="repetitions, tiny models (default 7, --quick 3)")
    parser.add_argument("--full-reps", type=int, default=3, help="repetitions, full SD1.5, SD3.5 and flux-width")
    parser.add_argument("--dit-dtype", choices=tuple(DTYPES), default="bf16",
                        help="weights and compute of the full-size DiT models (sd35, flux-width; default bf16, as "
                             "SD3.5 and Flux.1 run: the weights take half of fp32's memory)")
    parser.add_argument("--sdxl-reps", type=int, default=2, help="repetitions, full SDXL")
    parser.add_argument("--parity-steps", type=int, help="steps per parity run (default: tiny 10, full 2)")
    parser.add_argument("--latent", type=int, default=64, help="latent side of the full models (64 = 512 px)")
    parser.add_argument("--tiny-latent", type=int, default=32, help="latent side of the tiny models")
    parser.add_argument("--no-reference", dest="reference", action="store_false",
                        help="skip diffusers' pipeline")
    parser.add_argument("--weights", choices=("inference", "normal"), default="inference",
                        help="build the UNets inside torch.inference_mode as ComfyUI's loaders do (parameters are "
                             "inference tensors; default), or outside (ordinary tensors)")
    parser.add_argument("--weight-format", default=None,
                        help=f"comma separated storage formats of the UNet weights, from {', '.join(WEIGHT_FORMATS)} "
                             "(default: --dtype); computed in --dtype through ComfyUI's manual cast. Formats other "
                             "than --dtype are reported against --dtype's run")
    parser.add_argument("--host-args", default="",
                        help="ComfyUI options for the workers, e.g. '--lowvram' or '--reserve-vram 100' (layers "
                             "stream; the gradient is then checked against the fully loaded one)")
    parser.add_argument("--pytorch-attention", action="store_true",
                        help="ComfyUI's --use-pytorch-cross-attention in the workers: torch's scaled_dot_product_attention, "
                             "what ComfyUI runs on GPUs (on the CPU its default is the sub-quadratic attention, whose "
                             "backward keeps every chunk's probabilities)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--save", type=Path, help="also write the report to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--parity-reps", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=("time", "memory"), default="time", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("fp16" if args.device == "cuda" else "fp32")
    for side in (args.latent, args.tiny_latent):
        if side % 8:
            parser.error(f"latent side {side} must be a multiple of 8 (the 1/4-latent maps, SDXL's 2 downsamplings)")
    formats = (args.weight_format or args.dtype).split(",")
    unknown = [f for f in formats if f not in WEIGHT_FORMATS]
    if unknown:
        parser.error(f"unknown weight formats {unknown}; valid: {', '.join(WEIGHT_FORMATS)}")
    if args.worker:
        args.weight_format = formats[0]
        return worker(args)
    if formats != [args.dtype] and args.dtype not in formats:
        formats.insert(0, args.dtype)  # the baseline the other formats are compared with

    models = args.models.split(",") if args.models else (["tiny-sd15", "tiny-sdxl"] if args.quick
                                                         else list(DEFAULT_MODELS))
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; valid: {', '.join(MODELS)}")
    tiny_reps = args.reps or (3 if args.quick else 7)
    started = time.perf_counter()
    all_results = []
    for name in models:
        if name.startswith("tiny-"):
            reps, parity_reps, steps = tiny_reps, tiny_reps, args.parity_steps or (2 if args.quick else 10)
        else:
            reps = args.sdxl_reps if name == "sdxl" else args.full_reps
            parity_reps, steps = reps, args.parity_steps or 2
        # the full-size DiT models run in --dit-dtype (other weight formats are compared on the other models)
        for weight_format in ([args.dit_dtype] if name in FULL_DIT else formats):
            print(f"{name} ({weight_format}): {reps} reps ...", file=sys.stderr, flush=True)
            result = run_worker(name, args, reps, parity_reps, steps, "time", weight_format)
            result.update(run_worker(name, args, reps, 0, steps, "memory", weight_format))
            result["parity_steps"] = steps
            all_results.append(result)
    text = report([r for r in all_results if r["weight_format"] == r.get("dtype", args.dtype)] or all_results, args)
    if len(formats) > 1 or args.host_args:
        text += "\n\n" + format_report(all_results, args)
    emit(text + f"\n\ntotal wall time {time.perf_counter() - started:.0f} s", args.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
