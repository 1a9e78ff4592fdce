"""Test-only custom nodes for tests/test_browser.py: the pack's tiny random SD1.5 model, CLIP and VAE.

A checkpoint of the tiny models cannot go through CheckpointLoaderSimple: ComfyUI recognises SD1.5 by
its real widths (model_channels 320, context_dim 768) and reports "Could not detect model type" for
the narrow UNet. The browser test therefore loads this folder as a second custom_nodes entry, used
only by that test, and its workflow starts from this loader.
"""
import importlib.util
import os

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

_PACK_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__)))))
_models = {}


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
            description="Test only: the pack's tiny random SD1.5-shaped model, CLIP and VAE (noise images).",
            inputs=[],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        if not _models:
            tiny = _tiny_models()
            _models.update(model=tiny.make_model("sd15"), clip=tiny.make_clip("sd15"), vae=tiny.make_vae())
        return io.NodeOutput(_models["model"], _models["clip"], _models["vae"])


class TinyNodesExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [TinyModelsLoader]


async def comfy_entrypoint() -> TinyNodesExtension:
    return TinyNodesExtension()
