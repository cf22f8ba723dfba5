"""Reaper: no process the stack started outlives the program that started it.

supervisord stops a program's whole process group, but only when it stops the program itself.
After a `kill -9` the program's children live on, holding ports and serving traffic nobody watches:
Airflow's log and health servers and LocalExecutor workers (the scheduler's process group), a task
process (a group of its own), anything that starts a session of its own.

So the reaper finds them by two marks that survive all of that:
- the session: supervisord starts one when it daemonizes, and every program and child is in it
  unless it calls setsid;
- the environment: supervisord gives every program SUPERVISOR_SERVER_URL, which names its control
  socket (one per state folder) and is inherited by everything the program starts (setproctitle
  may overwrite a process's own copy, but such processes stay in the session).
A process with either mark that no longer descends from supervisord has lost its program: an
orphan, killed at once.

Three callers, so no orphan lives longer than a moment:
- `python -m flywheel.platform.reaper exec -- CMD...` runs before every program: it reaps, then execs the
  program, so a restarted program never finds its port taken (optionally pinned to some CPUs);
- `python -m flywheel.platform.reaper listen` is a supervisord event listener: it reaps as soon as any
  program exits;
- `flywheel down` (and `up`) sweep after supervisord is gone: then every marked process is an orphan.

Standard library only (and the stdlib-only core.waiting): it runs before every program, in whichever
environment supervisord has.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from dataclasses import dataclass

from flywheel.core.waiting import WaitTimeout, wait_until

MARK = b"SUPERVISOR_SERVER_URL="


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    sid: int
    zombie: bool
    server_url: str | None  # SUPERVISOR_SERVER_URL in its environment, if readable


def _read(pid: int) -> Proc | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: fields start after the last ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    state, ppid, sid = fields[0], int(fields[1]), int(fields[3])
    server_url = None
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for entry in f.read().split(b"\0"):
                if entry.startswith(MARK):
                    server_url = entry[len(MARK) :].decode(errors="replace")
                    break
    except OSError:
        pass  # another user's process, or gone
    return Proc(pid, ppid, sid, state in (b"Z", b"X"), server_url)


def snapshot() -> dict[int, Proc]:
    procs = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (proc := _read(int(name))) is not None:
            procs[proc.pid] = proc
    return procs


def _descends(pid: int, ancestor: int, procs: dict[int, Proc]) -> bool:
    seen = set()
    while pid not in seen and pid > 1:
        if pid == ancestor:
            return True
        seen.add(pid)
        proc = procs.get(pid)
        if proc is None:
            return False
        pid = proc.ppid
    return False


def orphans(server_url: str, supervisord_pid: int, procs: dict[int, Proc] | None = None) -> list[int]:
    """Live processes of the stack whose program is gone: marked, and not descended from supervisord.

    `supervisord_pid` may be dead (after `down`, or a `kill -9` of supervisord): then every marked
    process is an orphan. Its session keeps its number as long as any member lives.
    """
    procs = snapshot() if procs is None else procs
    me = os.getpid()
    found = []
    for proc in procs.values():
        if proc.zombie or proc.pid in (me, supervisord_pid):
            continue
        marked = proc.sid == supervisord_pid or proc.server_url == server_url
        if marked and not _descends(proc.pid, supervisord_pid, procs):
            found.append(proc.pid)
    return sorted(found)


def kill(pids: list[int], timeout: float = 5.0) -> list[int]:
    """SIGKILL each, and wait until it is gone (a zombie holds no port). Returns those still alive."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def alive() -> list[int]:
        return [pid for pid in pids if (proc := _read(pid)) is not None and not proc.zombie]

    with contextlib.suppress(WaitTimeout):
        wait_until(lambda: not alive(), timeout, "killed processes gone", interval=0.05)
    return alive()


def reap(server_url: str, supervisord_pid: int, log=None) -> list[int]:
    """Kill every orphan of the stack; returns their pids."""
    found = orphans(server_url, supervisord_pid)
    if found:
        if log:
            log(f"reaping orphans of {server_url}: {found}")
        kill(found)
    return found


def _log(message: str) -> None:
    # stderr: supervisord sends a program's stdout and stderr to its log; a listener's stdout is
    # its protocol with supervisord.
    print(f"[flywheel.reaper] {message}", file=sys.stderr, flush=True)


def exec_program(command: list[str], cpus: set[int] | None = None) -> None:
    """Reap what an earlier run of any program left behind, then become the program."""
    server_url = os.environ.get("SUPERVISOR_SERVER_URL")
    if server_url:
        reap(server_url, os.getppid(), _log)
    if cpus:
        os.sched_setaffinity(0, cpus & os.sched_getaffinity(0) or os.sched_getaffinity(0))
    os.execvp(command[0], command)


def listen() -> None:
    """supervisord's event listener protocol: READY, a header line, a payload, a RESULT."""
    server_url = os.environ["SUPERVISOR_SERVER_URL"]
    supervisord_pid = os.getppid()
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        stdout.write(b"READY\n")
        stdout.flush()
        header = stdin.readline()
        if not header:
            return  # supervisord is gone
        fields = dict(item.split(b":", 1) for item in header.split())
        stdin.read(int(fields[b"len"]))
        reap(server_url, supervisord_pid, _log)
        stdout.write(b"RESULT 2\nOK")
        stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flywheel.platform.reaper", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    run = sub.add_parser("exec", help="reap orphans, then exec COMMAND")
    run.add_argument("--cpus", help="pin the program to these CPUs, e.g. 0 or 0,1")
    run.add_argument("command", nargs=argparse.REMAINDER)
    sub.add_parser("listen", help="supervisord event listener: reap whenever a program exits")
    args = parser.parse_args(argv)
    if args.mode == "listen":
        listen()
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("exec needs a command after --")
    exec_program(command, {int(c) for c in args.cpus.split(",")} if args.cpus else None)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
