"""The pack's custom io types (their names are saved in workflows: never rename them)."""
from comfy_api.latest import io

Subjects = io.Custom("ATTN_SUBJECTS")
AttentionMaps = io.Custom("ATTN_MAPS")
Guidance = io.Custom("ATTN_GUIDANCE")
