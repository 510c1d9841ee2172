"""Hydra launcher plugins shipped with llmtrain (`hydra/launcher=torchrun`)."""
