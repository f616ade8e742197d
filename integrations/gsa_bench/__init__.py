"""Benchmarks for Gaussian Splat Attention (DESIGN.md section 6), run as ``gsa bench NAME``.

Each benchmark module (``attention``, ...) provides ``add_arguments(parser)`` and ``run(args)`` and
writes JSON (and plots) that the README quotes; ``gsa_bench.timing`` holds the shared pieces: a timer
with a per-call budget, peak memory, the machine's matmul rate, environment info, timestamps and
isolated subprocess runs.
"""
