"""Model families, registered by name (see base.ModelSpec)."""

from llmtrain.models.base import Batch, DataInfo, ModelSpec, get_model_spec, register_model

__all__ = ["Batch", "DataInfo", "ModelSpec", "get_model_spec", "register_model"]
