"""A webhook receiver in the compose test's own container: what FLYWHEEL_ALERT_WEBHOOK points the stack at.

POST /hook records the alerts of a `{"alerts": [...]}` body; GET /received answers all of them.
Standard library only: it runs in the Python base image.
"""

import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RECEIVED: list[dict] = []


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        RECEIVED.extend(json.loads(body).get("alerts", []))
        self.send_response(200)
        self.end_headers()

    def do_GET(self):
        data = json.dumps(RECEIVED).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("0.0.0.0", 8080), Handler).serve_forever()
