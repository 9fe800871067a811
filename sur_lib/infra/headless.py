"""Headless Chromium, driven over the DevTools protocol on a pipe (no extra packages).

``Chromium`` starts ``chromium --headless --remote-debugging-pipe``, opens one page and offers
what the demo's test, benchmark and screenshots need: evaluate JavaScript (awaiting promises),
wait for a condition, take a PNG screenshot. The protocol's messages are JSON objects
separated by NUL bytes on file descriptors 3 (to the browser) and 4 (from it).

    with Chromium() as browser:
        browser.open("http://127.0.0.1:8000/demo.html")
        browser.evaluate("document.title")
        browser.screenshot("page.png", width=1400)
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path


def chromium_path() -> str | None:
    """The Chromium executable on PATH (Debian's ``chromium``), or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


class BrowserError(RuntimeError):
    pass


class Chromium:
    """One headless Chromium with one page. ``extra_args`` go on its command line."""

    def __init__(self, exe: str | None = None, extra_args=(), timeout: float = 60.0):
        self.exe = exe or chromium_path()
        if self.exe is None:
            raise FileNotFoundError("chromium is not installed (Debian: apt-get install chromium)")
        self.timeout = timeout
        self.extra_args = list(extra_args)
        self._id = 0
        self._buf = b""
        self.console: list[str] = []

    # ---- process -------------------------------------------------------------------------
    def __enter__(self) -> "Chromium":
        self.profile = tempfile.mkdtemp(prefix="sur-chromium-")
        to_r, self._to_w = os.pipe()
        self._from_r, from_w = os.pipe()

        def child_fds():  # the browser reads fd 3 and writes fd 4
            a, b = os.dup(to_r), os.dup(from_w)
            os.dup2(a, 3, inheritable=True)
            os.dup2(b, 4, inheritable=True)

        cmd = [self.exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-quic", "--mute-audio", "--hide-scrollbars",
               "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
               f"--user-data-dir={self.profile}", "--remote-debugging-pipe",
               *self.extra_args, "about:blank"]
        self.proc = subprocess.Popen(cmd, preexec_fn=child_fds, close_fds=False,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_r)
        os.close(from_w)
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Runtime.enable", session=True)
        self.call("Page.enable", session=True)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_w, self._from_r):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)

    # ---- protocol ------------------------------------------------------------------------
    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            if time.time() > deadline:
                raise TimeoutError("no answer from chromium in time")
            chunk = self._read_chunk(deadline - time.time())
            if not chunk:
                raise BrowserError("chromium closed the DevTools pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def _read_chunk(self, timeout: float) -> bytes:
        import select

        ready, _, _ = select.select([self._from_r], [], [], max(timeout, 0.0))
        return os.read(self._from_r, 1 << 20) if ready else b""

    def call(self, method: str, params: dict | None = None, session: bool = False,
             timeout: float | None = None) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        os.write(self._to_w, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + (timeout or self.timeout)
        while True:
            reply = self._read_message(deadline)
            if reply.get("method") == "Runtime.consoleAPICalled":
                args = reply["params"].get("args", [])
                self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error'].get('message')}")
                return reply.get("result", {})

    # ---- page ----------------------------------------------------------------------------
    def open(self, url: str, width: int = 1400, height: int = 1000) -> None:
        self.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                         "deviceScaleFactor": 1, "mobile": False},
                  session=True)
        self.call("Page.navigate", {"url": url}, session=True)
        self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'")

    def evaluate(self, expression: str, timeout: float | None = None):
        """The value of a JavaScript expression (a promise is awaited); JS errors raise."""
        res = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                             "returnByValue": True}, session=True,
                        timeout=timeout)
        if "exceptionDetails" in res:
            d = res["exceptionDetails"]
            text = d.get("exception", {}).get("description") or d.get("text")
            raise BrowserError(f"JavaScript error: {text}")
        return res["result"].get("value")

    def wait_for(self, expression: str, timeout: float | None = None, poll: float = 0.2):
        deadline = time.time() + (timeout or self.timeout)
        while time.time() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(poll)
        raise TimeoutError(f"timed out waiting for {expression!r}")

    def screenshot(self, path: str | os.PathLike, width: int = 1400) -> Path:
        """A PNG of the whole page at ``width`` CSS pixels (device scale 1)."""
        height = int(self.evaluate("Math.ceil(document.documentElement.scrollHeight)"))
        self.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                         "deviceScaleFactor": 1, "mobile": False},
                  session=True)
        data = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
                         session=True)["data"]
        path = Path(path)
        path.write_bytes(base64.b64decode(data))
        return path


def serve(folder: str | os.PathLike, inject: str | None = None):
    """A local HTTP server for ``folder`` on 127.0.0.1 (a free port), in a daemon thread:
    returns (server, base_url); call ``server.shutdown()`` when done. ``inject``: HTML put
    before ``</body>`` of a page asked for as ``PAGE?inject`` (a test's measuring script)."""
    import functools
    import http.server
    import socketserver

    class Handler(http.server.SimpleHTTPRequestHandler):
        extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                          ".wasm": "application/wasm", ".js": "text/javascript",
                          ".onnx": "application/octet-stream"}

        def do_GET(self):
            name, _, query = self.path.partition("?")
            if inject is None or query != "inject":
                return super().do_GET()
            page = Path(self.directory) / name.lstrip("/")
            data = page.read_text(encoding="utf-8").replace("</body>", inject + "</body>").encode("utf-8")
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True

        def handle_error(self, request, client_address):  # a browser that drops a download
            import sys

            if not isinstance(sys.exc_info()[1], (ConnectionError, BrokenPipeError)):
                super().handle_error(request, client_address)

    server = Server(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def dump_dom(url: str, exe: str | None = None, virtual_ms: int = 15000, width: int = 1400,
             timeout: float = 120, extra_args=()) -> str:
    """The DOM of ``url`` after ``virtual_ms`` of virtual time (``chromium --headless
    --dump-dom``: timers run without waiting in real time), offline: every host but 127.0.0.1
    is unresolvable. Raises BrowserError if Chromium fails."""
    exe = exe or chromium_path()
    if exe is None:
        raise BrowserError("chromium not found on PATH (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-quic", f"--user-data-dir={profile}", f"--window-size={width},1000",
               "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
               f"--virtual-time-budget={virtual_ms}", *extra_args, "--dump-dom", url]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or "</html>" not in proc.stdout:
        raise BrowserError(f"chromium --dump-dom {url} failed: {proc.stderr[-1500:]}")
    return proc.stdout
