"""Benchmarks that drive a train or inference step (step time, long context, latency, the
inference report). They sit above train/ and infer/, so nothing below imports them."""
