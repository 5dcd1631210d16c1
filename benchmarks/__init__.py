"""Benchmarks of igrpn (not part of the installed package): ``python -m benchmarks.bench``."""
