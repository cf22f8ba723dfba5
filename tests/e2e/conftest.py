"""The real embedded stack for end-to-end tests: its own state folder and ports, torn down after."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from flywheel.core.settings import REPO_ROOT, Ports, Settings
from flywheel.platform import stack
from tests.e2e.stack_ops import print_logs, processes_of

PORT_OFFSET = 10000  # beside a developer's own stack on the default ports


class AlertInbox(ThreadingHTTPServer):
    """A webhook receiver on loopback: what FLYWHEEL_ALERT_WEBHOOK points the stack at."""

    def __init__(self):
        self.received: list[dict] = []
        self.down = False  # answer 503 to everything, as a webhook in trouble does
        self.refused = 0

        class Handler(BaseHTTPRequestHandler):
            def do_POST(handler):
                body = handler.rfile.read(int(handler.headers.get("content-length", 0)))
                if self.down:
                    self.refused += 1
                    handler.send_response(503)
                else:
                    self.received.extend(json.loads(body).get("alerts", []))
                    handler.send_response(200)
                handler.end_headers()

            def log_message(handler, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"


@pytest.fixture(scope="session")
def alert_inbox():
    inbox = AlertInbox()
    threading.Thread(target=inbox.serve_forever, daemon=True).start()
    yield inbox
    inbox.shutdown()


@pytest.fixture(scope="session")
def stack_settings(request, alert_inbox):
    # Not under pytest's tmp_path: a second pytest session (pytest keeps three) may delete that folder.
    state = Path(tempfile.mkdtemp(prefix="flywheel-e2e-"))
    # The stack's own copy of the pipeline files: tests add and remove pipelines in it.
    shutil.copytree(REPO_ROOT / "pipelines", state / "pipelines")
    env = {
        "FLYWHEEL_STATE_DIR": str(state),
        "FLYWHEEL_PIPELINES_DIR": str(state / "pipelines"),
        "FLYWHEEL_ALERT_WEBHOOK": alert_inbox.url,
        # The stack's own credentials, beside it: a developer's `.env` is never touched.
        "FLYWHEEL_ENV_FILE": str(state / "e2e.env"),
    }
    env.update({f"FLYWHEEL_{name.upper()}_PORT": str(port + PORT_OFFSET) for name, port in vars(Ports()).items()})
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        settings = Settings.load(create_secrets=True)
        failed_before = request.session.testsfailed
        started = time.monotonic()
        try:
            stack.up(settings, progress=print, timeout=300)
            print(f"stack up in {time.monotonic() - started:.1f}s")
            yield settings
        finally:
            failed = request.session.testsfailed > failed_before
            if failed:
                print_logs(settings)
            stack.down(settings)
            leftovers = processes_of(state)
            assert leftovers == [], f"processes left behind after down: {leftovers}"
            if not failed:
                shutil.rmtree(state, ignore_errors=True)
