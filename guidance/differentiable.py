"""A differentiable forward of the host's model inside ComfyUI's inference mode, without touching the model.

ComfyUI runs prompts under `torch.inference_mode`, so loaded weights are inference tensors, which autograd
cannot save for backward. `GuidedPassMode` makes one guided pass differentiable anyway:

- linear and conv2d layers whose weight is an inference tensor run as `frozen_weight_linear` /
  `frozen_weight_conv2d`: autograd functions whose backward gives the input's gradient only, so they hold a
  reference to the weight and save nothing (no copy of the weights, which would double the pass's memory);
- any other op that autograd records gets non-inference copies of its inference-tensor inputs, made on
  first use and dropped with the pass (norm weights and the like: small);
- ControlNet residuals of this pass are added out of place (see `GuidedPassMode`).

`recompute_feedforward` trades time for memory: the transformer blocks' feed-forward activations (the largest
share of what the pass keeps, about 45% on SDXL) are recomputed during the backward instead of stored.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint


class _FrozenWeightLinear(torch.autograd.Function):
    """linear(x, W, b) with dL/dx = dL/dy W: W is referenced, not saved (it may be an inference tensor)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.weight = weight
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        return grad.matmul(ctx.weight), None, None


class _FrozenWeightConv2d(torch.autograd.Function):
    """conv2d with the input's gradient only, the weight referenced, not saved."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.weight, ctx.input_shape, ctx.geometry = weight, x.shape, (stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        stride, padding, dilation, groups = ctx.geometry
        grad_x = torch.nn.grad.conv2d_input(ctx.input_shape, ctx.weight, grad, stride, padding, dilation, groups)
        return grad_x, None, None, None, None, None, None


def _bound(names, args, kwargs, defaults):
    values = dict(zip(names, args))
    values.update(kwargs)
    return [values.get(name, defaults.get(name)) for name in names]


def frozen_weight_linear(args, kwargs):
    x, weight, bias = _bound(("input", "weight", "bias"), args, kwargs, {})
    return _FrozenWeightLinear.apply(x, weight, bias)


def frozen_weight_conv2d(args, kwargs):
    x, weight, bias, stride, padding, dilation, groups = _bound(
        ("input", "weight", "bias", "stride", "padding", "dilation", "groups"), args, kwargs,
        {"stride": 1, "padding": 0, "dilation": 1, "groups": 1})
    if isinstance(padding, str):  # 'same' / 'valid': let autograd handle it (with a copy of the weight)
        return None
    return _FrozenWeightConv2d.apply(x, weight, bias, stride, padding, dilation, groups)


_FROZEN = {F.linear: frozen_weight_linear, F.conv2d: frozen_weight_conv2d}


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


_INPLACE_OPERATORS = {f"__i{op}__" for op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul",
                                                 "and", "or", "xor", "lshift", "rshift")}


def _is_inplace(func) -> bool:
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.startswith("__")) or name in _INPLACE_OPERATORS


class GuidedPassMode(TorchFunctionMode):
    """Makes the host's forward differentiable for one guided pass, without changing the host.

    - Inference-tensor weights of linear/conv2d layers are used as they are (frozen-weight autograd
      functions); other ops that autograd records, and in-place ops, get non-inference copies of their
      inference-tensor inputs (made once per pass). Ops off the latent's path run as they are, unrecorded.
    - The UNet adds ControlNet residuals in place (`h += ctrl` on skip tensors autograd has saved). For the
      residuals this pass produced (`residual_ids`), that add is made out of place; `h += ctrl` rebinds h to
      the result, so the forward is unchanged. Other in-place ops are left alone.
    """

    def __init__(self, residual_ids: set[int] | None = None):
        super().__init__()
        self.copies: dict[int, torch.Tensor] = {}
        self.residual_ids = residual_ids if residual_ids is not None else set()

    def _swap(self, value):
        if isinstance(value, torch.Tensor) and value.is_inference():
            copy = self.copies.get(id(value))
            if copy is None:
                copy = self.copies[id(value)] = value.clone()
            return copy
        if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
            return type(value)(self._swap(v) for v in value)
        return value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (getattr(func, "__name__", "") == "add_" and len(args) > 1 and id(args[1]) in self.residual_ids
                and args[0].requires_grad):
            func = torch.add
        inplace = _is_inplace(func)
        if not inplace and torch.is_grad_enabled():
            tensors = list(_tensors(args)) + list(_tensors(list(kwargs.values())))
            if not any(t.requires_grad and not t.is_inference() for t in tensors):
                # not on the latent's path (that is all tensors of this pass, never inference tensors): nothing
                # to record. Some hosts' inference-tensor weights have requires_grad set; no_grad keeps
                # autograd from recording (and saving) them, as their gradient is never asked for.
                with torch.no_grad():
                    return func(*args, **kwargs)
            frozen = _FROZEN.get(func)
            if frozen is not None and any(t.is_inference() for t in tensors):
                out = frozen(args, kwargs)
                if out is not None:
                    return out
        elif not inplace:
            return func(*args, **kwargs)
        args = tuple(self._swap(a) for a in args)
        kwargs = {k: self._swap(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def _recomputed(forward):
    def run(x, *args, **kwargs):
        if not (torch.is_grad_enabled() and x.requires_grad):
            return forward(x, *args, **kwargs)

        def body(x):
            with GuidedPassMode():  # the recomputation runs in the backward, outside the pass's own mode
                return forward(x, *args, **kwargs)
        # no dropout in the feed-forward at inference: the RNG state need not be saved and restored
        return checkpoint(body, x, use_reentrant=False, preserve_rng_state=False)
    return run


@contextlib.contextmanager
def recompute_feedforward(diffusion_model: torch.nn.Module, enabled: bool = True):
    """During the block, the transformer feed-forwards of `diffusion_model` store only their input for the
    backward and recompute the rest there. Instance-level and undone on exit (also on errors): the model
    is the same object before and after, and unguided passes never see the change."""
    if not enabled:
        yield
        return
    from comfy.ldm.modules.attention import FeedForward
    changed = []
    try:
        for module in diffusion_model.modules():
            if isinstance(module, FeedForward):
                own = module.__dict__.get("forward")  # someone else's instance-level patch: wrap, then restore
                module.forward = _recomputed(own if own is not None else module.__class__.forward.__get__(module))
                changed.append((module, own))
        yield
    finally:
        for module, own in changed:
            if own is None:
                del module.forward
            else:
                module.forward = own
