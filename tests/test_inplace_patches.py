"""Other patches that edit activations in place, inside the guided pass.

FreeU_V2 (ComfyUI's comfy_extras/nodes_freelunch.py) writes `h[:, :half] = h[:, :half] * s` in its output-block
patch, s a tensor: the assignment overwrites the view of h that autograd saved for the product, and without help
the guided backward fails with "modified by an inplace operation". The guided pass copies what autograd saved of a storage just before an edit overwrites it
(guidance/differentiable.py, `SavedTensors`). Checked here: the gradient equals a central finite difference of
the loss, the forward is the host's bit for bit, and passes without in-place edits copy nothing.

Finite differences: the model computes in float64, the sampler's loss in float32 (it casts the maps), so each
loss value carries a rounding error of at most about half an ulp of 1, 6e-8. With step EPS = 10 along a unit
direction (the latent's norm is about 900 at the first sigma, so the step is ~1% of it) the central difference
is off by at most 6e-8 / EPS = 6e-9 from rounding; its O(EPS^2) error is smaller (it agrees with EPS = 3 to
within that): tolerance 1e-8, with directional derivatives of ~4.5e-6 (observed errors: 2e-9 at most). A
backward that used FreeU_V2's edited values instead of the saved ones would be 4e-8 off.
"""
import comfy.model_management
import comfy.model_patcher
import comfy.sample
import comfy.samplers
import pytest
import torch
from comfy_extras import nodes_freelunch
from harness import pack_module, run_node
from test_guided_pass import _first_step

sampler_mod = pack_module("guidance.sampler")
differentiable = pack_module("guidance.differentiable")
tiny = pack_module("runner.tiny_models")

CONFIG = sampler_mod.GuidanceConfig(refinement=(), guidance_end=0.25)
EPS = 10.0


@pytest.fixture(scope="module")
def sd15_float64():
    """Tiny SD1.5 computing in float64, weights made inference tensors as ComfyUI's loaders make them."""
    with torch.inference_mode():
        unet = tiny.make_unet_model("sd15", seed=0, dtype=torch.float64)
    return comfy.model_patcher.ModelPatcher(unet, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def freeu_v2(model):
    return run_node(nodes_freelunch.FreeU_V2, model=model, b1=1.3, b2=1.4, s1=0.9, s2=0.2)[0]  # the node's defaults


def freeu(model):
    return run_node(nodes_freelunch.FreeU, model=model, b1=1.1, b2=1.2, s1=0.9, s2=0.2)[0]


def inplace_edits(model):
    """A patch of our own: each in-place edit overwrites something autograd saved just before it (the tanh
    keeps the factors near 1: the patch runs at every output block)."""

    def output_block_patch(h, hsp, transformer_options):
        half = h.shape[1] // 2
        scale = 1 + 0.1 * torch.tanh(h.mean(1, keepdim=True))
        h[:, :half] = h[:, :half] * scale       # slice assignment over the view that `*` saved
        energy = torch.tanh(h.pow(2).mean(1, keepdim=True))  # pow saves h
        h.mul_(1 + 0.05 * energy)                # method form
        shift = torch.tanh(h[:, half:].pow(2).mean())  # pow saves a view of h
        h[:, half:] *= 0.9                       # operator on a view: getitem, imul, setitem
        hsp.add_(0.1 * shift)                    # the skip tensor, saved by the input block's GroupNorm
        h += 0.1 * shift                         # operator form, Python rebinds h
        return h, hsp

    def attn1_patch(n, context, value, extra_options):
        norm = n.pow(2).mean(-1, keepdim=True)   # saves n
        n.mul_(torch.rsqrt(norm + 1))             # context and value are n too: the edit reaches all three
        return n, context, value

    m = model.clone()
    m.set_model_output_block_patch(output_block_patch)
    m.set_model_attn1_patch(attn1_patch)
    return m


def _at_first_guided_step(model, clip, inspect):
    """inspect(run, x, sigma) at the first guided update (the guided-pass tests' sampling run)."""
    return _first_step(model, clip, CONFIG, lambda run, x, _total, sigma: inspect(run, x, sigma))


def _directional_check(run, x, sigma):
    """(dL/dx . d, the central difference of L along d, L with autograd, L without) at x in float64."""
    x = x.detach().double()
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    direction /= direction.norm()

    def loss(at):
        return run.loss(at.detach().requires_grad_(True), sigma)[0].sum().detach()

    latent = x.clone().requires_grad_(True)
    total = run.loss(latent, sigma)[0].sum()
    grad = torch.autograd.grad(total, [latent])[0]
    total = total.detach()
    with torch.no_grad():
        unguarded = run.loss(x, sigma)[0].sum()  # no autograd: the host's in-place edits need no help
    difference = (loss(x + EPS * direction) - loss(x - EPS * direction)) / (2 * EPS)
    return grad, (grad * direction).sum().item(), difference.item(), total.item(), unguarded.item()


def _edited(x, protect_saved=True):
    """Each form of in-place edit, each overwriting what an op before it saved."""
    with differentiable.GuidedPassMode(protect_saved=protect_saved):
        h = x * 1.5
        y = h.sin()                              # saves h
        h[:, :2] *= 3                            # getitem, imul, setitem
        z = h.pow(2)                             # saves h
        h.mul_(y)                                # method form
        h[:, 2:] = h[:, 2:] * z[:, 2:]           # slice assignment (mul saved the view)
        torch.nn.functional.silu(h, inplace=True)  # inplace=True (silu saved its input)
        h += z                                   # operator form
        return h + y


def test_each_form_of_inplace_edit_has_the_exact_gradient():
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True, generator=torch.Generator().manual_seed(0))
    assert torch.autograd.gradcheck(_edited, (x,))
    with torch.no_grad():
        plain = _edited(x)  # nothing saved, nothing to protect
    assert torch.equal(_edited(x).detach(), plain)  # the forward's values are unchanged
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _edited(x, protect_saved=False).sum().backward()


@pytest.fixture
def copies(monkeypatch):
    """The bytes each guided pass copied to protect saved tensors."""
    seen = []
    original_exit = differentiable.SavedTensors.__exit__

    def exit_(self, *exc):
        seen.append(self.copied_bytes)
        return original_exit(self, *exc)

    monkeypatch.setattr(differentiable.SavedTensors, "__exit__", exit_)
    return seen


@pytest.mark.parametrize("patch", [freeu_v2, freeu, inplace_edits], ids=lambda p: p.__name__)
def test_gradient_through_inplace_edits_matches_finite_differences(sd15, sd15_float64, patch, copies):
    _model, clip = sd15
    grad, analytic, numeric, total, unguarded = _at_first_guided_step(patch(sd15_float64), clip, _directional_check)
    print(f"{patch.__name__}: dL/dx.d {analytic:.6e}, central difference {numeric:.6e}, "
          f"rel. error {abs(numeric - analytic) / abs(analytic):.2e}, copied {max(copies)} bytes")
    assert torch.isfinite(grad).all() and grad.abs().max() > 0
    assert abs(numeric - analytic) <= 1e-8
    assert total == unguarded  # the forward's values are the host's
    # FreeU (V1) scales by a number, which saves nothing: its edits overwrite no saved tensor
    assert (max(copies) > 0) == (patch is not freeu)


@pytest.mark.parametrize("patch", [freeu_v2, inplace_edits], ids=lambda p: p.__name__)
def test_without_the_copies_the_backward_fails(sd15, sd15_float64, patch, monkeypatch):
    """The negative control: the failure the copies prevent is real, and the hooks (which turn autograd's own
    version check off) still report an edit they were not told about."""
    monkeypatch.setattr(differentiable.SavedTensors, "protect", lambda self, written: None)
    _model, clip = sd15
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _at_first_guided_step(patch(sd15_float64), clip, _directional_check)


def _saved_bytes(model, clip):
    """Bytes autograd keeps for the backward of one guided pass, weights excluded (as in test_guided_pass)."""
    weights = {p.untyped_storage().data_ptr() for p in model.model.diffusion_model.parameters()}
    seen = {}  # the storages themselves, kept: a freed one's address, reused, would hide another

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage
        return t

    original_loss = sampler_mod.GuidanceRun.loss

    def loss(self, x, sigma):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return original_loss(self, x, sigma)

    sampler_mod.GuidanceRun.loss = loss
    try:
        _at_first_guided_step(model, clip, lambda run, x, sigma: None)
    finally:
        sampler_mod.GuidanceRun.loss = original_loss
    return sum(storage.nbytes() for storage in seen.values())


def test_without_inplace_edits_nothing_is_copied(sd15, copies, monkeypatch):
    """A pass without in-place edits of saved tensors keeps what it kept without the protection, no more;
    with FreeU_V2 only the few saved tensors that its edits overwrite are copied."""
    model, clip = sd15
    protected = _saved_bytes(model, clip)
    assert protected > 0 and copies and set(copies) == {0}
    with_freeu = _saved_bytes(freeu_v2(model), clip)
    freeu_copied = max(copies)
    original_init = differentiable.GuidedPassMode.__init__
    monkeypatch.setattr(differentiable.GuidedPassMode, "__init__",
                        lambda self, residual_ids=None, protect_saved=True: original_init(self, residual_ids, False))
    unprotected = _saved_bytes(model, clip)
    print(f"saved bytes: {protected} protected, {unprotected} unprotected; FreeU_V2: {with_freeu} saved, "
          f"{freeu_copied} copied")
    assert protected == unprotected
    assert 0 < freeu_copied < 0.1 * with_freeu


def test_no_grad_blocks_inside_the_guided_pass_stay_no_grad():
    """Code the guided pass runs (ControlNet under no_grad, patches) keeps its no_grad blocks: the mode must not
    undo the grad-mode switch itself."""
    x = torch.zeros(3, requires_grad=True)
    with torch.enable_grad(), differentiable.GuidedPassMode():
        with torch.no_grad():
            inside = torch.is_grad_enabled()
            product = x * 2
        after = torch.is_grad_enabled()
    assert (inside, after, product.requires_grad) == (False, True, False)
