"""A differentiable forward of the host's model inside ComfyUI's inference mode, without touching the model.

ComfyUI runs prompts under `torch.inference_mode`, so loaded weights are inference tensors, which autograd
cannot save for backward. `GuidedPassMode` makes one guided pass differentiable anyway:

- linear, conv2d, group_norm and layer_norm calls whose weight is an inference tensor run as `frozen_weight_*`
  autograd functions whose backward gives the input's gradient only, so they hold a reference to the weight
  and save no copy of it (a copy of the weights would double the pass's memory);
- any other op that autograd records gets non-inference copies of its inference-tensor inputs, made on
  first use and dropped with the pass (none of the model's weights in ComfyUI's UNet);
- ControlNet residuals of this pass are added out of place (see `GuidedPassMode`);
- other in-place edits (model patches such as FreeU's `h[:, :n] = h[:, :n] * s`) run in place as the host
  wrote them, and the tensors autograd saved that they would overwrite are copied just before the edit
  (`SavedTensors`): the forward's values are unchanged and the backward sees what the forward saw.

`recompute_feedforward` trades time for memory: the transformer blocks' feed-forward activations (the largest
share of what the pass keeps, about 45% on SDXL) are recomputed during the backward instead of stored.
"""
from __future__ import annotations

import contextlib
import weakref

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
    if x.ndim <= 2:
        return _FrozenWeightLinear.apply(x, weight, bias)
    # on the rows, reshaped outside the Function: a view made inside a custom Function may not be edited in
    # place (Flux adds its residuals in place: `img += ...` on img_in's output); the same addmm either way
    out = _FrozenWeightLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias)
    return out.view(*x.shape[:-1], out.shape[-1])


def frozen_weight_conv2d(args, kwargs):
    x, weight, bias, stride, padding, dilation, groups = _bound(
        ("input", "weight", "bias", "stride", "padding", "dilation", "groups"), args, kwargs,
        {"stride": 1, "padding": 0, "dilation": 1, "groups": 1})
    if isinstance(padding, str):  # 'same' / 'valid': let autograd handle it (with a copy of the weight)
        return None
    return _FrozenWeightConv2d.apply(x, weight, bias, stride, padding, dilation, groups)


class _FrozenAffineNorm(torch.autograd.Function):
    """group_norm / layer_norm with affine weight and bias referenced, not saved: the backward recomputes the
    unaffine normalisation from the saved input and feeds it dL/dy * weight (the affine's input gradient)."""

    @staticmethod
    def forward(ctx, x, norm, weight, bias, shape):
        ctx.norm, ctx.weight, ctx.shape = norm, weight, shape
        ctx.save_for_backward(x)
        return norm(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        scaled = grad if ctx.weight is None else grad * ctx.weight.reshape(ctx.shape)
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            normalised = ctx.norm(x, None, None)
        return torch.autograd.grad(normalised, [x], scaled)[0], None, None, None, None


def frozen_weight_group_norm(args, kwargs):
    x, groups, weight, bias, eps = _bound(("input", "num_groups", "weight", "bias", "eps"), args, kwargs,
                                          {"eps": 1e-5})
    shape = (1, -1) + (1,) * (x.ndim - 2)  # per channel
    return _FrozenAffineNorm.apply(x, lambda t, w, b: F.group_norm(t, groups, w, b, eps), weight, bias, shape)


def frozen_weight_layer_norm(args, kwargs):
    x, normalized_shape, weight, bias, eps = _bound(("input", "normalized_shape", "weight", "bias", "eps"), args,
                                                    kwargs, {"eps": 1e-5})
    shape = tuple(weight.shape) if weight is not None else None  # over the last dims, broadcast
    return _FrozenAffineNorm.apply(x, lambda t, w, b: F.layer_norm(t, normalized_shape, w, b, eps), weight, bias,
                                   shape)


_FROZEN = {F.linear: frozen_weight_linear, F.conv2d: frozen_weight_conv2d, F.group_norm: frozen_weight_group_norm,
           F.layer_norm: frozen_weight_layer_norm}


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach() if value.requires_grad else value
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        return type(value)(_detached(v) for v in value)
    return value


_INPLACE_OPERATORS = {f"__i{op}__" for op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul",
                                                 "and", "or", "xor", "lshift", "rshift")} | {"__setitem__"}
_METADATA_ONLY = {"requires_grad_", "share_memory_", "detach_"}  # named like in-place ops, write no values


def _is_inplace(func) -> bool:
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.startswith("__")) or name in _INPLACE_OPERATORS


def _written(func, args, kwargs, inplace: bool) -> list[torch.Tensor]:
    """The tensors whose values `func(*args, **kwargs)` overwrites (`inplace`: `_is_inplace(func)`): an
    in-place op's (or `inplace=True` function's) first argument, and `out=`."""
    if not (inplace or kwargs):  # the common case, on every op of the pass: nothing to look at
        return []
    written = list(_tensors(kwargs.get("out")))
    if (inplace and getattr(func, "__name__", "") not in _METADATA_ONLY) or kwargs.get("inplace") is True:
        written += _tensors(args[0] if args else kwargs.get("input", kwargs.get("self")))
    return written


def _storage_key(tensor: torch.Tensor):
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, nested, ...: no plain storage to share
        return None
    return (tensor.device, storage.data_ptr()) if storage.nbytes() else None


class _Saved:
    """One tensor autograd saved during the guided pass: `tensor` (detached: holding the tensor itself would
    make a reference cycle through its grad_fn) and its version when saved; `packed` is what an enclosing
    saved-tensor hook made of it, if there is one and it did not return the tensor as it was."""
    __slots__ = ("tensor", "version", "packed", "__weakref__")

    def __init__(self, tensor, packed=None):
        self.tensor, self.version, self.packed = tensor, tensor._version if tensor is not None else 0, packed


class SavedTensors:
    """Saved-tensor hooks that make autograd's saved tensors immune to later in-place edits.

    Packing keeps a reference (no copy) and files it under its storage. `protect(t)`, called before an op
    overwrites `t`, replaces every saved tensor sharing t's storage by a copy of its current values, so the
    copies cost memory only where an edit happens, and only the size of the saved tensors it would overwrite.
    Unpacking checks the version, as autograd does without hooks (hooks turn its check off): a saved tensor
    changed by an edit that did not pass through `protect` still raises instead of giving a wrong gradient.

    An enclosing saved-tensor hook (a memory probe, CPU offload) keeps working: it packs first, and what
    it returns is tracked only if it is the tensor itself.
    """

    def __init__(self):
        self._by_storage: dict[tuple, list[weakref.ref]] = {}  # filled during the forward, cleared at exit
        self._hooks = None
        self.copied_bytes = 0  # what protect() copied in this pass: 0 when nothing edits a saved tensor

    def __enter__(self):
        top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", lambda _tracing: None)(False)
        outer_pack, outer_unpack = top if top is not None else (None, None)

        def pack(tensor):
            with torch._C.DisableTorchFunction():  # may run while GuidedPassMode is active
                packed = outer_pack(tensor) if outer_pack is not None else tensor
                if packed is not tensor:
                    return _Saved(None, packed)
                saved = _Saved(tensor.detach())
                key = _storage_key(tensor)
                if key is not None:
                    self._by_storage.setdefault(key, []).append(weakref.ref(saved))
                return saved

        def unpack(saved):
            if saved.tensor is None:
                return outer_unpack(saved.packed)
            if saved.tensor._version != saved.version:
                raise RuntimeError(
                    "one of the variables needed for gradient computation has been modified by an inplace "
                    f"operation: [{saved.tensor.type()} {list(saved.tensor.shape)}] is at version "
                    f"{saved.tensor._version}; expected version {saved.version} instead. The guided pass "
                    "copies saved tensors before in-place edits it sees; this edit ran outside it.")
            return outer_unpack(saved.tensor) if outer_unpack is not None else saved.tensor

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._by_storage.clear()
        self._hooks.__exit__(*exc)
        self._hooks = None

    def protect(self, written: torch.Tensor) -> None:
        """Copy the saved tensors that share `written`'s storage, before an op overwrites it."""
        key = _storage_key(written) if self._by_storage else None
        entries = self._by_storage.pop(key, None) if key is not None else None
        for ref in entries or ():
            saved = ref()
            if saved is None or saved.tensor._version != saved.version:
                continue  # freed with its graph; or already changed behind our back: unpack will say so
            with torch._C.DisableTorchFunction(), torch.no_grad():
                saved.tensor = saved.tensor.clone()
            saved.version = saved.tensor._version
            self.copied_bytes += saved.tensor.nbytes


class GuidedPassMode(TorchFunctionMode):
    """Makes the host's forward differentiable for one guided pass, without changing the host.

    - Inference-tensor weights of linear/conv2d layers are used as they are (frozen-weight autograd
      functions); other ops that autograd records, and in-place ops, get non-inference copies of their
      inference-tensor inputs (made once per pass). Ops off the latent's path run as they are, unrecorded.
    - The UNet adds ControlNet residuals in place (`h += ctrl` on skip tensors autograd has saved). For the
      residuals this pass produced (`residual_ids`), that add is made out of place; `h += ctrl` rebinds h to
      the result, so the forward is unchanged (and nothing is copied).
    - Every other in-place edit runs in place, so code holding a reference to the edited tensor (or to a
      view of it: `h[:, :n] *= s` is getitem, imul, setitem) sees the change as without guidance. What
      autograd saved of the edited storage is copied first (`SavedTensors`, `protect_saved`); passes without
      such edits copy nothing. Not covered, as in plain autograd: edits of the latent (a leaf) and of views
      from multi-output ops (`chunk`, `split`, `unbind`).
    """

    def __init__(self, residual_ids: set[int] | None = None, protect_saved: bool = True):
        super().__init__()
        self.copies: dict[int, torch.Tensor] = {}
        self.residual_ids = residual_ids if residual_ids is not None else set()
        # off where the pass's saved tensors belong to someone else's hooks (torch.utils.checkpoint's)
        self.saved = SavedTensors() if protect_saved else None

    def __enter__(self):
        if self.saved is not None:
            self.saved.__enter__()
        try:
            return super().__enter__()
        except BaseException:
            if self.saved is not None:
                self.saved.__exit__(None, None, None)
            raise

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            if self.saved is not None:
                self.saved.__exit__(*exc)

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
        if self.saved is not None:
            for written in _written(func, args, kwargs, inplace):
                # an inference tensor is edited through its copy (below), if it has one
                self.saved.protect(self.copies.get(id(written), written) if written.is_inference() else written)
        if not inplace and torch.is_grad_enabled():
            tensors = list(_tensors(args)) + list(_tensors(list(kwargs.values())))
            if not tensors:  # grad-mode switches (no_grad's own enter/exit) and factories: as they are
                return func(*args, **kwargs)
            if not any(t.requires_grad and not t.is_inference() for t in tensors):
                # not on the latent's path (that is all tensors of this pass, never inference tensors): nothing
                # to record. Some hosts' inference-tensor weights have requires_grad set: detached, autograd does
                # not record (and save) them, as their gradient is never asked for. Not no_grad: a view made
                # there (a linear's 3-D output) may not be edited in place later by a value on the latent's
                # path (Flux's `txt += ...` in its first double block)
                if any(t.requires_grad for t in tensors):
                    args = tuple(_detached(a) for a in args)
                    kwargs = {k: _detached(v) for k, v in kwargs.items()}
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
            # the recomputation runs in the backward, outside the pass's own mode; saved tensors in here are
            # checkpoint's (its hooks are innermost): it recomputes them, they need no protection
            with GuidedPassMode(protect_saved=False):
                return forward(x, *args, **kwargs)
        # no dropout in the feed-forward at inference: the RNG state need not be saved and restored
        return checkpoint(body, x, use_reentrant=False, preserve_rng_state=False)
    return run


@contextlib.contextmanager
def wrapped_forwards(modules, wrap):
    """During the block, each module's forward is `wrap(module, forward)`, set on the instance and undone on exit
    (also on errors): the model is the same object before and after, and passes outside the block never see it.
    Someone else's instance-level forward is wrapped, then put back."""
    changed = []
    try:
        for module in modules:
            own = module.__dict__.get("forward")
            module.forward = wrap(module, own if own is not None else module.__class__.forward.__get__(module))
            changed.append((module, own))
        yield
    finally:
        for module, own in changed:
            if own is None:
                del module.forward
            else:
                module.forward = own


@contextlib.contextmanager
def recompute_feedforward(diffusion_model: torch.nn.Module, enabled: bool = True, modules=None):
    """During the block, the transformer feed-forwards of `diffusion_model` (the UNet's FeedForward modules, or
    `modules`: a DiT family's MLPs) store only their input for the backward and recompute the rest there
    (`wrapped_forwards`)."""
    if not enabled:
        yield
        return
    if modules is None:
        from comfy.ldm.modules.attention import FeedForward
        modules = [m for m in diffusion_model.modules() if isinstance(m, FeedForward)]
    feedforwards = list(modules)
    with wrapped_forwards(feedforwards, lambda _module, forward: _recomputed(forward)):
        yield
