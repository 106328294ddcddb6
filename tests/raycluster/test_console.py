"""``raycluster.console``: what reaches the terminal during a command, and what only its log holds.

No Ray here: the session is driven directly, with writes of each kind Ray makes (Python-level prints to
``sys.stdout`` / ``sys.stderr``, as Ray's forwarded worker lines are, and raw writes to file descriptors
1 and 2, as C++ log lines are), so each routing rule is checked exactly.
"""
from __future__ import annotations

import os
import sys

import pytest

from raycluster import console


def _noise() -> None:
    print("(Worker pid=1) forwarded worker line")
    sys.stderr.write("(raylet) a raylet warning\n")
    os.write(1, b"fd1: C++ log line\n")
    os.write(2, b"fd2: \x1b[36mcoloured\x1b[0m C++ log line\n")


@pytest.mark.parametrize("verbose", [False, True])
def test_terminal_gets_the_commands_lines_and_the_log_everything(tmp_path, capfd, verbose):
    out = tmp_path / "out"
    console.start(str(out), "embed", verbose=verbose)
    console.say("embed: 4 images")
    _noise()
    with console.progress(4, "embed") as bar:
        bar.update(4)
    console.error("fisher embed: error: something")
    path = console.finish(keep=True)
    got = capfd.readouterr()
    assert got.out == "embed: 4 images\n"
    assert "embed: 100%" in got.err and got.err.rstrip().endswith("fisher embed: error: something")
    for line in ("forwarded worker line", "a raylet warning", "fd1: C++ log line", "coloured"):
        assert (line in got.err) == verbose, line             # shown live only with --verbose
    logs = list((out / "logs").iterdir())
    assert [str(p) for p in logs] == [path] and path.endswith(".log") and "embed-" in path
    text = logs[0].read_text()
    for line in ("embed: 4 images", "(Worker pid=1) forwarded worker line", "(raylet) a raylet warning",
                 "fd1: C++ log line", "fd2: coloured C++ log line", "embed: 4/4 img in", "fisher embed: error"):
        assert line in text, line
    assert "\x1b" not in text
    # the streams are back: a write now reaches the test's capture, not the log
    print("after")
    os.write(2, b"after-fd2\n")
    got = capfd.readouterr()
    assert got.out == "after\n" and got.err == "after-fd2\n" and "after" not in logs[0].read_text()


def test_a_refused_command_leaves_no_log(tmp_path, capfd):
    out = tmp_path / "out"
    out.mkdir()
    console.start(str(out), "embed")
    _noise()
    assert console.finish(keep=False) is None
    assert list(out.iterdir()) == []
    capfd.readouterr()


def test_without_a_session_lines_are_printed(capsys):
    console.say("plain")
    console.error("oops")
    console.log("only with a session")
    got = capsys.readouterr()
    assert got.out == "plain\n" and got.err == "oops\n"


def test_an_unexpected_failure_is_one_line_naming_the_log(tmp_path, capfd, monkeypatch, mnist_dir):
    from raycluster import cli, prepare

    def broken(args):
        print("(Worker pid=2) something Ray said")
        raise RuntimeError("a bug\nwith a second line")

    monkeypatch.setattr(prepare, "run", broken)
    out = tmp_path / "out"
    assert cli.main(["prepare", "mnist", "--src", str(mnist_dir), "--out", str(out)]) == 1
    got = capfd.readouterr()
    lines = got.err.strip().splitlines()
    assert got.out == "" and len(lines) == 1, got
    log = next((out / "logs").glob("prepare-*.log"))
    assert lines[0] == (f"fisher prepare: unexpected failure: RuntimeError: a bug\\nwith a second line "
                        f"(traceback in {log})")
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "something Ray said" in text
