"""Pytest fixtures running the test Hub server and pointing huggingface_hub (and transformers) at it.

Register this module as a plugin in the root ``conftest.py``: ``pytest_plugins = ["tests.hubserver.fixture"]``.

``hub_server`` (session scope)
    The server, started once per session as a subprocess (``python -m tests.hubserver``) on a free loopback port,
    with its storage in a temporary directory. Attributes: ``url``, ``token`` (write token of user ``"user"``),
    ``other_token`` (token of user ``"someone"``), ``user``, ``other_user``, ``storage_dir``, ``running``; methods
    ``stop()`` and ``start()`` (restarts on the same port with the same storage, for offline-then-online tests) and
    ``log_tail()``. Stopped by PID at the end of the session (SIGTERM, then SIGKILL after a timeout).

``hub`` (function scope)
    Makes every huggingface_hub / transformers call of the test, in-process or in a child process, go to the server
    with a fresh, empty ``HF_HOME``, no token and online mode; everything is restored afterwards. Restarts the server
    if a previous test left it stopped. Attributes: ``url``, ``token``, ``other_token``, ``user``, ``other_user``,
    ``server`` (the ``hub_server``), ``api`` (an ``HfApi`` with the write token), ``hf_home``, ``cache_dir``;
    helpers ``repo_id(prefix)`` (a fresh repo id in the user's namespace: the storage is shared by the whole
    session), ``fresh_cache()`` (switch to a new empty hub cache), ``login(token=None)`` (set ``HF_TOKEN``) and
    ``go_offline()`` (``HF_HUB_OFFLINE=1`` for the rest of the test).

Why so much patching: huggingface_hub reads ``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_OFFLINE``... once, at import, into
``huggingface_hub.constants`` (and a few modules copy them further: the default ``HfApi`` behind the module-level
functions, the hosts trusted for redirects, the cache scanner...), and transformers caches its own ``HfApi``. Setting
the environment variables covers child processes; patching those copies covers the current process.
"""

from __future__ import annotations

import importlib
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pytest

if TYPE_CHECKING:
    from huggingface_hub import HfApi

REPO_ROOT = Path(__file__).resolve().parents[2]

#: Environment variables cleared for a ``hub`` test: they would point huggingface_hub elsewhere or offline.
_CLEARED_ENV_VARS = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_TOKEN_PATH",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_ASSETS_CACHE",
    "HUGGINGFACE_ASSETS_CACHE",
    "HF_XET_CACHE",
    "HUGGINGFACE_CO_STAGING",
)


def _close_hf_http_session() -> None:
    """Drop huggingface_hub's shared HTTP client (if it was ever created), so no connection outlives a server."""
    http = sys.modules.get("huggingface_hub.utils._http")
    if http is not None:
        http.close_session()


class HubServer:
    """The test Hub server running as a subprocess on a loopback port (see the module docstring)."""

    user = "user"
    other_user = "someone"

    def __init__(self, storage_dir: Path, log_dir: Path, *, startup_timeout: float = 30.0):
        self.storage_dir = Path(storage_dir)
        self.log_dir = Path(log_dir)
        self.startup_timeout = startup_timeout
        self.token = f"hf_test_{secrets.token_hex(16)}"
        self.other_token = f"hf_test_{secrets.token_hex(16)}"
        self.port: int | None = None
        self.url: str | None = None
        self.stdout_path = self.log_dir / "hubserver.stdout.log"
        self.stderr_path = self.log_dir / "hubserver.stderr.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server (on the port of the previous run, if any) and wait until it serves; no-op if running."""
        if self.running:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        stdout_offset = self.stdout_path.stat().st_size if self.stdout_path.exists() else 0
        command = [
            sys.executable, "-m", "tests.hubserver",
            "--host", "127.0.0.1",
            "--port", str(self.port or 0),
            "--storage", str(self.storage_dir),
            "--log-level", "info",
        ]  # fmt: skip
        env = dict(os.environ, HUBSERVER_TOKENS=f"{self.user}:{self.token},{self.other_user}:{self.other_token}")
        with open(self.stdout_path, "ab") as stdout, open(self.stderr_path, "ab") as stderr:
            self._process = subprocess.Popen(
                command, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr
            )
        url = self._wait_for_url(stdout_offset)
        port = urlsplit(url).port
        if self.port is not None and port != self.port:
            self.stop()
            raise RuntimeError(f"The test Hub server restarted on port {port} instead of {self.port}")
        self.port, self.url = port, url

    def _wait_for_url(self, stdout_offset: int) -> str:
        """Wait (bounded) for the ``HUB_URL=...`` line; raise with the server's stderr if it dies or takes too long."""
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout
        while True:
            with open(self.stdout_path, "rb") as f:
                f.seek(stdout_offset)
                match = re.search(rb"^HUB_URL=(\S+)$", f.read(), re.MULTILINE)
            if match is not None:
                return match.group(1).decode()
            returncode = self._process.poll()
            if returncode is not None:
                self._process = None
                raise RuntimeError(
                    f"The test Hub server exited with code {returncode} before serving. Its stderr:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"The test Hub server did not start within {self.startup_timeout}s. Its stderr:\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server by its PID (SIGTERM, then SIGKILL after ``timeout`` seconds); no-op if not running."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        _close_hf_http_session()

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server's stderr (uvicorn errors and tracebacks)."""
        if not self.stderr_path.exists():
            return "<no output>"
        return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-lines:]) or "<no output>"


class Hub:
    """What the ``hub`` fixture yields: the server's coordinates plus helpers bound to the current test."""

    def __init__(self, server: HubServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
        from huggingface_hub import HfApi

        assert server.url is not None
        self.server = server
        self.url: str = server.url
        self.token = server.token
        self.other_token = server.other_token
        self.user = server.user
        self.other_user = server.other_user
        self.hf_home = tmp_path / "hf_home"
        self._monkeypatch = monkeypatch
        self._tmp_path = tmp_path
        self._point_huggingface_hub_at_server()
        self.api: HfApi = HfApi(endpoint=self.url, token=self.token)

    # ---- setup ------------------------------------------------------------------------------------------------------

    def _setattr(self, module_name: str, attribute: str, value: Any, *, import_module: bool = True) -> None:
        """Patch ``module.attribute`` for this test if the module (imported if needed) has that attribute."""
        module = importlib.import_module(module_name) if import_module else sys.modules.get(module_name)
        if module is not None and hasattr(module, attribute):
            self._monkeypatch.setattr(module, attribute, value)

    def _point_huggingface_hub_at_server(self) -> None:
        url, home = self.url, self.hf_home
        home.mkdir(parents=True)
        mp = self._monkeypatch

        # Child processes (and anything reading the environment at call time).
        for name in _CLEARED_ENV_VARS:
            mp.delenv(name, raising=False)
        mp.setenv("HF_ENDPOINT", url)
        mp.setenv("HF_HOME", str(home))
        mp.setenv("HF_HUB_DISABLE_XET", "1")
        mp.setenv("HF_HUB_DISABLE_TELEMETRY", "1")

        # This process: huggingface_hub.constants, read at import time...
        constants = "huggingface_hub.constants"
        self._setattr(constants, "ENDPOINT", url)
        self._setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
        hf_constants = importlib.import_module(constants)
        self._setattr(constants, "HF_URL_HOSTS", frozenset(hf_constants.HF_URL_HOSTS) | {urlsplit(url).hostname})
        self._setattr(constants, "HF_HOME", str(home))
        self._setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
        self._setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
        self._setattr(constants, "HF_ASSETS_CACHE", str(home / "assets"))
        self._setattr(constants, "HUGGINGFACE_ASSETS_CACHE", str(home / "assets"))
        self._setattr(constants, "HF_XET_CACHE", str(home / "xet"))
        self._setattr(constants, "AGENT_HARNESSES_PATH", str(home / ".agent_harnesses.json"))
        self._setattr(constants, "HF_HUB_OFFLINE", False)
        self._setattr(constants, "HF_HUB_DISABLE_XET", True)
        self._set_hub_cache(home / "hub")
        # ... and the copies other modules made of them.
        api = importlib.import_module("huggingface_hub.hf_api").api  # behind huggingface_hub.create_repo & co.
        mp.setattr(api, "endpoint", url)
        http = importlib.import_module("huggingface_hub.utils._http")
        if hasattr(http, "_HUB_ORIGINS") and hasattr(http, "_url_origin"):
            self._setattr(http.__name__, "_HUB_ORIGINS", frozenset(http._HUB_ORIGINS) | {http._url_origin(url)})
        self._setattr("huggingface_hub.utils._cache_assets", "HF_ASSETS_CACHE", str(home / "assets"))
        self._setattr("huggingface_hub.utils._git_credential", "ENDPOINT", url)
        # transformers routes its Hub calls through a lazily created, cached HfApi: drop it (see also `close`).
        self._setattr("transformers.utils.hub", "_hf_api", None, import_module=False)
        _close_hf_http_session()

    def _set_hub_cache(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self._monkeypatch.setenv("HF_HUB_CACHE", str(path))
        for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "default_cache_path"):
            self._setattr("huggingface_hub.constants", name, str(path))
        self._setattr("huggingface_hub.utils._cache_manager", "HF_HUB_CACHE", str(path))

    def close(self) -> None:
        """Teardown (before the monkeypatches are undone): forget clients created during the test."""
        _close_hf_http_session()
        transformers_hub = sys.modules.get("transformers.utils.hub")
        if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
            transformers_hub._hf_api = None  # type: ignore[attr-defined]

    # ---- helpers ----------------------------------------------------------------------------------------------------

    @property
    def cache_dir(self) -> Path:
        """The hub cache currently in use (``HF_HUB_CACHE``)."""
        return Path(importlib.import_module("huggingface_hub.constants").HF_HUB_CACHE)

    def repo_id(self, prefix: str = "repo") -> str:
        """A new, unused repo id in the user's namespace (the server's storage is shared by the whole session)."""
        return f"{self.user}/{prefix}-{secrets.token_hex(4)}"

    def fresh_cache(self) -> Path:
        """Switch huggingface_hub to a new, empty hub cache for the rest of the test and return its path."""
        path = self._tmp_path / f"hub-cache-{secrets.token_hex(4)}"
        self._set_hub_cache(path)
        return path

    def login(self, token: str | None = None) -> None:
        """Set ``HF_TOKEN`` (default: the write token) for the rest of the test, for code using the implicit token."""
        self._monkeypatch.setenv("HF_TOKEN", token or self.token)

    def go_offline(self) -> None:
        """Enable offline mode for the rest of the test, as huggingface_hub and transformers honour it.

        Both read ``huggingface_hub.constants.HF_HUB_OFFLINE`` (via ``huggingface_hub.is_offline_mode()``) at call
        time; the environment variable is set as well for child processes.
        """
        self._monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        self._setattr("huggingface_hub.constants", "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    """The test Hub server subprocess, shared by the session (see the module docstring)."""
    root = tmp_path_factory.mktemp("hubserver")
    server = HubServer(storage_dir=root / "storage", log_dir=root / "logs")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def hub(hub_server: HubServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Hub]:
    """huggingface_hub and transformers pointed at the test Hub server, with a fresh ``HF_HOME`` (see the module
    docstring)."""
    hub_server.start()  # no-op unless a previous test stopped it
    hub = Hub(hub_server, monkeypatch, tmp_path)
    try:
        yield hub
    finally:
        hub.close()
