"""Models: loading by spec and the per-family architecture adapters."""

from .adapters import ARCHITECTURES, Adapter, get_adapter, neuron_name, parse_neuron
from .load import LoadedModel, ModelSpec, check_compatible, load_model, load_tokenizer, parse_model_spec

__all__ = ["ARCHITECTURES", "Adapter", "get_adapter", "neuron_name", "parse_neuron",
           "LoadedModel", "ModelSpec", "check_compatible", "load_model", "load_tokenizer",
           "parse_model_spec"]
