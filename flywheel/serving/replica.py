"""Start one Bento replica: `bentoml serve`, except that its port refuses connections until it is ready.

Run by path with the ML venv's Python: `python flywheel/serving/replica.py serve <bento> --host H --port P`
(the same arguments as `bentoml serve`; platform/deployments.py starts each replica so).

`bentoml serve`'s circus arbiter binds *and listens* on the port (circus `CircusSocket.bind_and_listen`)
before its worker has imported the service and loaded the model: 3 s on an idle core, more than 5 s
on two busy ones. The kernel queues what Nginx sends meanwhile, and those requests wait for the
worker; Nginx cannot tell a queued connection from a served one, so after a replica's restart under
load some waited past the client's timeout (4 of 65,676 in one `kill -9` test). Here the arbiter
only binds (the port is the replica's at once, and a second server cannot take it), and the worker's
event loop listens on the inherited socket once the service has started (uvicorn starts serving
after the lifespan, which loads and warms the model). Until then a connection is refused, and
Nginx sends the request to the next replica at once (`proxy_next_upstream error`). Everything else
is BentoML's own `serve`: the same arbiter, environment, timeouts and worker.

Only the standard library is imported before BentoML's CLI: no dependency on this package here.
"""

from __future__ import annotations

import sys


def bind_without_listening() -> None:
    from circus.sockets import CircusSocket

    bind_and_listen = CircusSocket.bind_and_listen

    def bind_only(self) -> None:
        self.listen = lambda *args: None  # the worker's event loop listens, once the service is ready
        try:
            bind_and_listen(self)
        finally:
            del self.listen

    CircusSocket.bind_and_listen = bind_only


if __name__ == "__main__":
    bind_without_listening()
    from bentoml_cli.cli import cli

    sys.argv[0] = "bentoml"
    sys.exit(cli())
