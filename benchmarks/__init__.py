"""Benchmarks that print tables: the suite (every family), contrastive memory, data pipeline."""
