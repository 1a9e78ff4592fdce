"""Attention Text Encode: CLIPTextEncode plus the subject token positions the guidance reads."""
import dataclasses

from comfy_api.latest import io

from ..text.subjects import SubjectError, resolve_subjects, token_digests
from .types import Subjects


class AttentionTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnGuideTextEncode",
            display_name="Attention Text Encode (AttnGuide)",
            category="conditioning/attention guidance",
            description="Encodes a prompt exactly like CLIP Text Encode and finds the tokens of its subjects in the "
                        "model's text: CLIP tokens (SD1.x, SD2.x, SDXL), T5 pieces (Flux.1, Chroma), or both, CLIP "
                        "first (SD3/SD3.5).",
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP model used to encode the text: SD1.x, SD2.x, SDXL, SD3/SD3.5 "
                                              "(CLIP-L/G and T5-XXL) or Flux.1/Chroma (T5-XXL)."),
                io.String.Input("text", multiline=True, dynamic_prompts=True,
                                tooltip="The prompt. Weighting like (cat:1.2) and embeddings work as in CLIP Text Encode."),
                io.String.Input("subjects", default="",
                                tooltip="The subjects that must all appear, comma separated: words of the prompt "
                                        "('cat, frog', 'red car') or token indices ('2,5') into the model's text: "
                                        "SD1.x/SD2.x/SDXL CLIP tokens (0 is the start token, a second 77-token chunk "
                                        "starts at 77); Flux/Chroma T5 pieces (from 0); SD3 CLIP tokens, then T5 "
                                        "pieces from 77 x chunks. The token picker shows the indices. "
                                        "Attend-and-Excite uses the nouns."),
            ],
            outputs=[
                io.Conditioning.Output(tooltip="The same conditioning CLIP Text Encode gives for this text."),
                Subjects.Output(display_name="SUBJECTS",
                                tooltip="Each subject's token positions in the model's text (SD3: its CLIP tokens "
                                        "and its T5 pieces), label and attributes, for the Attention samplers."),
            ],
        )

    @classmethod
    def execute(cls, clip, text, subjects) -> io.NodeOutput:
        if clip is None:
            raise RuntimeError("ERROR: clip input is invalid: None\n\nIf the clip is from a checkpoint loader node "
                               "your checkpoint does not contain a valid clip or text encoder model.")
        try:
            resolved = resolve_subjects(clip, text, subjects)
        except SubjectError as error:
            raise ValueError(f"Attention Text Encode: {error}") from None
        tokens = clip.tokenize(text)
        conditioning = clip.encode_from_tokens_scheduled(tokens)
        # bind SUBJECTS to this text's embedding: the sampler finds it among the positive conds
        fingerprints = tuple(token_digests(cond) for cond, _options in conditioning)
        return io.NodeOutput(conditioning, dataclasses.replace(resolved, fingerprints=fingerprints))


NODES = [AttentionTextEncode]
