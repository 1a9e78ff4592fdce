"""Attention InitNO: the settings of InitNO's initial-noise optimisation, for the Attention samplers."""
from comfy_api.latest import io

from ..guidance.initno import InitNOConfig
from .types import ADVANCED, InitNO


class AttentionInitNO(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnGuideInitNO",
            display_name="Attention InitNO (AttnGuide)",
            category="sampling/attention guidance",
            description="InitNO (Guo et al. 2024): before the first step, optimise the starting noise so that every "
                        "subject is attended and the subjects do not share pixels; the noise stays N(0, 1). Connect "
                        "to an Attention sampler's initno input.",
            inputs=[
                io.Int.Input("rounds", default=5, min=1, max=50,
                             tooltip="Restarts from fresh noise (seed + round) until one succeeds. Paper: 5."),
                io.Int.Input("iterations", default=10, min=0, max=500,
                             tooltip="Optimisation steps per round (one conditional pass each). Paper: 10."),
                io.Int.Input("final_iterations", default=50, min=0, max=1000,
                             tooltip="Steps for the best round when none succeeded. Paper: 50."),
                io.Float.Input("learning_rate", default=0.01, min=0.0001, max=1.0, step=0.001, **ADVANCED,
                               tooltip="Adam's learning rate on the noise's mean and log-variance. Paper: 0.01."),
                io.Float.Input("tau_response", default=0.2, min=0.0, max=1.0, step=0.01, **ADVANCED,
                               tooltip="Success: the weakest subject's response score (1 - peak) below this. "
                                       "Paper: 0.2."),
                io.Float.Input("tau_conflict", default=0.3, min=0.0, max=1.0, step=0.01, **ADVANCED,
                               tooltip="Success: the subjects' self-attention overlap below this. Paper: 0.3."),
                io.Float.Input("kl_bound", default=0.001, min=0.00001, max=1.0, step=0.0001, **ADVANCED,
                               tooltip="How far each image's noise may move from N(0, 1): its reparameterisation's "
                                       "KL (mean over elements) is brought below this after every step. Default "
                                       "0.001, the value the stage had before this input."),
            ],
            outputs=[InitNO.Output(display_name="INITNO")],
        )

    @classmethod
    def execute(cls, rounds, iterations, final_iterations, learning_rate=0.01, tau_response=0.2,
                tau_conflict=0.3, kl_bound=0.001) -> io.NodeOutput:
        return io.NodeOutput(InitNOConfig(rounds=rounds, iterations=iterations, final_iterations=final_iterations,
                                          learning_rate=learning_rate, tau_response=tau_response,
                                          tau_conflict=tau_conflict, kl_bound=kl_bound))


NODES = [AttentionInitNO]
