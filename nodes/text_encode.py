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
            description="Encodes a prompt exactly like CLIP Text Encode and finds the CLIP tokens of its subjects.",
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP model (SD1.x, SD2.x or SDXL) used to encode the text."),
                io.String.Input("text", multiline=True, dynamic_prompts=True,
                                tooltip="The prompt. Weighting like (cat:1.2) and embeddings work as in CLIP Text Encode."),
                io.String.Input("subjects", default="",
                                tooltip="The subjects that must all appear, comma separated: words of the prompt "
                                        "('cat, frog', 'red car') or token indices ('2,5'; 0 is the start token, a "
                                        "second 77-token chunk starts at 77). Attend-and-Excite uses the nouns."),
            ],
            outputs=[
                io.Conditioning.Output(tooltip="The same conditioning CLIP Text Encode gives for this text."),
                Subjects.Output(display_name="SUBJECTS",
                                tooltip="Each subject's token positions, label and chunk, for the Attention samplers."),
            ],
        )

    @classmethod
    def execute(cls, clip, text, subjects) -> io.NodeOutput:
        if clip is None:
            raise RuntimeError("ERROR: clip input is invalid: None\n\nIf the clip is from a checkpoint loader node "
                               "your checkpoint does not contain a valid clip or text encoder model.")
        try:
            resolved = resolve_subjects(clip.tokenizer, text, subjects)
        except SubjectError as error:
            raise ValueError(f"Attention Text Encode: {error}") from None
        tokens = clip.tokenize(text)
        conditioning = clip.encode_from_tokens_scheduled(tokens)
        # bind SUBJECTS to this text's embedding: the sampler finds it among the positive conds
        fingerprints = tuple(token_digests(cond) for cond, _options in conditioning)
        return io.NodeOutput(conditioning, dataclasses.replace(resolved, fingerprints=fingerprints))


NODES = [AttentionTextEncode]
