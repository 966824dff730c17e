"""The server ceiling: a handler that answers every request at once without touching its body.

The bench serves it with the same TorchServe configuration as the real model, so its throughput is
the most the frontend, the worker IPC and HTTP allow on this host: the ceiling for any handler.
"""

from __future__ import annotations

from ts.torch_handler.base_handler import BaseHandler


class EmptyHandler(BaseHandler):
    """Loads nothing; answers `[]` with status 200 for each request of the batch."""

    def initialize(self, context) -> None:
        self.initialized = True

    def handle(self, data, context):
        return ["[]"] * len(data)
