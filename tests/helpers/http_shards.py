"""A loopback HTTP server for shard tests: serves a folder, counts requests, and injects faults.

    with ShardServer(folder) as server:
        server.url("digits-8/")                       # http://127.0.0.1:PORT/digits-8/
        server.faults["/digits-8/shard-000003.tar"] = ["missing"]   # the next request gets a 404
        server.requests["/digits-8/shard-000003.tar"]               # how many GETs it received

A fault is used up by one request, so later epochs see the shard again. Faults: "missing" (404),
"cut" (the headers promise the whole file, half of it is sent, then the connection closes), "garbled"
(the whole file with its middle bytes replaced: a complete download that fails its digest).
"""
from __future__ import annotations

import collections
import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Handler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass

    def do_GET(self) -> None:
        server = self.server.owner
        with server.lock:
            server.requests[self.path] += 1
            pending = server.faults.get(self.path)
            fault = pending.pop(0) if pending else None
        if fault == "missing":
            self.send_error(404)
            return
        if fault in ("cut", "garbled"):
            payload = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
            if fault == "garbled":
                middle = len(payload) // 2
                payload = payload[:middle] + bytes(64) + payload[middle + 64:]
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload if fault == "garbled" else payload[:len(payload) // 2])
            self.close_connection = True
            return
        super().do_GET()


class ShardServer:
    """Serves `folder` on 127.0.0.1 (a free port) from a thread, between `__enter__` and `__exit__`."""

    def __init__(self, folder: Path):
        self.lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()
        self.faults: dict[str, list[str]] = {}
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(folder)))
        self.httpd.daemon_threads = True
        self.httpd.owner = self
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{path}"

    def __enter__(self) -> "ShardServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()  # returns once serve_forever has stopped
        self.httpd.server_close()
        self.thread.join(timeout=10)
