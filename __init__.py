"""Attention guidance for ComfyUI: Attend-and-Excite and A-STAR at sampling time.

ComfyUI loads this folder from custom_nodes/ and calls `comfy_entrypoint`. Nothing of ComfyUI is
imported at module level, so that `python -m <pack> run ...` can start before it has found and
booted the ComfyUI host.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from comfy_api.latest import ComfyExtension, io

    from .text import server_routes  # noqa: F401  (registers POST /attn_guide/tokenize when ComfyUI's server runs)
    from .nodes import all_nodes
    from .world.model import register as register_world_model

    # the pack's own small SD1.x-architecture model (world/world_sd15.safetensors) is narrower than any SD1.x
    # ComfyUI detects: its config is added to checkpoint detection, matching only checkpoints of its widths
    register_world_model()

    class AttentionGuidanceExtension(ComfyExtension):
        async def get_node_list(self) -> list[type[io.ComfyNode]]:
            return all_nodes()

    return AttentionGuidanceExtension()
