"""Attention backends: ``dense`` (exact reference), ``kernel`` (linear time), ``sparse`` (top-k)."""
