"""`serve --workers N`: N forked processes share one port (SO_REUSEPORT); the parent supervises.

The parent forwards SIGHUP (reload) and SIGTERM/SIGINT (drain) to every worker and exits
when all have stopped. A worker that dies on its own is replaced, unless it died within
`MIN_LIFETIME_S` of its start (a bind or config failure would only repeat): then the
others are drained and the parent exits non-zero, so systemd's Restart=on-failure acts.
Each worker has its own Gateway: without Redis its breakers and buckets are its own, and it
enforces 1/N of every limit (see proxy.state); with Redis they are shared.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable

log = logging.getLogger("proxy.workers")

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
MIN_LIFETIME_S = 5.0


def supervise(workers: int, run_worker: Callable[[bool], int]) -> int:
    """Fork `workers` children running `run_worker(respawned)`; returns the exit code.

    Signals stay blocked around each fork, so an early SIGHUP can neither kill a new
    worker nor run the parent's handler in it; the worker unblocks them once its event
    loop handles them (see app.run_server).
    """
    live: dict[int, float] = {}             # pid -> start time
    stopping = False

    def spawn(respawned: bool) -> None:
        sys.stdout.flush()                  # or the child would write the parent's buffer again
        sys.stderr.flush()
        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = run_worker(respawned)
            except BaseException:
                log.exception("worker failed")
            finally:
                sys.stdout.flush()
                os._exit(code)
        live[pid] = time.monotonic()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum != signal.SIGHUP:
            stopping = True
        for pid in list(live):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for signum in FORWARDED:
        signal.signal(signum, forward)
    for _ in range(workers):
        spawn(False)
    log.info("workers started", extra={"workers": workers, "pids": sorted(live), "pid": os.getpid()})
    code = 0
    while live:
        pid, status = os.wait()             # PEP 475: retried after a signal handler ran
        started = live.pop(pid, None)
        if started is None:
            continue
        exit_code = os.waitstatus_to_exitcode(status)
        if exit_code < 0:
            exit_code = 128 - exit_code         # killed by a signal: the shell's convention
        if stopping:
            code = code or exit_code
            continue
        lifetime = time.monotonic() - started
        if lifetime < MIN_LIFETIME_S:
            log.error("worker died right after its start, stopping all",
                      extra={"worker": pid, "exit_code": exit_code, "lifetime_s": round(lifetime, 3)})
            code = exit_code or 1
            forward(signal.SIGTERM, None)
            continue
        log.error("worker died, starting another", extra={"worker": pid, "exit_code": exit_code})
        spawn(True)
    log.info("workers stopped", extra={"exit_code": code, "pid": os.getpid()})
    sys.stdout.flush()
    return code
