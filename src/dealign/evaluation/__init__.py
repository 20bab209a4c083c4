"""Evaluation: task data, metrics and summaries of batch-generation outputs."""
