"""Benchmarks run from the command line (`ninocast bench ...`)."""
