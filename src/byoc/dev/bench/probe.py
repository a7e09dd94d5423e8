"""Polls ``/health`` from a process of its own, so the caller's own work cannot delay the measurement.

``python -m byoc.dev.bench.probe PORT SECONDS HZ`` prints one JSON line: every latency (ms), every status.
Each request opens a new connection, as a Kubernetes or Docker probe does.
"""

from __future__ import annotations

import http.client
import json
import sys
import time

__all__ = ["poll"]


def poll(port: int, seconds: float, hz: float) -> dict[str, list[float]]:
    latencies: list[float] = []
    statuses: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        began = time.perf_counter()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            connection.request("GET", "/health")
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
        except OSError:
            statuses.append(0)
        finally:
            connection.close()
        took = time.perf_counter() - began
        latencies.append(took * 1000)
        time.sleep(max(0.0, 1 / hz - took))
    return {"latencies_ms": latencies, "statuses": statuses}


if __name__ == "__main__":
    print(json.dumps(poll(int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]))))
