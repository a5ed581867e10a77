"""agent/fastpath.OverlayReader: the overlay's tables read in a thread, the
loop woken through a pipe. The read itself is replaced (it is netlink and
two subprocesses); the thread, pipe and hand-over are the real ones."""

import select
import threading

import pytest

from sockgraft.agent import fastpath
from sockgraft.errors import KernelError


def _wait(reader, timeout=5.0):
    assert select.select([reader.fileno()], [], [], timeout)[0], "the loop was not woken"
    return reader.take()


@pytest.fixture
def reads(monkeypatch):
    calls, gate = [], threading.Event()
    gate.set()

    def fake(indexes):
        gate.wait(5)
        calls.append(list(indexes))
        if indexes == [666]:
            raise KernelError("overlay dump", 1, "vxlan")
        if indexes == [667]:
            raise ValueError("a bug")
        return ([], (1, 2)), list(indexes)

    monkeypatch.setattr(fastpath, "read_overlay", lambda ix: fake(ix))
    return calls, gate


def test_a_read_is_handed_to_the_loop(reads):
    calls, _ = reads
    r = fastpath.OverlayReader()
    try:
        assert r.take() is None                  # nothing asked, nothing read
        r.ask([5])
        assert _wait(r) == (([], (1, 2)), [5])
        assert r.take() is None                  # taken once
        assert calls == [[5]]
    finally:
        r.close()


def test_asked_again_while_reading_reads_again_with_the_latest(reads):
    calls, gate = reads
    r = fastpath.OverlayReader()
    try:
        gate.clear()
        r.ask([1])
        for _ in range(100):                      # the thread took [1] and waits in the read
            if r._asked is None:
                break
            threading.Event().wait(0.01)
        r.ask([2])
        r.ask([3])                                # only the latest ask counts
        gate.set()
        got = []
        while len(got) < 1 or got[-1][1] != [3]:
            got.append(_wait(r))
        assert calls == [[1], [3]]
    finally:
        r.close()


def test_errors_are_handed_over_and_the_thread_lives_on(reads):
    r = fastpath.OverlayReader()
    try:
        r.ask([666])
        assert isinstance(_wait(r), KernelError)
        r.ask([667])
        assert isinstance(_wait(r), ValueError)
        r.ask([7])
        assert _wait(r) == (([], (1, 2)), [7])
    finally:
        r.close()
