"""The runtime's side of the listener process (byoc.serve.listener): start it with the listening
sockets, keep it told of the ``/health`` answer, and take in the connections it hands over.

The link is a Unix ``SOCK_SEQPACKET`` pair: each message is whole. The runtime sends JSON answers (from
any thread; a full link drops one, the next replaces it); the listener sends each connection's
descriptor with the bytes it read. When the listener ends on its own, :attr:`ListenerProcess.gone`
is set and the runtime serves its sockets itself (byoc.serve.apiserver).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence

from byoc.logs import LOG_FORMAT
from byoc.serve import listener
from byoc.serve.listener import BUFFER_BYTES, HealthAnswer, ListenerOptions

__all__ = ["ListenerProcess"]

log = logging.getLogger(__name__)

_STOP_WAIT_S = 2.0


class ListenerProcess:
    """A running listener process; its methods other than :meth:`publish` run on one event loop."""

    def __init__(
        self,
        listening: Sequence[socket.socket],
        options: ListenerOptions,
        first: HealthAnswer,
        on_connection: Callable[[socket.socket, bytes], None],
        log_level: str = "INFO",
    ) -> None:
        """Start the process. ``on_connection`` gets each connection handed over (a connected socket,
        non-blocking) and what the listener already read from it. Raises OSError when the process or
        its link cannot be made."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            ours.sendall(first.encode())  # waiting for the listener as it starts
            ours.setblocking(False)
            fds = [theirs.fileno(), *(sock.fileno() for sock in listening)]
            command = [sys.executable, "-I", listener.__file__, "--link-fd", str(theirs.fileno())]
            for sock in listening:
                command += ["--listen-fd", str(sock.fileno())]
            command += [
                "--max-connections",
                str(options.max_connections),
                "--header-timeout-s",
                str(options.header_timeout_s),
                "--log-level",
                log_level,
                "--log-format",
                LOG_FORMAT.replace("%(stream_id)s", "-"),
            ]
            self.process = subprocess.Popen(command, pass_fds=fds)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._link = ours
        self._sending = threading.Lock()  # a send from another thread never races the close
        self._on_connection = on_connection
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self.gone = asyncio.Event()
        """Set when the listener process ended (or broke the link) while not being stopped."""
        self._loop.add_reader(ours.fileno(), self._receive)

    def publish(self, answer: HealthAnswer) -> None:
        """Tell the listener the current ``/health`` answer (any thread; never waits)."""
        message = answer.encode()
        with self._sending, contextlib.suppress(OSError):  # full (the next one replaces it) or closed
            self._link.send(message)

    def _receive(self) -> None:
        while True:
            try:
                read, fds, _, _ = socket.recv_fds(self._link, BUFFER_BYTES, 1)
            except BlockingIOError:
                return
            except OSError:
                read, fds = b"", []
            if not fds:
                if not read:
                    self._ended()
                    return
                continue
            try:
                sock = socket.socket(fileno=fds[0])
            except OSError:
                os.close(fds[0])
                continue
            sock.setblocking(False)
            self._on_connection(sock, read)

    def _ended(self) -> None:
        self._loop.remove_reader(self._link.fileno())
        if not self._stopping:
            code = self.process.poll()
            log.error(
                "the listener process %d ended (%s); this process serves the API's port from now on",
                self.process.pid,
                "still running" if code is None else f"exit code {code}",
            )
            self.gone.set()

    async def stop(self) -> None:
        """Close the link (the listener stops accepting and exits) and wait for the process."""
        self._stopping = True
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self._link.fileno())
        with self._sending:
            self._link.close()
        try:
            await asyncio.to_thread(self.process.wait, _STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            await asyncio.to_thread(self.process.wait)
