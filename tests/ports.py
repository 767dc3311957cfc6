"""A free loopback port for a test's server (one helper for every harness).

The port is free when this returns; the server binds it a moment later, and another process could
take it in between. Ports that `bind(("127.0.0.1", 0))` hands out come from the kernel's ephemeral
range, the one it also gives every outgoing connection its source port from (the database
clients, HTTP clients and the other test worker's connections, opened all the time), so they are
the likeliest to be taken in that moment. Here the port is drawn at random below that range
(`ip_local_port_range` starts at 32768 on Linux by default), where only servers that pick a port
themselves bind; the draw falls back to the kernel's choice if none of a few is free.
"""

from __future__ import annotations

import random
import socket

BELOW_EPHEMERAL = range(20000, 32000)
DRAWS = 50


def free_port() -> int:
    for port in random.sample(BELOW_EPHEMERAL, DRAWS):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
