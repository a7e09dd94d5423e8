"""The runtime a container ships: ``Runtime`` (start-up, serving, drain), its HTTP API, admission,
health, metrics, GPU readings, settings and registration. Nothing here imports ``byoc.dev``."""
