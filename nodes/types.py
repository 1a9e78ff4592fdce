"""The pack's custom io types (their names are saved in workflows: never rename them)."""
import inspect

from comfy_api.latest import io

Subjects = io.Custom("ATTN_SUBJECTS")
AttentionMaps = io.Custom("ATTN_MAPS")
Guidance = io.Custom("ATTN_GUIDANCE")
InitNO = io.Custom("ATTN_INITNO")

# `advanced=True` (inputs folded away by default) exists only in newer ComfyUI; 0.3.64 rejects the keyword.
ADVANCED = {"advanced": True} if "advanced" in inspect.signature(io.Int.Input.__init__).parameters else {}
