"""Generation: sampling processors, the KV-cache decoding engine, sources, the CLI and perplexity eval."""

from llmtrain.generation.engine import Completion, GenerationConfig, Generator
from llmtrain.generation.sampling import SamplingConfig

__all__ = ["Completion", "GenerationConfig", "Generator", "SamplingConfig"]
