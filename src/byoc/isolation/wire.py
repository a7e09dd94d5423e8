"""What the runtime and a worker process say to each other (docs/architecture.md, "Process isolation").

Two kinds of connection, both ``multiprocessing.connection`` (pickled tuples):

* the **control pipe**, one per worker, made when the worker is spawned. The worker says
  ``("ready", address, custom_audio)`` once ``setup()`` returned, or ``("failed", message)``; the runtime
  says ``("teardown",)`` at the end. Its closing, either way, ends the other side.
* a **session link**, one per session, to the worker's listener (``address``, authenticated with the
  worker's key). The runtime asks, the worker answers each request with one reply; in between, the
  worker may send what the processor emitted (``("data", message)``, ``("event", mapping)``).

Requests and their replies::

    ("start", stream_id, width, height, params)       -> ("ok",)
    ("frame", index, pts, time_base, layout, buffer)  -> ("same",) | ("none",) | ("rgb", height, width)
                                                          | ("inline", array)
    ("audio", frame)                                  -> ("audio", frame) | ("none",)
    ("params", params)                                -> ("ok",)
    ("stop",)                                         -> ("ok",)

``buffer`` is ``None`` or ``(path, size)`` of a new shared buffer to map (byoc.isolation.shared). Any
request may instead be answered ``("error", type_name, message, traceback)`` when a hook raised.
"""

from __future__ import annotations

__all__ = ["AUDIO", "DATA", "ERROR", "EVENT", "FRAME", "INPUT_OFFSET", "OK", "PARAMS", "START", "STOP"]

START, FRAME, AUDIO, PARAMS, STOP = "start", "frame", "audio", "params", "stop"
OK, ERROR, DATA, EVENT = "ok", "error", "data", "event"
INPUT_OFFSET = 0
"""The input frame starts the buffer; the output region follows it."""
