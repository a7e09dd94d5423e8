"""Process isolation (``--isolation process``): the processor runs in worker processes, so that a native
crash or a leak ends or recycles one worker, not the container (docs/architecture.md).

:class:`WorkerPool` starts and watches the workers; the :class:`RemoteProcessor` it hands out is what
sessions call, hook for hook, as they would call the processor itself.
"""

from byoc.isolation.pool import PoolSettings, WorkerPool
from byoc.isolation.remote import RemoteProcessor

__all__ = ["PoolSettings", "RemoteProcessor", "WorkerPool"]
