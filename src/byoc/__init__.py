"""byoc — the production runtime for Livepeer live-video containers.

The model author's API::

    from byoc import Frame, Processor, SessionContext
"""

from __future__ import annotations

from byoc.processor import Frame, Processor, SessionContext, load_processor

__all__ = ["Frame", "Processor", "SessionContext", "__version__", "load_processor"]

__version__ = "0.1.0"
