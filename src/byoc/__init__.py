"""byoc — the production runtime for Livepeer live-video containers.

The model author's API::

    from byoc import Frame, Processor, SessionContext

and its tests run a processor through a real session with :mod:`byoc.testing`. ``byoc init NAME``
starts a processor project (:mod:`byoc.scaffold`).
"""

from __future__ import annotations

from byoc.processor import Frame, Processor, SessionContext, load_processor

__all__ = ["Frame", "Processor", "SessionContext", "__version__", "load_processor"]

__version__ = "0.1.0"
"""The one place the version is written: pyproject.toml reads it (``[tool.setuptools.dynamic]``)."""
