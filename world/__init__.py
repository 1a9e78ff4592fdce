"""The procedural world of flat shapes, its detector, and the small text-to-image model trained on it (issue 16).

`scenes` and `detector` are pure numpy/scipy (no ComfyUI); `model` builds the SD1.x-shaped model from
ComfyUI's classes, `train` trains it (``python world/train.py --help`` from the pack root).
"""
