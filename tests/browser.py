"""Drive headless Chromium through the DevTools protocol: open a page, wait for text, screenshot.

``--dump-dom`` snapshots a page after a fixed virtual time, which races TensorBoard's data
requests; polling the live page for the text we wait for does not.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import time
import urllib.request

from tests.helpers import free_port

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Chromium:
    """One headless Chromium with a fresh profile, controlled over its DevTools websocket."""

    def __init__(self, binary: str, profile_dir: str, width: int = 1400, height: int = 1000):
        import websocket  # websocket-client, a test dependency

        port = free_port()
        self.process = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={profile_dir}", f"--window-size={width},{height}",
                                         f"--remote-debugging-port={port}", "about:blank"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2))
                page = next(p for p in pages if p.get("type") == "page")
                break
            except (OSError, StopIteration, ValueError):
                if time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError("Chromium did not open its DevTools port within 60 s")
                time.sleep(0.3)
        self.socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self._ids = itertools.count(1)

    def call(self, method: str, **params):
        request_id = next(self._ids)
        self.socket.send(json.dumps({"id": request_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == request_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def open(self, url: str) -> None:
        self.call("Page.enable")
        self.call("Page.navigate", url=url)

    def wait_for_text(self, text: str, timeout: float = 90.0) -> bool:
        """True once the page's text (whitespace removed: titles are split across elements)
        contains ``text``."""
        deadline = time.monotonic() + timeout
        wanted = json.dumps("".join(text.split()))
        script = f"document.body !== null && document.body.textContent.replace(/\\s+/g, '').includes({wanted})"
        while time.monotonic() < deadline:
            if self.call("Runtime.evaluate", expression=script, returnByValue=True)["result"].get("value"):
                return True
            time.sleep(0.5)
        return False

    def screenshot(self, path: str) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.socket.close()
        except AttributeError:
            pass
        self.process.terminate()
        self.process.wait(timeout=30)
