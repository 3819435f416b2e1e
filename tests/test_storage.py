"""The storage deadline and its one-line errors (dgmr_jax.core.storage), in a process of their own: they end it.

The same through `dgmr-jax distill` against a stopped, killed or full store: tests/test_resume_storage.py.
"""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap

import aiohttp
import pytest
from gcsfs.retry import HttpError
from google.api_core import exceptions as api_exceptions

from dgmr_jax.core import storage
from dgmr_jax.core.errors import UserError
from dgmr_jax.core.paths import as_path
from dgmr_jax.train.logs import JsonlLog


def _from(cause: BaseException, err: BaseException) -> BaseException:
    """`err` raised from `cause`, as clients wrap the socket error they met."""
    try:
        raise err from cause
    except BaseException as raised:
        return raised


@pytest.mark.parametrize(
    "err,kind",
    [
        (OSError(errno.ENOSPC, "No space left on device"), storage.FULL),
        (
            ValueError("RESOURCE_EXHAUSTED: Failed writing x: No space left on device [os_error_code='28']"),
            storage.FULL,
        ),
        (_from(ConnectionRefusedError(111, "refused"), RuntimeError("Cannot connect to host")), storage.UNREACHABLE),
        (aiohttp.ServerDisconnectedError(), storage.UNREACHABLE),
        (TimeoutError(), storage.UNREACHABLE),
        (ValueError("UNAVAILABLE: CURL error Couldn't connect to server"), storage.UNREACHABLE),
        (HttpError({"code": 503, "message": "Service Unavailable"}), storage.UNREACHABLE),
        (api_exceptions.ServiceUnavailable("backend"), storage.UNREACHABLE),
        (HttpError({"code": 400, "message": "Bad Request"}), None),
        (api_exceptions.NotFound("no such object"), None),
        (FileNotFoundError("gs://b/run/run.json"), None),
        (ValueError("the saved state does not fit"), None),
    ],
)
def test_storage_failures_are_told_from_other_errors(err, kind):
    assert storage.failure(err) == kind


def _script(body: str) -> subprocess.CompletedProcess:
    """Run `body` (with time, logging and dgmr_jax.core.storage imported) in a fresh Python process."""
    code = "import logging, time\nfrom dgmr_jax.core import storage\n" + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_a_storage_call_past_the_deadline_ends_the_process_in_one_line():
    done = _script(
        """
        with storage.watch("gs://bucket/run", 1):
            storage.checkpoint_saved(4, pending=False)
            storage.checkpoint_saved(8, pending=True)  # asynchronous, not known to be finished
            with storage.guard("writing metrics.jsonl"):
                time.sleep(100)  # a call that never returns
        """
    )
    assert done.returncode == storage.EXIT_CODE
    assert done.stderr.strip() == (
        "dgmr-jax: error: storage at gs://bucket/run did not answer for 1 s (writing metrics.jsonl); checkpoints up "
        "to step 4 are complete there, step 8 may be too: rerun the same command to resume once it answers (if it is "
        "only slow, raise --config.storage_timeout_s)"
    )


def test_a_storage_failure_ends_the_process_in_one_line_without_the_tracebacks_logged_for_it():
    """Orbax (through absl) and gcsfs log each failure with its traceback before it reaches the run: those records
    are dropped, any other error record is kept."""
    done = _script(
        """
        logging.basicConfig()
        with storage.watch("gs://bucket/run", 60):
            storage.checkpoint_saved(8, pending=False)
            refused = ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 9)")
            logging.getLogger("absl").error("background save failed", exc_info=refused)
            logging.getLogger("gcsfs").error("_request out of retries", exc_info=refused)
            logging.getLogger("absl").error("kept", exc_info=ValueError("not storage"))
            with storage.guard("saving checkpoint 12"):
                raise refused
        """
    )
    assert done.returncode == storage.EXIT_CODE
    lines = done.stderr.strip().splitlines()
    assert lines[0] == "ERROR:absl:kept" and lines[-1] == (
        "dgmr-jax: error: storage at gs://bucket/run failed (saving checkpoint 12): [Errno 111] Connect call failed "
        "('127.0.0.1', 9); checkpoints up to step 8 are complete there: rerun the same command to resume once it is "
        "reachable"
    )
    assert "Connect call failed" not in "".join(lines[:-1])


def test_other_errors_pass_through_and_a_negative_deadline_is_refused():
    with pytest.raises(KeyError), storage.watch("gs://bucket/run", 60), storage.guard("reading run.json"):
        raise KeyError("a bug")
    with pytest.raises(UserError, match="storage_timeout_s must be >= 0"), storage.watch("gs://bucket/run", -1):
        pass


def test_a_log_line_cut_short_by_a_full_disk_is_dropped_when_the_run_starts_again(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 2}\n{"step": 4, "lo')
    JsonlLog(as_path(path)).write({"step": 4, "loss": 0.5})
    assert path.read_text() == '{"step": 2}\n{"step": 4, "loss": 0.5}\n'
