"""A local run (no --address) opens no listening socket outside 127.0.0.1 (issue 16, "Ports").

Every TCP socket in LISTEN state is read from /proc/net/tcp{,6} and mapped to its process through
/proc/<pid>/fd; the processes checked are this test process and all its descendants (Ray's GCS,
raylet, agents and every worker, Ray Train's workers included). A background thread samples them every
0.2 s while ``train-prior`` runs with 2 data-parallel workers (a real gloo process group, Ray Data
feeding both), so a listener that lives only during training (torch.distributed's store, gloo's
pairs) is seen. ``train-decoder`` starts its one worker through the same ``torch_trainer``.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import sys
import threading
import time

import pytest

from raycluster import cli

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _tree(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p))
    out, todo = set(), [root]
    while todo:
        p = todo.pop()
        out.add(p)
        todo += children.get(p, [])
    return out


def _address(hexaddr: str) -> str:
    raw = bytes.fromhex(hexaddr)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    return socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))


def listeners(root: int) -> set[tuple[int, str, str, int]]:
    """(pid, process name, address, port) of every listening TCP socket of ``root``'s process tree."""
    owner = {}
    for pid in _tree(root):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                owner[int(link[8:-1])] = pid
    out = set()
    for proto in ("tcp", "tcp6"):
        with open(f"/proc/net/{proto}") as f:
            rows = f.readlines()[1:]
        for row in rows:
            cols = row.split()
            if cols[3] != "0A" or int(cols[9]) not in owner:         # 0A: LISTEN
                continue
            pid = owner[int(cols[9])]
            hexaddr, port = cols[1].split(":")
            try:
                with open(f"/proc/{pid}/comm") as f:
                    name = f.read().strip()
            except OSError:
                name = "?"
            out.add((pid, name, _address(hexaddr), int(port, 16)))
    return out


def is_loopback(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def test_helpers_see_a_public_listener():
    """The check can fail: a socket listening on every interface is found and is not loopback."""
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.bind(("::", 0))
    s.listen()
    try:
        found = {(a, p) for _, _, a, p in listeners(os.getpid())}
        assert ("::", s.getsockname()[1]) in found
        assert not is_loopback("::") and not is_loopback("0.0.0.0") and not is_loopback("10.0.0.2")
        assert is_loopback("127.0.0.1") and is_loopback("::ffff:127.0.0.1") and is_loopback("::1")
    finally:
        s.close()


def _sampled(argv: list[str]) -> set:
    seen, stop = set(), threading.Event()

    def sample():
        while not stop.is_set():
            seen.update(listeners(os.getpid()))
            time.sleep(0.2)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        assert cli.main(argv) == 0, argv
    finally:
        stop.set()
        t.join()
    return seen


def test_local_training_listens_on_loopback_only(tmp_path, mnist_dir):
    import ray
    if ray.is_initialized():
        ray.shutdown()                      # this test's own local Ray, started by the stages
    d, prior = str(tmp_path / "data"), str(tmp_path / "prior")
    try:
        assert cli.main(["prepare", "mnist", "--src", str(mnist_dir), "--out", d, "--limit", "64",
                         "--shard-size", "64"]) == 0
        seen = _sampled(["train-prior", "--data", d, "--out", prior, "--epochs", "1", "--layers", "1",
                         "--filters", "8", "--batch-size", "32", "--workers", "2", "--cpus-per-worker", "0.5",
                         "--num-cpus", "2"])
    finally:
        ray.shutdown()
    workers = {s for s in seen if "RayTrainWorker" in s[1] or "ray::" in s[1]}
    assert workers, f"no Ray worker's socket was seen: {sorted(seen)}"
    public = sorted(s for s in seen if not is_loopback(s[2]))
    assert not public, f"listening outside 127.0.0.1: {public}"
