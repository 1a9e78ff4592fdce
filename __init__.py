"""Attention guidance for ComfyUI: Attend-and-Excite and A-STAR at sampling time.

ComfyUI loads this folder from custom_nodes/ and calls `comfy_entrypoint`.
"""
from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from . import server_routes  # noqa: F401  (registers POST /attn_guide/tokenize when ComfyUI's server runs)

WEB_DIRECTORY = "./web"


class AttentionGuidanceExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .nodes import all_nodes
        return all_nodes()


async def comfy_entrypoint() -> AttentionGuidanceExtension:
    return AttentionGuidanceExtension()
