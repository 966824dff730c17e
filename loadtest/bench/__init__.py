"""The benchmark suite: compute limit, server ceiling, stock peers, sweep and soak, each against a real
TorchServe driven by real Locust. Its handlers (empty_handler, stock_peer_handler, stock_text_handler) are
served only by these benchmarks, never by `make serve`.

Nothing is imported here: drive.py must monkey-patch gevent before anything else loads.
"""
