"""Test-only custom nodes for tests/test_browser.py: the pack's tiny random SD1.5, Flux or SD3 model, CLIP and VAE.

A checkpoint of the tiny models cannot go through CheckpointLoaderSimple: ComfyUI recognises SD1.5 by
its real widths (model_channels 320, context_dim 768) and reports "Could not detect model type" for
the narrow UNet. The browser test therefore loads this folder as a second custom_nodes entry, used
only by that test, and its workflow starts from this loader. Its `type` names the family as Load CLIP's
`type` does (stable_diffusion, flux, sd3), which is what the token picker reads to choose the tokenizer.
"""
import importlib.util
import os

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

_PACK_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__)))))
_models = {}
# the loader's `type` (as Load CLIP names CLIP families) -> the tiny models' family
FAMILIES = {"stable_diffusion": "sd15", "flux": "flux", "sd3": "sd3"}


def _tiny_models():
    spec = importlib.util.spec_from_file_location("attn_guide_test_tiny_models",
                                                  os.path.join(_PACK_DIR, "runner", "tiny_models.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TinyModelsLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnGuideTestTinySD15",
            display_name="Tiny SD1.5 (AttnGuide test)",
            category="testing",
            description="Test only: the pack's tiny random SD1.5-, Flux- or SD3-shaped model, CLIP and VAE "
                        "(noise images).",
            inputs=[io.Combo.Input("type", options=list(FAMILIES), default="stable_diffusion", optional=True,
                                   tooltip="The family, named as Load CLIP's type names it.")],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()],
        )

    @classmethod
    def execute(cls, type="stable_diffusion") -> io.NodeOutput:
        family = FAMILIES[type]
        if family not in _models:
            tiny = _tiny_models()
            _models[family] = (tiny.make_model(family), tiny.make_clip(family), tiny.make_vae(family=family))
        return io.NodeOutput(*_models[family])


class TinyNodesExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [TinyModelsLoader]


async def comfy_entrypoint() -> TinyNodesExtension:
    return TinyNodesExtension()
