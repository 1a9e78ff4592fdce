"""Thin V3 nodes; each module ends with a NODES list."""
from . import guidance, initno, metrics, sampler, text_encode, visualiser


def all_nodes():
    return text_encode.NODES + guidance.NODES + initno.NODES + sampler.NODES + visualiser.NODES + metrics.NODES
