"""What a person running a command sees, and where everything else goes.

The terminal gets the command's own lines only: one when a step starts, one progress bar per step
(:func:`progress`), one with the step's result (:func:`say`), and errors (:func:`error`). Everything
else the process prints goes to a log file in the output directory,
``<out>/logs/<command>-<UTC time>.log``: Ray's driver and worker output (which Ray forwards to the
driver's ``sys.stdout`` / ``sys.stderr``), Ray Data / Train / Tune internals, and C++ log lines written
to file descriptors 1 and 2 (both are pointed at a pipe that a thread copies into the log).
``--verbose`` shows all of it live as well. For an ``s3://`` / ``gs://`` output the log is written
locally and uploaded when the command ends.

Without a session (a stage called from Python, not from the ``fisher`` command) :func:`say` prints
and :func:`progress` writes to ``sys.stderr``, as a plain script would.
"""
from __future__ import annotations

import codecs
import datetime
import os
import re
import sys
import tempfile
import threading

from fisher.io import LOGS  # noqa: E402  (the log folder inside an --out)

_session: _Session | None = None
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")      # colour codes of Ray's forwarded lines: kept off the log


def _terminal(stream, fd: int):
    """A stream to the terminal that survives ``fd`` being redirected: a duplicate of ``fd`` when
    ``stream`` writes to it, else ``stream`` itself (a test's capture buffer)."""
    try:
        if stream.fileno() == fd:
            return open(os.dup(fd), "w", buffering=1, encoding=getattr(stream, "encoding", None) or "utf-8",
                        errors="backslashreplace")
    except (AttributeError, OSError, ValueError):
        pass
    return stream


class _Sink:
    """``sys.stdout`` / ``sys.stderr`` during a session: text to the log (and, verbose, the terminal)."""
    encoding, errors = "utf-8", "backslashreplace"

    def __init__(self, session: _Session):
        self._s = session

    def write(self, text: str) -> int:
        self._s.to_log(text, echo=self._s.verbose)
        return len(text)

    def flush(self) -> None:
        self._s.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:        # the pipe: what is written there reaches the log too
        return 2

    def writable(self) -> bool:
        return True


class _Session:
    def __init__(self, out: str, command: str, verbose: bool):
        from fisher.io import join
        self.out, self.command, self.verbose = out, command, verbose
        self.term_out, self.term_err = _terminal(sys.stdout, 1), _terminal(sys.stderr, 2)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.uri = join(out, LOGS, f"{command}-{stamp}-{os.getpid()}.log")
        if "://" in out:
            fd, self.local = tempfile.mkstemp(prefix=f"fisher-{command}-", suffix=".log")
            os.close(fd)
        else:
            os.makedirs(os.path.dirname(self.uri), exist_ok=True)
            self.local = self.uri
        self.log = open(self.local, "a", encoding="utf-8", errors="backslashreplace")
        self.lock = threading.Lock()
        for s in (sys.stdout, sys.stderr):
            s.flush()
        self.saved_fds = (os.dup(1), os.dup(2))
        self.saved_streams = (sys.stdout, sys.stderr)
        read, write = os.pipe()
        os.dup2(write, 1)
        os.dup2(write, 2)
        os.close(write)
        self.pump = threading.Thread(target=self._pump, args=(read,), name="fisher-log-pump", daemon=True)
        self.pump.start()
        sys.stdout = sys.stderr = _Sink(self)
        self.to_log(f"fisher {command}: log of {' '.join(sys.argv)!s} (pid {os.getpid()})\n")

    def _pump(self, fd: int) -> None:
        decode = codecs.getincrementaldecoder("utf-8")(errors="backslashreplace")
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            self.to_log(decode.decode(chunk), echo=self.verbose)
        os.close(fd)

    def to_log(self, text: str, echo: bool = False) -> None:
        with self.lock:
            if not self.log.closed:
                self.log.write(_ANSI.sub("", text))
                self.log.flush()
        if echo:
            self.term_err.write(text)
            self.term_err.flush()

    def flush(self) -> None:
        with self.lock:
            if not self.log.closed:
                self.log.flush()

    def close(self) -> None:
        """Restore the streams and close the log."""
        sys.stdout, sys.stderr = self.saved_streams
        for fd, saved in zip((1, 2), self.saved_fds):
            os.dup2(saved, fd)          # the pipe's last writers: the pump reads to its end
            os.close(saved)
        self.pump.join(timeout=5)
        with self.lock:
            self.log.close()
        for t in (self.term_out, self.term_err):
            if t not in self.saved_streams:
                t.close()

    def finish(self, keep: bool) -> str | None:
        """Publish the closed log (``keep``: its location is returned) or delete it."""
        if keep and self.local != self.uri:
            from fisher.io import atomic_write_bytes
            with open(self.local, "rb") as f:
                atomic_write_bytes(self.uri, f.read())
        if (not keep or self.local != self.uri) and os.path.exists(self.local):
            os.remove(self.local)
        if not keep and self.local == self.uri:
            logs = os.path.dirname(self.local)
            if os.path.isdir(logs) and not os.listdir(logs):
                os.rmdir(logs)
        return self.uri if keep else None


def start(out: str, command: str, verbose: bool = False) -> None:
    """Send everything but the command's own lines to ``<out>/logs/`` until :func:`stop`."""
    global _session
    if _session is None:
        _session = _Session(out, command, verbose)


def close() -> None:
    """Restore the streams and close the log; :func:`finish` then keeps or deletes it."""
    if _session is not None:
        _session.close()


def finish(keep: bool = True) -> str | None:
    """End the session (closing it first if need be): the log kept, its location returned, or deleted
    (a refused command leaves nothing behind)."""
    global _session
    session, _session = _session, None
    if session is None:
        return None
    if not session.log.closed:
        session.close()
    return session.finish(keep)


def work_began() -> None:
    """Mark that the command has started its work (Ray): a failure from now on keeps the log, whereas a
    command refused before (bad input, exit status 2) leaves no log behind."""
    if _session is not None:
        _session.began = True


def began() -> bool:
    return bool(_session and getattr(_session, "began", False))


def log_path() -> str | None:
    """Where this session's log is (or will be, for object storage); None without a session."""
    return _session.uri if _session else None


def log(text: str) -> None:
    """A line for the log only (the terminal sees it with ``--verbose``)."""
    if _session:
        _session.to_log(text.rstrip("\n") + "\n", echo=_session.verbose)


def say(text: str) -> None:
    """A line for the person running the command: the terminal's stdout and the log."""
    if _session is None:
        print(text, flush=True)
        return
    from tqdm import tqdm
    with tqdm.external_write_mode(file=_session.term_err):     # above any progress bar, not through it
        _session.term_out.write(text + "\n")
        _session.term_out.flush()
    _session.to_log(text + "\n")


def error(text: str) -> None:
    """An error line: the terminal's stderr and the log."""
    if _session is None:
        print(text, file=sys.stderr, flush=True)
        return
    if _session.verbose:        # the pump echoes fds 1 and 2 in the order written: the error comes after them
        os.write(2, (text + "\n").encode("utf-8", "backslashreplace"))
        return
    _session.term_err.write(text + "\n")
    _session.term_err.flush()
    _session.to_log(text + "\n")


def is_terminal() -> bool:
    """Whether progress bars go to an interactive terminal."""
    stream = _session.term_err if _session else sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def progress(total: int | None, desc: str, unit: str = "img", **kwargs):
    """The step's progress bar (tqdm) on the terminal's stderr, with rate and ETA; when it closes, the log
    gets one line with what was done and how long it took."""
    from tqdm import tqdm

    class _Bar(tqdm):
        def close(self):
            if not self.disable and _session is not None and not getattr(self, "_logged", False):
                self._logged = True
                rate = self.format_dict.get("rate") or (self.n / max(self.format_dict["elapsed"], 1e-9))
                log(f"{self.desc}: {self.n:g}/{self.total if self.total is not None else '?'} {self.unit} in "
                    f"{self.format_interval(self.format_dict['elapsed'])} ({rate:.3g} {self.unit}/s)")
            super().close()

    stream = _session.term_err if _session else sys.stderr
    return _Bar(total=total, desc=desc, unit=unit, file=stream, mininterval=0.5 if is_terminal() else 5,
                dynamic_ncols=True, **kwargs)
