"""Harnesses that run the product as an operator does, for the demo, tests and benchmarks."""
