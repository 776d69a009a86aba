"""Benchmarks of batchfarm against its baselines (``farm bench``)."""
