"""The asv benchmark suite of gipo-core (asv's ``benchmark_dir``); what it runs lives in ``benchmarks/legs.py``."""
