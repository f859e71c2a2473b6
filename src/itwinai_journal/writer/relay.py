"""Records logged in forked child processes travel to the parent's journal writer.

A DataLoader worker started with the fork start method, a `multiprocessing` child or a plain
`os.fork()` inherits the parent's loggers and, with them, its writer: the same queue, the same
open segment, the same seq counter. Writing from the child would put two writers on one rank
(duplicate seqs, a segment sealed under the parent's feet); a journal of the child's own would
need the reader, `verify` and every exporter to learn a second layout. So a child sends its
records to the parent, whose flusher numbers and writes them like its own records: the rank
stays one ordered stream and nothing downstream changes.

The channel is a Unix datagram socket pair, made in the parent just before its first fork with a
journal open (`os.register_at_fork`), so a process that never forks pays nothing. A datagram
arrives whole or not at all, so any number of children can send at once without interleaving.
"""

from __future__ import annotations

import errno
import pickle
import socket
from contextlib import suppress

#: Records are sent in datagrams of about this size; a larger record goes alone.
CHUNK_BYTES = 64 << 10
#: The largest datagram either end handles; a record larger than this is dropped and counted.
MAX_DATAGRAM = 1 << 20
#: How long a child waits for room in the channel (the parent stalled) before it drops the rest
#: of a batch.
SEND_TIMEOUT = 10.0


class Relay:
    """The parent end receives, without blocking, in the parent's flusher thread; children send
    from theirs. Each datagram is a pickled `(dropped, records)`: records as the writer queues
    them (plain Python values only), and how many records the child had to drop before sending,
    so that the parent's manifest counts them too."""

    def __init__(self) -> None:
        self._recv, self._send = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._recv.setblocking(False)
        with suppress(OSError):  # the kernel caps it at net.core.wmem_max
            self._send.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 * MAX_DATAGRAM)
        self._buffer = bytearray(MAX_DATAGRAM)
        self._unreported = 0

    # -- the parent -----------------------------------------------------------------------------

    def receive(self) -> tuple[list[tuple], int]:
        """Every datagram waiting: (records in arrival order, records the children dropped)."""
        records: list[tuple] = []
        dropped = 0
        view = memoryview(self._buffer)
        while True:
            try:
                n = self._recv.recv_into(self._buffer)
            except BlockingIOError:
                return records, dropped
            lost, batch = pickle.loads(view[:n])
            dropped += lost
            records.extend(batch)

    def stop_receiving(self) -> None:
        """At the session's end, before the last `receive()`: from now on a child's send fails
        (EPIPE), so the child warns and counts what it could not send, and every datagram
        accepted before is still queued for that last `receive()`. (The kernel checks the
        shutdown and queues a datagram under one lock: none can slip in between.)"""
        with suppress(OSError):
            self._recv.shutdown(socket.SHUT_RD)

    def close(self) -> None:
        """Close both ends in this process; children sending afterwards are refused."""
        self._recv.close()
        self._send.close()

    # -- a child --------------------------------------------------------------------------------

    def in_child(self) -> None:
        """Called in a forked child: this process only sends (closing its copy of the parent's
        end does not affect the parent), and never waits longer than SEND_TIMEOUT."""
        self._recv.close()
        self._buffer = bytearray()
        self._send.settimeout(SEND_TIMEOUT)

    def send(self, records: list[tuple], dropped: int) -> tuple[int, OSError | None]:
        """Send `records`, and a count of records this process dropped (`dropped` plus any
        record too large for a datagram) for the parent's manifest. Returns how many records did
        not reach the parent and the first error met. After a failed send the rest of the batch
        is not tried: a stalled or closed parent would make each datagram wait or fail in turn."""
        lost = 0
        first_error: OSError | None = None
        broken = False
        for count, data in _datagrams(records):
            if not broken and len(data) > MAX_DATAGRAM:
                first_error = first_error or OSError(
                    errno.EMSGSIZE, f"a record of {len(data)} bytes does not fit in a datagram")
                dropped += count
            elif not broken:
                try:
                    self._send.send(data, socket.MSG_NOSIGNAL)
                    continue
                except OSError as e:
                    first_error = first_error or e
                    broken = True
            lost += count
        self._unreported += dropped
        if self._unreported and not broken:
            try:
                self._send.send(pickle.dumps((self._unreported, []), pickle.HIGHEST_PROTOCOL),
                                socket.MSG_NOSIGNAL)
                self._unreported = 0
            except OSError as e:
                first_error = first_error or e
        return lost, first_error


def _datagrams(records: list[tuple]):
    """(number of records, datagram) pairs of about CHUNK_BYTES each."""
    data = pickle.dumps((0, records), pickle.HIGHEST_PROTOCOL)
    if len(data) <= CHUNK_BYTES or len(records) <= 1:
        if records:
            yield len(records), data
        return
    per_chunk = max(1, len(records) * CHUNK_BYTES // len(data))
    for start in range(0, len(records), per_chunk):
        yield from _datagrams(records[start:start + per_chunk])
