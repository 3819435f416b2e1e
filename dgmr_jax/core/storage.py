"""A deadline, and one line instead of a traceback flood, for the storage a run writes to (local disk or gs://).

Three clients touch a workdir on gs://: gcsfs (through etils.epath: run.json, logs, grain's iterator state, model
directories), TensorStore inside Orbax (arrays) and google-cloud-storage (Orbax deleting old checkpoints). Each
retries on its own terms (gcsfs 6 tries with 1-32 s backoff, TensorStore 32 with 1-32 s, google-cloud-storage
for 120 s), often in threads the run cannot cancel: a bucket that refuses connections stalled a run for minutes
and ended it in hundreds of traceback lines, one that does not answer hung it for as long as the outage lasted.
While `watch(workdir, timeout_s)` is on:

* every storage call wrapped in `guard(what)` has `timeout_s` seconds to return. Past that, a watchdog thread
  prints one line (what hung, the last complete checkpoint, what to do) and ends the process with EXIT_CODE:
  a call blocked inside a client cannot be cancelled, and Orbax's save threads would keep Python from exiting;
* a storage failure raised in a guarded call (refused or reset connection, timeout, a 5xx/429 after the client's
  retries, no space left on the device) ends the process the same way, with its own line; Orbax's and gcsfs's
  log records carrying such an error (each a full traceback) are dropped, since that line reports it;
* gcsfs requests and TensorStore transfers that stall for a fifth of `timeout_s` are abandoned and retried with
  the client's own backoff, rather than awaited until the watchdog fires (`_bound_requests`); a store that
  comes back within the deadline costs the run nothing.

Nothing cut short is ever read as complete: Orbax commits a checkpoint step last (a temporary directory, or
commit_success.txt on gs://), a model directory gets COMPLETE.json last; the rerun resumes from the last
complete step. `timeout_s` = 0 turns all of this off (the errors then propagate as before).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import NoReturn

from dgmr_jax.core.errors import UserError

EXIT_CODE = 4  # the CLI's other codes: 2 a wrong input, 3 a non-finite loss
FULL, UNREACHABLE = "full", "unreachable"
_NO_SPACE = tuple(os.strerror(code) for code in (errno.ENOSPC, errno.EDQUOT))  # also in TensorStore's messages
_UNREACHABLE_STATUS = ("UNAVAILABLE:", "DEADLINE_EXCEEDED:")  # how TensorStore's ValueErrors start
_SERVER_CODES = {429, 500, 502, 503, 504}  # gcsfs HttpError / google.api_core codes left after their retries
_LOGGERS = ("absl", "gcsfs")  # Orbax logs through absl; both log storage errors with their whole traceback


def _chain(err: BaseException | None) -> Iterator[BaseException]:
    """`err` and the errors it was raised from or while handling."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _unreachable(err: BaseException) -> bool:
    """Whether one error (not its chain) says the store did not answer or refused."""
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    if isinstance(err, ValueError) and str(err).startswith(_UNREACHABLE_STATUS):
        return True
    aiohttp = sys.modules.get("aiohttp")  # gcsfs's transport; imported only when gcsfs is
    if aiohttp is not None and isinstance(err, aiohttp.ClientConnectionError):
        return True
    code = getattr(err, "code", None)
    return type(err).__module__.startswith(("gcsfs", "google.")) and code in _SERVER_CODES


def failure(err: BaseException) -> str | None:
    """FULL or UNREACHABLE when `err` (or an error it came from) is storage failing, else None (a bug, bad input)."""
    for e in _chain(err):
        if (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or any(s in str(e) for s in _NO_SPACE):
            return FULL
        if _unreachable(e):
            return UNREACHABLE
    return None


def _first_line(err: BaseException) -> str:
    """The head of an error's message, for a one-line report (clients put whole request dumps in theirs)."""
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


class _DropStorageFailures(logging.Filter):
    """Log records that carry a storage failure's traceback: the run reports that failure in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        return err is None or failure(err) is None


def _bound_requests(timeout_s: float) -> None:
    """Stalled requests are retried, not awaited: TensorStore transfers that move (almost) nothing, and gcsfs
    connections that do not open or answer, for a fifth of the deadline fail with an error each client retries
    with its backoff (for gcsfs a connect or read timeout: a whole-request timeout would not be retried). Settings
    the user made (the environment variables, fsspec's config for gs) are kept."""
    stall = max(1, round(timeout_s / 5))
    os.environ.setdefault("TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS", str(stall))
    os.environ.setdefault("TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES", "256")
    try:
        import aiohttp
        from fsspec import config
    except ImportError:  # no gcsfs: no gs:// paths through fsspec
        return
    timeout = aiohttp.ClientTimeout(sock_connect=stall, sock_read=stall)
    config.conf.setdefault("gs", {}).setdefault("requests_timeout", timeout)


class _Watchdog:
    """The deadline of the storage call in progress, and the last checkpoint step known to be complete."""

    def __init__(self, root: str, timeout_s: float):
        self.root, self.timeout_s = root, timeout_s
        self.complete_step: int | None = None
        self._pending: int | None = None  # an asynchronous save started, not known finished
        self._current: tuple[str, float] | None = None  # (what, when it started)
        self._stop, self._aborting = threading.Event(), threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="dgmr-storage-watchdog", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        """The watchdog thread: end the process once the call in progress is past the deadline."""
        while not self._stop.wait(min(1.0, self.timeout_s / 10)):
            current = self._current
            if current and time.monotonic() - current[1] > self.timeout_s:
                self.abort(
                    f"storage at {self.root} did not answer for {self.timeout_s:g} s{_doing(current[0])}",
                    "rerun the same command to resume once it answers "
                    "(if it is only slow, raise --config.storage_timeout_s)",
                )

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """The block is a storage call: timed from its start, and its storage failures end the process."""
        previous, self._current = self._current, (what, time.monotonic())
        try:
            yield
        except Exception as err:
            self.fail(err, what)
            raise
        finally:  # an enclosing call's clock starts again
            self._current = previous and (previous[0], time.monotonic())

    def fail(self, err: BaseException, what: str) -> None:
        """End the process in one line if `err` is storage failing; return otherwise."""
        problem = failure(err)
        if problem == FULL:
            self.abort(
                f"no space left on the storage of {self.root}{_doing(what)}",
                "free space and rerun the same command to resume",
            )
        if problem == UNREACHABLE:
            self.abort(
                f"storage at {self.root} failed{_doing(what)}: {_first_line(err)}",
                "rerun the same command to resume once it is reachable",
            )

    def saved(self, step: int, pending: bool) -> None:
        """A checkpoint save of `step` returned. Orbax finishes (or fails) an asynchronous save before it starts
        the next, so the one started before is complete now; a synchronous save is complete when it returns."""
        if not pending:
            self.complete_step, self._pending = step, None
            return
        if self._pending is not None:
            self.complete_step = self._pending
        self._pending = step

    def abort(self, problem: str, todo: str) -> NoReturn:
        """Print `problem`, what is kept and what to do as one line; end the process (no thread is waited for)."""
        self._aborting.acquire()  # once: the main thread and the watchdog may both get here
        kept = "no checkpoint is complete yet"
        if self.complete_step is not None:
            kept = f"checkpoints up to step {self.complete_step} are complete there"
        if self._pending is not None:  # its commit runs in Orbax's thread: it may have finished
            kept += f", step {self._pending} may be too"
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
        sys.stderr.write(f"\ndgmr-jax: error: {problem}; {kept}: {todo}\n")
        sys.stderr.flush()
        os._exit(EXIT_CODE)

    def close(self) -> None:
        """Stop the watchdog thread (the run is over)."""
        self._stop.set()
        self._thread.join()


def _doing(what: str) -> str:
    """The error line's " (what)", or nothing when what is unknown."""
    return f" ({what})" if what else ""


_active: _Watchdog | None = None


@contextlib.contextmanager
def watch(root: object, timeout_s: float) -> Iterator[None]:
    """Storage calls under `guard` get `timeout_s` seconds each, and storage failures end the process in one line
    naming `root` (the workdir), until the block ends; timeout_s = 0: neither."""
    global _active
    if timeout_s < 0:
        raise UserError(f"--config.storage_timeout_s must be >= 0 seconds (0: no deadline), got {timeout_s}")
    if timeout_s == 0:
        yield
        return
    _bound_requests(timeout_s)
    watchdog, drop = _Watchdog(str(root), timeout_s), _DropStorageFailures()
    for name in _LOGGERS:
        logging.getLogger(name).addFilter(drop)
    _active = watchdog
    try:
        yield
    except Exception as err:  # a failure outside any guard: the same line, without what was being done
        watchdog.fail(err, "")
        raise
    finally:
        _active = None
        watchdog.close()
        for name in _LOGGERS:
            logging.getLogger(name).removeFilter(drop)


def guard(what: str) -> contextlib.AbstractContextManager:
    """Give the storage call in this block the deadline of the active `watch` (no-op without one);
    `what` names it in the error line, e.g. "writing metrics.jsonl"."""
    return _active.guard(what) if _active else contextlib.nullcontext()


def checkpoint_saved(step: int, pending: bool) -> None:
    """Tell the active watch that a checkpoint of `step` was saved (`pending`: asynchronously, not finished yet),
    or restored (pending=False), so that its error line names the last complete step."""
    if _active:
        _active.saved(step, pending)
