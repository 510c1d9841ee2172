"""Run tracking: metrics.jsonl, progress, TensorBoard and wandb sinks, MFU, plots, sweep reports, the dashboard."""

from llmtrain.tracking.logger import LoggerConfig, MetricsLogger, truncate_after

__all__ = ["LoggerConfig", "MetricsLogger", "truncate_after"]
