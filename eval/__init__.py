"""Benchmarks and evaluations that sit beside training (no training-loop code here)."""
