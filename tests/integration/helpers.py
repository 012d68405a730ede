"""Helpers that several integration test modules share: HTTP servers on the host's
loopback (the guest's 10.0.2.2 over "nat") and network namespaces for TAP tests."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

Response = tuple[str, bytes]
"""(content type, body)"""


class HostServer:
    """An HTTP server on the host's 127.0.0.1, served from a thread. A GET is answered
    with what ``respond`` gives for its path (None: 404); ``requests`` lists the paths
    asked for, in order."""

    def __init__(self, respond: Callable[[str], Response | None]) -> None:
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append(self.path)
                found = respond(self.path)
                if found is None:
                    self.send_error(404)
                    return
                content_type, body = found
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @classmethod
    def answering(cls, body: bytes) -> HostServer:
        """A server that answers every path with ``body``."""
        return cls(lambda _path: ("text/plain", body))

    @property
    def hits(self) -> int:
        return len(self.requests)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


SERVE_ETC = """
import http.server, os, socketserver, sys
os.chdir("/etc")
class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    allow_reuse_address = True
Server((sys.argv[1], int(sys.argv[2])), http.server.SimpleHTTPRequestHandler).serve_forever()
"""
# (http.server's own HTTPServer looks its address up in DNS before it listens, which can
# take long in a namespace whose resolver is unreachable.)


class Namespaces:
    """Two network namespaces made for the test: ``inner`` holds the TAPs (it stands for
    the host of a root deployment) and ``upstream`` (10.250.0.2, over a veth pair) runs
    HTTP servers on ports 9001 and 9002 that the guests try to reach."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.inner, self.upstream = f"nst{tag}i", f"nst{tag}u"
        self.servers: list[Any] = []
        inner, upstream = self.enter(self.inner), self.enter(self.upstream)
        cmds = [
            ["ip", "netns", "add", self.inner],
            ["ip", "netns", "add", self.upstream],
            [*inner, "ip", "link", "set", "lo", "up"],
            [*upstream, "ip", "link", "set", "lo", "up"],
            ["ip", "link", "add", "nsvi", "netns", self.inner,
             "type", "veth", "peer", "name", "nsvu", "netns", self.upstream],
            [*inner, "ip", "addr", "add", "10.250.0.1/24", "dev", "nsvi"],
            [*inner, "ip", "link", "set", "nsvi", "up"],
            [*upstream, "ip", "addr", "add", "10.250.0.2/24", "dev", "nsvu"],
            [*upstream, "ip", "link", "set", "nsvu", "up"],
            [*upstream, "ip", "route", "add", "default", "via", "10.250.0.1"],
        ]  # fmt: skip
        try:
            for cmd in cmds:
                subprocess.run(cmd, check=True, capture_output=True)
            for port in (9001, 9002):
                self.servers.append(
                    subprocess.Popen(
                        [*upstream, sys.executable, "-c", SERVE_ETC, "10.250.0.2", str(port)],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
            for port in (9001, 9002):
                self.wait_http(self.inner, f"http://10.250.0.2:{port}/hostname")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def enter(netns: str) -> list[str]:
        """An argv prefix that runs the rest in ``netns``."""
        return ["nsenter", f"--net=/run/netns/{netns}"]

    def fetch_from(self, netns: str, url: str) -> subprocess.CompletedProcess[str]:
        code = f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=5).read())"
        return subprocess.run(
            [*self.enter(netns), sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
        )

    def wait_http(self, netns: str, url: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while True:
            done = self.fetch_from(netns, url)
            if done.returncode == 0:
                return done.stdout
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} never answered from {netns}: {done.stderr}")
            time.sleep(0.2)

    def close(self) -> None:
        for server in self.servers:
            server.kill()
            server.wait()
        for ns in (self.inner, self.upstream):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
