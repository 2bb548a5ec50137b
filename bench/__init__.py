"""Benchmarks: harness, cost/roofline model, hardware table and side-by-side reports.

Only step_hygiene.py (the MLX loop's probes) imports mlx at module level; nothing
imports torch there, so the cost model (cost, pass_cost, drafter_cost, roofline,
projection) and the hardware table work on any machine.
"""
