"""moezoo: a Mixture-of-Experts model zoo on one shared MoE backbone, with Hugging Face conventions.

>>> import moezoo
>>> moezoo.list_models("lm_*")
['lm_small_e16k2', 'lm_tiny_e8k2']
>>> model = moezoo.create_model("lm_tiny_e8k2", tiny=True)

Importing moezoo registers every family with ``AutoConfig`` / ``AutoModel`` / its task Auto class, so
``AutoModelForCausalLM.from_pretrained(folder)`` works without ``trust_remote_code``.
"""
__version__ = "0.1.0"

from . import core  # noqa: F401  (registers the "moezoo" experts implementation)
from .modeling_utils import MoezooConfig, MoezooPreTrainedModel
from .safety import PickleCheckpointError
from .registry import (UnknownModelError, create_model, get_model_config, get_model_entry, list_families, list_models,
                       list_pretrained, register_family, register_model)
from . import models  # noqa: E402,F401  (imports and registers every family)

__all__ = [
    "__version__", "MoezooConfig", "MoezooPreTrainedModel", "PickleCheckpointError", "UnknownModelError",
    "create_model", "get_model_config", "get_model_entry", "list_families", "list_models", "list_pretrained",
    "register_family", "register_model",
]
