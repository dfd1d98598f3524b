"""Scoring binary codes: the metrics, their conventions and kernels, the figures and the standalone evaluator."""
