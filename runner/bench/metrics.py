"""Per-image numbers of the bench: the attention metrics the Attention Metrics node computed on the host that ran
the job, reduced to the values the report compares, and the Attend-and-Excite paper's CLIP similarities.

Attention (from the node's per-step lists; see nodes/metrics.py):
  min_peak, overlap        at the last step
  min_peak_half, overlap_half   at the middle of the schedule, the last step A&E guides (step steps/2 - 1)
  retention                early step (retention_from of the schedule) vs last step

CLIP (`ClipScorer`, with --clip DIR, a local CLIP model in transformers' format), as A&E's
metrics/compute_clip_similarity.py computes them: the cosine similarity of the image's embedding and the text's,
where a text's embedding is the normalised mean of its normalised embeddings in the 80 ImageNet prompt
templates (CLIP's prompt ensemble; 'a photo of a {}.' ...):
  clip_full                the full prompt
  clip_first, clip_second  its two halves, split at " and " / " with "
  clip_min                 min(clip_first, clip_second): the paper's "minimum object similarity"
"""
from __future__ import annotations

import io
from pathlib import Path

from .prompts import prompt_halves

ATTENTION_METRICS = ("min_peak", "min_peak_half", "overlap", "overlap_half", "retention")
CLIP_METRICS = ("clip_full", "clip_min", "clip_first", "clip_second")
LABELS = {
    "min_peak": "weakest subject's peak (last step)",
    "min_peak_half": "weakest subject's peak (mid schedule)",
    "overlap": "subject overlap (last step)",
    "overlap_half": "subject overlap (mid schedule)",
    "retention": "retention (early vs last step)",
    "clip_full": "CLIP full-prompt similarity",
    "clip_min": "CLIP minimum half similarity",
    "clip_first": "CLIP first-half similarity",
    "clip_second": "CLIP second-half similarity",
}
HIGHER_IS_BETTER = {"min_peak": True, "min_peak_half": True, "overlap": False, "overlap_half": False,
                    "retention": True, "clip_full": True, "clip_min": True, "clip_first": True, "clip_second": True}


def attention_scalars(attention: dict | None) -> dict[str, float]:
    """The node's per-image JSON -> the scalars above (overlap left out with fewer than two subjects)."""
    if not attention or not attention.get("steps"):
        return {}
    steps = attention["steps"]
    half_step = max(0, round(attention.get("total_steps", len(steps)) * 0.5) - 1)
    half = max((i for i, s in enumerate(steps) if s <= half_step), default=0)
    values = {"min_peak": attention["min_peak"][-1], "min_peak_half": attention["min_peak"][half],
              "overlap": attention["overlap"][-1], "overlap_half": attention["overlap"][half],
              "retention": attention.get("retention")}
    return {name: float(value) for name, value in values.items() if value is not None}


# CLIP's ImageNet prompt templates, as A&E's metrics/imagenet_utils.py lists them (MIT; from OpenAI CLIP's
# prompt-engineering notebook)
IMAGENET_TEMPLATES = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)


def template_texts(text: str) -> list[str]:
    """The 80 template sentences of `text`, with A&E's clean-up of doubled articles ('a a', 'the a')."""
    return [t.format(text).replace("a a", "a").replace("the a", "a") for t in IMAGENET_TEMPLATES]


class ClipError(Exception):
    """The CLIP model folder cannot be used; the message says why."""


class ClipScorer:
    """A local CLIP model (a folder in transformers' format: CLIPModel weights and config, with its tokenizer and
    image processor files, as `save_pretrained` writes them)."""

    def __init__(self, folder: str | Path, device: str | None = None):
        import torch
        try:
            from transformers import CLIPModel, CLIPProcessor
        except ImportError as error:
            raise ClipError(f"--clip needs the transformers package ({error})") from None
        self.folder = Path(folder).expanduser().resolve()
        if not (self.folder / "config.json").is_file():
            raise ClipError(f"--clip {str(folder)!r}: no CLIP model there (a folder with config.json and the "
                            "weights, as transformers' save_pretrained writes them)")
        try:
            self.model = CLIPModel.from_pretrained(self.folder).eval()
            self.processor = CLIPProcessor.from_pretrained(self.folder)
        except (OSError, ValueError) as error:
            raise ClipError(f"--clip {str(folder)!r}: cannot load a CLIP model and its processor: {error}") from None
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self._torch = torch
        self._texts: dict[str, object] = {}

    @property
    def identity(self) -> str:
        config = self.model.config
        return f"{self.folder.name} (projection {config.projection_dim})"

    @staticmethod
    def _features(output):
        # transformers 4 returns the projected tensor; 5 may return an output object holding it
        return output if hasattr(output, "norm") else getattr(output, "pooler_output", output[0])

    def text_embedding(self, text: str):
        if text not in self._texts:
            torch = self._torch
            tokens = self.processor.tokenizer(template_texts(text), padding=True, truncation=True,
                                              return_tensors="pt").to(self.device)
            with torch.no_grad():
                embeddings = self._features(self.model.get_text_features(**tokens)).float()
            embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
            mean = embeddings.mean(dim=0)
            self._texts[text] = mean / mean.norm()
        return self._texts[text]

    def image_embedding(self, image):
        torch = self._torch
        pixels = self.processor.image_processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            embedding = self._features(self.model.get_image_features(pixel_values=pixels.to(self.device))).float()[0]
        return embedding / embedding.norm()

    def score(self, image_bytes_or_path, prompt: str) -> dict[str, float]:
        from PIL import Image
        source = image_bytes_or_path
        with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as image:
            features = self.image_embedding(image)
        values = {"clip_full": float(features @ self.text_embedding(prompt))}
        halves = prompt_halves(prompt)
        if halves:
            first, second = (float(features @ self.text_embedding(half)) for half in halves)
            values.update(clip_first=first, clip_second=second, clip_min=min(first, second))
        return values
