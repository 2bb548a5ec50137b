"""Benchmarks: harness, cost/roofline model, hardware table and side-by-side reports.

Nothing here imports mlx or torch at module level, so the cost model and the hardware
table work on any machine.
"""
