"""gam_ext: fast kernels and modules for the Gated Associative Memory (GAM) sequence model."""

from gam_ext import reference
from gam_ext._backend import backend_info, get_backend, set_backend
from gam_ext.generation import GAMState
from gam_ext.modules import GAMBlock, GAMConfig, GAMModel
from gam_ext.ops import (
    causal_conv1d,
    causal_conv1d_update,
    gam_block,
    gam_mixer,
    gam_mixer_step,
    gate_fusion,
    memory_retrieval,
)

__version__ = "0.1.0"

__all__ = [
    "GAMBlock",
    "GAMConfig",
    "GAMModel",
    "GAMState",
    "backend_info",
    "causal_conv1d",
    "causal_conv1d_update",
    "gam_block",
    "gam_mixer",
    "gam_mixer_step",
    "gate_fusion",
    "get_backend",
    "memory_retrieval",
    "reference",
    "set_backend",
]
