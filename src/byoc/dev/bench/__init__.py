"""Benchmarks anyone can rerun: ``byoc bench pipeline`` (and, with the runtime, ``byoc bench serve``)."""
