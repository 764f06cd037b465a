"""Headless Chromium for UI tests, driven over the DevTools protocol (aiohttp's websocket client,
which Ray already installs): load a page, collect console errors and uncaught exceptions, read
the rendered text, save a screenshot. Tests skip with a reason when Chromium is not installed
(Debian: ``apt-get install chromium``; ``.ci/run`` installs it)."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, timeout: float = 60) -> bytes:
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read()
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


@dataclass
class Page:
    text: str  # document.body.innerText once the page settled
    errors: list[str] = field(default_factory=list)  # console.error calls and uncaught exceptions
    screenshot: Path | None = None
    result: object = None  # what ``script`` returned


def load(url: str, *, screenshot: str, wait_for_text: str, timeout: float = 60, width: int = 1400,
         script: str | None = None) -> Page:
    """Open ``url`` in headless Chromium until ``wait_for_text`` is on the page (or ``timeout``),
    run ``script`` (a JavaScript expression, e.g. clicks; its value is ``Page.result``), then return
    the page's text, the console errors and a screenshot saved as ``test-artifacts/<name>``."""
    port = free_port()
    profile = tempfile.mkdtemp(prefix="chromium-")
    proc = subprocess.Popen([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             f"--remote-debugging-port={port}", f"--user-data-dir={profile}",
                             f"--window-size={width},900", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/json/version", timeout=30)
        targets = json.loads(wait_for_http(f"http://127.0.0.1:{port}/json/list"))
        ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        return asyncio.run(_drive(ws_url, url, screenshot, wait_for_text, timeout, script))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)


async def _drive(ws_url: str, url: str, screenshot: str, wait_for_text: str, timeout: float,
                 script: str | None) -> Page:
    import aiohttp

    errors: list[str] = []
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
        counter = 0

        async def call(method: str, **params):
            nonlocal counter
            counter += 1
            await ws.send_json({"id": counter, "method": method, "params": params})
            while True:
                message = json.loads((await ws.receive()).data)
                if message.get("id") == counter:
                    return message.get("result", {})
                _collect(message, errors)

        await call("Runtime.enable")
        await call("Log.enable")
        await call("Page.enable")
        await call("Page.navigate", url=url)
        deadline = time.time() + timeout
        text = ""
        while time.time() < deadline:
            result = await call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''",
                                returnByValue=True)
            text = result.get("result", {}).get("value", "")
            if wait_for_text in text:
                break
            await asyncio.sleep(0.5)
        result = None
        if script is not None:
            evaluated = await call("Runtime.evaluate", expression=script, returnByValue=True)
            result = evaluated.get("result", {}).get("value")
        await asyncio.sleep(1.0)  # let late requests finish and report
        await call("Runtime.evaluate", expression="1")
        shot = await call("Page.captureScreenshot", format="png")
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / screenshot
    path.write_bytes(base64.b64decode(shot["data"]))
    return Page(text=text, errors=errors, screenshot=path, result=result)


def _collect(message: dict, errors: list[str]) -> None:
    method, params = message.get("method"), message.get("params", {})
    if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
        errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
    elif method == "Runtime.exceptionThrown":
        details = params.get("exceptionDetails", {})
        errors.append(details.get("exception", {}).get("description") or details.get("text", "exception"))
    elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
        errors.append(params["entry"].get("text", ""))
