"""Benchmarks of the service (never tests: they assert nothing about speed)."""
