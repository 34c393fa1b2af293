"""The test engine's KV-cache events, published as vLLM publishes them."""

from __future__ import annotations

import json
from pathlib import Path

from nebula import kv_events


class EventPublisher:
    """vLLM's KV-cache event publisher (`--kv-events-config`), on its ZMQ PUB socket."""

    def __init__(self, config: str) -> None:
        import zmq

        endpoint = json.loads(config)["endpoint"]
        if endpoint.startswith("ipc://"):
            Path(endpoint.removeprefix("ipc://")).parent.mkdir(mode=0o700, exist_ok=True)
        self.socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUB)
        self.socket.bind(endpoint)
        self.sequence = 0
        self.noblock = zmq.NOBLOCK

    def publish(self, events: list[kv_events.Event]) -> None:
        self.sequence += 1
        # A PUB socket drops what no subscriber takes; it never blocks the engine.
        self.socket.send_multipart(kv_events.encode(self.sequence, events), self.noblock)
