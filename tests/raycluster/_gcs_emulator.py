"""``python _gcs_emulator.py HOST PORT BUCKET``: gcp-storage-emulator (in memory, ``BUCKET`` made at
start) answering requests concurrently, for ``test_gcs.py``.

The emulator serves with Python's single-threaded ``HTTPServer``: one request at a time, its
response written whole before the next request is read. ``pyarrow.fs.copy_files`` (which Ray Train
uses to fetch a checkpoint: ``Checkpoint.as_directory``) asks for an object's metadata while that
object's download is still open; the server, blocked writing the download, never reads that request,
and the copy stalls until the client's retry limit. A real GCS serves every connection at once;
here each connection gets a thread (``ThreadingHTTPServer``), and the handlers, which share the
emulator's unlocked in-memory store, run one at a time under a lock (responses are written outside
it, concurrently).
"""
from __future__ import annotations

import sys
import threading
from functools import partial
from http.server import ThreadingHTTPServer

from gcp_storage_emulator import server as emulator

_LOCK = threading.Lock()


def _serialized(handler):
    def run(*args, **kwargs):
        with _LOCK:
            return handler(*args, **kwargs)
    return run


class _ConcurrentAPI(emulator.APIThread):
    def run(self):
        self._httpd = ThreadingHTTPServer((self._host, self._port), partial(emulator.RequestHandler, self._storage))
        self._httpd.daemon_threads = True
        self.is_running.set()
        self._httpd.serve_forever()


def main(host: str, port: str, bucket: str) -> None:
    emulator.HANDLERS = tuple((regex, {method: _serialized(h) for method, h in handlers.items()})
                              for regex, handlers in emulator.HANDLERS)
    emulator.APIThread = _ConcurrentAPI
    emulator.create_server(host, int(port), in_memory=True, default_bucket=bucket).run()


if __name__ == "__main__":
    main(*sys.argv[1:])
