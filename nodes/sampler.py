"""Attention KSampler and its SAMPLER form: record subject attention, and guide when asked to."""
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
from comfy_api.latest import io

from ..guidance.sampler import AttentionSampler
from .types import ADVANCED, AttentionMaps, Guidance, InitNO, Subjects

_RESOLUTION_TIP = ("Side of the captured attention maps in latent pixels / downsampling; 0 = Attend-and-Excite's "
                   "choice, 1/4 of the latent (16x16 for SD1.x at 512 px, 32x32 for SDXL at 1024 px). "
                   "UNet models only: DiT models (SD3, Flux) are read at their token grid.")
_BLOCKS_TIP = ("DiT models (SD3/SD3.5, Flux): the joint-attention blocks whose maps are read. Empty: all of SD3's "
               "joint blocks, Flux's double blocks (as FOCUS; the guided pass then skips the single blocks). Also "
               "'all', 'double', 'single', or indices/ranges such as '0-9, 12'. UNet models: leave empty.")


def _blocks_input():
    # last, so that workflows saved before it keep their widget values
    return io.String.Input("blocks", default="", optional=True, **ADVANCED, tooltip=_BLOCKS_TIP)


def _common_inputs():
    return [
        Subjects.Input("subjects", tooltip="SUBJECTS from Attention Text Encode (the positive prompt)."),
        Guidance.Input("guidance", optional=True,
                       tooltip="Losses and schedule from Attention Guidance Losses. Not connected: no guidance, "
                               "the maps are only recorded (the result equals KSampler's)."),
        io.Int.Input("attention_resolution", default=0, min=0, max=256, **ADVANCED, tooltip=_RESOLUTION_TIP),
        InitNO.Input("initno", optional=True,
                     tooltip="From Attention InitNO: optimise the starting noise before the first step. Not "
                             "connected: the noise is used as it is."),
    ]


class AttentionKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnGuideKSampler",
            display_name="Attention KSampler (AttnGuide)",
            category="sampling/attention guidance",
            description="KSampler that records the subjects' cross-attention and, with GUIDANCE, changes the latent "
                        "so that every subject is attended (Attend-and-Excite, A-STAR).",
            inputs=[
                io.Model.Input("model", tooltip="The model used for denoising the input latent."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="The random seed used for creating the noise."),
                io.Int.Input("steps", default=50, min=1, max=10000,
                             tooltip="Denoising steps. Attend-and-Excite's paper: 50."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale. Attend-and-Excite's paper: 7.5."),
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES,
                               tooltip="Any of ComfyUI's samplers. It runs once over the schedule: the guidance "
                                       "moves its latent before guided steps, so multistep history and the "
                                       "noise of ancestral/SDE samplers carry on."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES,
                               tooltip="The noise schedule."),
                io.Conditioning.Input("positive", tooltip="From Attention Text Encode."),
                io.Conditioning.Input("negative", tooltip="The negative prompt."),
                io.Latent.Input("latent_image", tooltip="The latent image to denoise."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="The amount of denoising applied."),
                *_common_inputs(),
                io.Boolean.Input("record_maps", default=True, **ADVANCED,
                                 tooltip="Record the maps of every step for the visualiser. Off: no capture "
                                         "overhead outside the guided steps."),
                _blocks_input(),
            ],
            outputs=[
                io.Latent.Output(tooltip="The denoised latent."),
                AttentionMaps.Output(display_name="ATTENTION",
                                     tooltip="The subjects' attention maps per step and the guidance losses."),
            ],
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
                subjects, attention_resolution, record_maps, guidance=None, initno=None, blocks="") -> io.NodeOutput:
        latent = latent_image
        samples_in = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        noise = comfy.sample.prepare_noise(samples_in, seed, latent.get("batch_index"))
        ksampler = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                           scheduler=scheduler, denoise=denoise, model_options=model.model_options)
        sampler = AttentionSampler(comfy.samplers.sampler_object(sampler_name), subjects, guidance,
                                   attention_resolution, record_maps, initno, blocks or "")
        callback = latent_preview.prepare_callback(model, steps)
        samples = comfy.sample.sample_custom(model, noise, cfg, sampler, ksampler.sigmas, positive, negative,
                                             samples_in, noise_mask=latent.get("noise_mask"), callback=callback,
                                             disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        out = latent.copy()
        out.pop("downscale_ratio_spacial", None)
        out.pop("downscale_ratio_temporal", None)
        out["samples"] = samples
        return io.NodeOutput(out, sampler.last_record)


class AttentionSamplerNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnGuideSampler",
            display_name="Attention Sampler (AttnGuide)",
            category="sampling/attention guidance",
            description="SAMPLER for SamplerCustom / SamplerCustomAdvanced: any built-in sampler with attention "
                        "guidance before its steps.",
            inputs=[
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES,
                               tooltip="The built-in sampler that takes the steps."),
                *_common_inputs(),
                io.Boolean.Input("record_maps", default=False, **ADVANCED,
                                 tooltip="Record every step's maps, for Attention From Sampler. Off: no capture "
                                         "overhead outside the guided steps."),
                _blocks_input(),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, sampler_name, subjects, attention_resolution, record_maps=False, guidance=None,
                initno=None, blocks="") -> io.NodeOutput:
        return io.NodeOutput(AttentionSampler(comfy.samplers.sampler_object(sampler_name), subjects, guidance,
                                              attention_resolution, record_maps=record_maps, initno=initno,
                                              blocks=blocks or ""))


class AttentionFromSampler(io.ComfyNode):
    """The ATTENTION of an Attention Sampler's last run (SamplerCustom/SamplerCustomAdvanced output no maps)."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnGuideSamplerAttention",
            display_name="Attention From Sampler (AttnGuide)",
            category="sampling/attention guidance",
            description="The attention maps and losses of the run that produced `latent` with an Attention Sampler.",
            inputs=[
                io.Sampler.Input("sampler", tooltip="The SAMPLER of an Attention Sampler node."),
                io.Latent.Input("latent", tooltip="The output of the SamplerCustom(Advanced) that used this sampler: "
                                                  "it makes this node run after the sampling."),
            ],
            outputs=[AttentionMaps.Output(display_name="ATTENTION")],
        )

    @classmethod
    def execute(cls, sampler, latent) -> io.NodeOutput:
        if not isinstance(sampler, AttentionSampler):
            raise ValueError(f"Attention From Sampler: the sampler is a {type(sampler).__name__}; connect the SAMPLER "
                             "of an Attention Sampler (AttnGuide) node")
        if sampler.last_record is None:
            raise ValueError("Attention From Sampler: this sampler has not run yet; connect the LATENT output of the "
                             "SamplerCustom/SamplerCustomAdvanced node that uses it")
        return io.NodeOutput(sampler.last_record)


NODES = [AttentionKSampler, AttentionSamplerNode, AttentionFromSampler]
