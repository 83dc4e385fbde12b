"""Benchmarks behind ``corefbot bench``: each prints its figures and can write a JSON report."""
