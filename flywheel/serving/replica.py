"""Run one Bento replica: BentoML's HTTP worker, in this process, on a port that refuses until it is ready.

Run by path with the ML venv's Python: `python flywheel/serving/replica.py serve <bento> --host H --port P`
(platform/deployments.py starts each replica so, as a supervisord program).

What `bentoml serve` would do, without its circus arbiter, which here is a second supervisor under
supervisord for a single worker: the arbiter imported the CLI and loaded the service only to spawn a
worker that imports and loads it all again, about 1.3 s of every replica's start on an idle core. This
process does the arbiter's share itself (the Prometheus multiprocess folder, emptied as BentoML does;
the socket) and then runs BentoML's own worker (`_bentoml_impl.worker.service`, the module the arbiter
spawns) with the same arguments. supervisord restarts it when it dies, as circus restarted the worker.

The port is bound at once, so it is the replica's and a second server cannot take it, but it is not
listening: the worker's event loop listens on the inherited socket once the service has started
(uvicorn starts serving after the lifespan, which loads and warms the model). Until then a connection
is refused, and Nginx sends the request to the next replica at once (`proxy_next_upstream error`).
Under plain `bentoml serve` the arbiter listened first, so requests queued by the kernel waited for the
worker, some past the client's timeout (4 of 65,676 after a replica's `kill -9` under load).

The modules the Bento's framework never serves with are kept out (`Framework.unserved_modules`), read
from the Bento's own labels, so a rollback to an older Bento of another framework starts as it was built.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys


def arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="replica.py", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("bento", help="the Bento's exact tag, name:version")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    return parser.parse_args(argv)


def bound_socket(host: str, port: int) -> socket.socket:
    """The replica's port, bound and not listening; inherited by nothing else (the worker is this process)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def keep_out_unserved_modules(bento_tag: str) -> list[str]:
    """Make the modules the Bento's framework never serves with unimportable here; returns them."""
    import bentoml

    from flywheel import frameworks

    framework = frameworks.get(bentoml.get(bento_tag).info.labels["framework"])
    for module in framework.unserved_modules:
        sys.modules.setdefault(module, None)  # `import module` raises ImportError (the import system's rule)
    return list(framework.unserved_modules)


def main(argv: list[str]) -> None:
    args = arguments(argv)
    sock = bound_socket(args.host, args.port)
    keep_out_unserved_modules(args.bento)
    from _bentoml_impl.worker import service as worker
    from bentoml.serving import ensure_prometheus_dir

    # Before any metric exists: every process of this replica's home writes its samples there.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = ensure_prometheus_dir()
    # The arbiter's arguments for its only worker (the service's name defaults to the entry service).
    worker.main(["--fd", str(sock.fileno()), "--worker-id", "1", args.bento], prog_name="bentoml-worker")


if __name__ == "__main__":
    main(sys.argv[1:])
