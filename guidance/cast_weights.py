"""The guided pass on layers whose weight is made per call: cast (manual cast, fp8, partial loading, streaming),
patched at cast time (LoRA on a partially loaded model: `weight_function`) or produced by the layer itself
(dequantizing third-party layers built on ComfyUI's ops protocol).

Autograd would keep such a weight for the backward: a compute-precision copy of every weight the pass
touched, or, where ComfyUI streams weights through a reused cast buffer, a view that later layers overwrite.
`per_call_weights` makes these layers keep nothing of their weight: in the backward the layer's weight is
obtained again by running the layer's own forward on a one-pixel probe (so it is cast, patched or dequantized
exactly as in the forward), used for the input's gradient and freed. Layers that are neither linear nor conv2d
(norms) are recomputed from their saved input instead. Layers computing with their stored weight as it is
(the fully loaded fp16/fp32 case) keep the no-copy path of `differentiable.GuidedPassMode`.

The decision is made per call from what the ops protocol exposes (`comfy_cast_weights`, `weight_function`,
`bias_function`, the weight's type, dtype and device), so third-party layers on that protocol are covered
without knowing them by name. The model is changed only during the guided step (instance-level forwards,
removed on exit, errors included).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def weight_made_per_call(module: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether `module` computes with a weight made for this call rather than its stored tensor as it is."""
    if getattr(module, "comfy_cast_weights", False) or getattr(module, "weight_function", None) \
            or getattr(module, "bias_function", None):
        return True
    for name in ("weight", "bias"):
        stored = getattr(module, name, None)
        if stored is None:
            continue
        if type(stored) not in (torch.Tensor, torch.nn.Parameter):  # quantized / packed tensor subclasses
            return True
        if stored.device != x.device or (stored.is_floating_point() and stored.dtype != x.dtype):
            return True
    return False


class _CallRecorder(TorchFunctionMode):
    """Records the arguments of the F.linear / F.conv2d calls a layer's forward makes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.linear, F.conv2d):
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def _weight_by_probe(forward, probe: torch.Tensor):
    """(func, weight, args) of the single linear/conv2d call that `forward(probe)` makes, or None."""
    recorder = _CallRecorder()
    with torch.no_grad(), recorder:
        forward(probe)
    if len(recorder.calls) != 1:
        return None
    func, args, kwargs = recorder.calls[0]
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    values = dict(zip(names, args))
    values.update(kwargs)
    return func, values


def _not_a_view(out: torch.Tensor) -> torch.Tensor:
    """A custom Function's output that is a view may not be edited in place later (autograd forbids it, and
    Flux adds its residuals in place on layer outputs); the rare view that reaches here is copied."""
    return out.clone() if isinstance(out, torch.Tensor) and out._is_view() else out


class _PerCallWeightLayer(torch.autograd.Function):
    """y = layer(x) for a linear or conv2d layer whose weight is made per call; nothing of the weight is kept:
    the backward makes it again (layer forward on a probe) for dL/dx and frees it."""

    @staticmethod
    def forward(ctx, x, forward, probe_shape, kind):
        ctx.forward, ctx.probe_shape, ctx.kind, ctx.x_shape = forward, probe_shape, kind, x.shape
        ctx.x_dtype, ctx.x_device = x.dtype, x.device
        return _not_a_view(forward(x))

    @staticmethod
    def backward(ctx, grad):
        probe = torch.zeros(ctx.probe_shape, dtype=ctx.x_dtype, device=ctx.x_device)
        found = _weight_by_probe(ctx.forward, probe)
        if found is None:
            raise RuntimeError("a layer's weight could not be made again for the guided pass's backward")
        _func, call = found
        weight = call["weight"].to(grad.dtype)
        if ctx.kind == "linear":
            return grad.matmul(weight), None, None, None
        stride, padding = call.get("stride", 1), call.get("padding", 0)
        dilation, groups = call.get("dilation", 1), call.get("groups", 1)
        grad_x = torch.nn.grad.conv2d_input(ctx.x_shape, weight, grad, stride, padding, dilation, groups)
        return grad_x, None, None, None


class _RecomputedLayer(torch.autograd.Function):
    """y = layer(x) keeping only x: the backward runs the layer again (its weight made again) under autograd."""

    @staticmethod
    def forward(ctx, x, forward):
        ctx.forward = forward
        ctx.save_for_backward(x)
        return _not_a_view(forward(x))

    @staticmethod
    def backward(ctx, grad):
        from .differentiable import GuidedPassMode  # the layer's stored tensors may be inference tensors
        (x,) = ctx.saved_tensors
        with torch.enable_grad(), GuidedPassMode(protect_saved=False):
            x = x.detach().requires_grad_(True)
            y = ctx.forward(x)
        return torch.autograd.grad(y, [x], grad)[0], None


def _layer_kind(module, x) -> tuple[str, tuple] | None:
    """('linear' | 'conv2d', probe shape) for layers whose input gradient needs only their weight."""
    if isinstance(module, torch.nn.Linear) and x.shape[-1] == module.in_features:
        return "linear", (1, module.in_features)
    if isinstance(module, torch.nn.Conv2d) and x.ndim == 4 and module.padding_mode == "zeros" \
            and not isinstance(module.padding, str):
        kernel = module.kernel_size
        return "conv2d", (1, module.in_channels, *kernel)
    return None


def _guarded(module, forward):
    def run(*args, **kwargs):
        x = args[0] if args else None
        if (kwargs or len(args) != 1 or not isinstance(x, torch.Tensor) or not torch.is_grad_enabled()
                or not x.requires_grad or not weight_made_per_call(module, x)):
            return forward(*args, **kwargs)
        kind = _layer_kind(module, x)
        if kind is None:
            return _RecomputedLayer.apply(x, forward)
        if kind[0] == "linear" and x.ndim > 2:
            # on the rows, reshaped outside the Function: its output is then no view (the same matmul)
            out = _PerCallWeightLayer.apply(x.reshape(-1, x.shape[-1]), forward, kind[1], kind[0])
            return out.view(*x.shape[:-1], out.shape[-1])
        return _PerCallWeightLayer.apply(x, forward, kind[1], kind[0])
    return run


def _protocol_modules(model: torch.nn.Module):
    """Modules on ComfyUI's ops protocol (comfy.ops layers and third-party layers built on them)."""
    return [m for m in model.modules() if hasattr(m, "comfy_cast_weights") or hasattr(m, "weight_function")]


def per_call_weights(model: torch.nn.Module, enabled: bool = True):
    """During the block, protocol layers of `model` whose weight is made per call keep nothing of it for the
    backward (see the module docstring). Spans the guided step's forwards and backwards; undone on exit."""
    from .differentiable import wrapped_forwards
    return wrapped_forwards(_protocol_modules(model) if enabled else [], _guarded)
