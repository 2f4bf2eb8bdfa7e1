"""An HTTP proxy in front of moto that answers like real S3 where moto does not.

moto stores what real S3 refuses: more than 2 KB of user metadata, keys over 1,024 bytes. The
proxy refuses those with S3's own error codes, and can be told to fail PUTs of chosen objects
(a permanent refusal, or a transient 500 for that object only) to exercise the writer's
handling of answers moto never gives. Everything else is passed to moto unchanged.
"""

from __future__ import annotations

import http.client
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

S3_METADATA_LIMIT = 2048
S3_KEY_LIMIT = 1024
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}


@dataclass
class Fault:
    status: int
    code: str
    times: int | None = None  # answer this many PUTs, then let the object through; None: all


@dataclass
class S3Proxy:
    upstream_port: int
    faults: dict[str, Fault] = field(default_factory=dict)  # key substring -> answer
    refused: list[str] = field(default_factory=list)  # (code, key) of every refusal, in order
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.server_address[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _error(self, status: int, code: str, key: str) -> None:
                proxy.refused.append(f"{code} {key[:80]}")
                body = (
                    f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                    f"<Message>{code} (test proxy)</Message></Error>"
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _check_put(self, key: str) -> bool:
                meta = sum(
                    len(name.encode()) + len(value.encode())
                    for name, value in self.headers.items()
                    if name.lower().startswith("x-amz-meta-")
                )
                if meta > S3_METADATA_LIMIT:
                    self._error(400, "MetadataTooLarge", key)
                    return False
                if len(key.encode()) > S3_KEY_LIMIT:
                    self._error(400, "KeyTooLongError", key)
                    return False
                for needle, fault in list(proxy.faults.items()):
                    if needle in key:
                        with proxy.lock:
                            if fault.times is not None:
                                if fault.times <= 0:
                                    continue
                                fault.times -= 1
                        self._error(fault.status, fault.code, key)
                        return False
                return True

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                key = unquote(urlsplit(self.path).path.lstrip("/").partition("/")[2])
                if self.command == "PUT" and key and not self._check_put(key):
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                conn.request(self.command, self.path, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in _HOP_BY_HOP | {"content-length"}:
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
