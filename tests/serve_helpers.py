"""A real diffusekit server on a free loopback port, in a thread of the test process (uvicorn)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(**options):
    """Yield ``(base_url, app)`` for a server built from ``ServeConfig(**options)``; stops it afterwards."""
    import uvicorn

    from diffusekit.serve import ServeConfig, create_app

    port = free_port()
    config = ServeConfig(port=port, **options)
    app = create_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(30)


def wait_idle(app, timeout: float = 60.0) -> None:
    """Wait until the server's worker has nothing running or queued (e.g. the start-up model load)."""
    state = app.state.serve
    deadline = time.monotonic() + timeout
    while state.worker.current is not None or len(state.queue):
        if time.monotonic() > deadline:
            raise TimeoutError("server still busy")
        time.sleep(0.02)
