"""byoc — the production runtime for Livepeer BYOC live-video containers."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
