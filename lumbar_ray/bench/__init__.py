"""Benchmarks (not tests): scoring throughput and memory, per-stage timings, multi-node scaling."""
