"""SessionTable.harvest counts what a session's native loop answered even
when the session ended first: the native worker counts an answer after
making it, so the application may have exited - and its session been
dropped - before the count is there (a graft once went missing from the
totals that way)."""

import os

from sockgraft.agent.inventory import Inventory
from sockgraft.agent.sessions import Session, SessionTable
from sockgraft.model import graftconfig as gc


class FakeThreads:
    def __init__(self):
        self.table = object()
        self.alive = 2
        self.counts = {"tcp": 0, "udp": 0, "continued": 0, "refused": 0}
        self._seen = dict(self.counts)

    def harvest(self):
        delta = {k: v - self._seen[k] for k, v in self.counts.items()}
        self._seen = dict(self.counts)
        return delta


def test_an_answer_counted_after_its_session_ended_is_still_counted():
    table, inv = SessionTable(), Inventory()
    sess = Session("c1", os.getpid(), None, 1, gc.GraftConfig("c1"), {})
    threads = FakeThreads()
    table.add(7, sess, threads)
    threads.counts["tcp"] = 1
    table.harvest(inv)
    table.pop(7)                          # the application exited: its session goes
    threads.counts["tcp"] = 2             # ... and only now the worker counts its answer
    table.harvest(inv)
    assert inv.totals.by_native == 2
    threads.alive = 0
    threads.counts["udp"] = 1             # the last one, counted before the threads ended
    table.harvest(inv)
    assert inv.totals.by_native == 3 and inv.totals.grafted == 3
    threads.counts["udp"] = 5             # (ended: no longer looked at)
    table.harvest(inv)
    assert inv.totals.by_native == 3
