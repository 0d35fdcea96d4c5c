"""A real HTTP server on a loopback address whose answers a test scripts, recording what each request carried."""
from __future__ import annotations

import http.server
import ssl
import threading
import time
from typing import Callable

Handler = Callable[[http.server.BaseHTTPRequestHandler], None]


def send(status: int, body: bytes = b"", **headers: str) -> Handler:
    def answer(request: http.server.BaseHTTPRequestHandler) -> None:
        request.send_response(status)
        request.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            request.send_header(name.replace("_", "-"), value)
        request.end_headers()
        request.wfile.write(body)
    return answer


def redirect(location: str) -> Handler:
    return send(302, Location=location)


def drip_body(total: int, interval: float) -> Handler:
    """Announce `total` bytes, then send one every `interval` seconds: a per-read timeout never fires."""
    def answer(request: http.server.BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.send_header("Content-Length", str(total))
        request.end_headers()
        for _ in range(total):
            request.wfile.write(b"x")
            request.wfile.flush()
            time.sleep(interval)
    return answer


def drip_headers(count: int, interval: float) -> Handler:
    """A status line, then one short header every `interval` seconds."""
    def answer(request: http.server.BaseHTTPRequestHandler) -> None:
        request.wfile.write(b"HTTP/1.1 200 OK\r\n")
        for n in range(count):
            request.wfile.write(f"X-Drip-{n}: x\r\n".encode())
            request.wfile.flush()
            time.sleep(interval)
    return answer


def drop_after(announced: int, sent: bytes) -> Handler:
    """Announce a body, send part of it, and close the connection."""
    def answer(request: http.server.BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.send_header("Content-Length", str(announced))
        request.send_header("Connection", "close")
        request.end_headers()
        request.wfile.write(sent)
        request.wfile.flush()
        request.close_connection = True
    return answer


class ScriptedServer:
    """Serves `routes` (path -> handler) on host:port in a thread, over TLS when given (cert, key) files; `seen`
    lists (path, Authorization header) and `hosts` the Host headers."""

    def __init__(self, routes: dict[str, Handler] | None = None, host: str = "127.0.0.1", port: int = 0,
                 tls: tuple[str, str] | None = None):
        self.routes = dict(routes or {})
        self.seen: list[tuple[str, str | None]] = []
        self.hosts: list[str | None] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                server.seen.append((self.path, self.headers.get("Authorization")))
                server.hosts.append(self.headers.get("Host"))
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    server.routes.get(self.path.split("?")[0], send(404, b"not found"))(self)
                except OSError:
                    self.close_connection = True  # the client hung up, as a refused or timed-out download does

            do_POST = do_GET

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.url = f"{'https' if tls else 'http'}://{host}:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def paths(self) -> list[str]:
        return [path for path, _ in self.seen]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join()
