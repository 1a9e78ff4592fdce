"""pytest entry: the harness boots the real ComfyUI host and provides the fixtures."""
from harness import *  # noqa: F401,F403
from harness import families, runner, sd2, sd15, sdxl, tiny  # noqa: F401  (fixtures)
