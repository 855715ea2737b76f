"""Benchmark helpers shared by the bench commands (hilt_scale.bench_step)."""
