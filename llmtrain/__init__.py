"""llmtrain: train models from toy regressors to GPT-2 on one CPU, one GPU or many GPUs."""

__version__ = "0.1.0"
