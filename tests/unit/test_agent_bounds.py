"""What a container can make the agent keep is bounded: the thread ids a
session remembers follow the pidfd cache (a container churning threads
grows nothing), and the table of grafted-socket records is pruned past its
limit (closed sockets first, then the oldest)."""

import os
import socket
import threading
import time

from sockgraft.agent.inventory import GraftedSocket, Inventory
from sockgraft.agent.targets import Targets


def test_a_session_forgets_threads_the_pidfd_cache_forgot():
    t = Targets(max_threads=4)
    ids = []
    for _ in range(10):                   # ten threads that lived and ended
        th = threading.Thread(target=lambda: ids.append(threading.get_native_id()))
        th.start()
        th.join()
    me = threading.get_native_id()
    t.pidfd(me)                           # one cached, alive
    tids = set(ids) | {me}
    tids.difference_update(t.exited(tids))
    assert tids == {me}
    t.close()


def test_the_record_table_is_pruned_past_its_limit():
    inv = Inventory()
    live = [socket.socket() for _ in range(3)]
    try:
        pid = os.getpid()
        for n in range(50):               # records of sockets closed since
            inv.grafted[(pid, 10000 + n)] = GraftedSocket("c1", pid, 10000 + n, 1, "tcp",
                                                          "egress", "", "", "", time.time())
        for s in live:
            ino = os.fstat(s.fileno()).st_ino
            inv.grafted[(pid, s.fileno())] = GraftedSocket("c1", pid, s.fileno(), ino, "tcp",
                                                           "egress", "", "", "", time.time())
        assert inv.prune(limit=100) == 0 and len(inv.grafted) == 53
        assert inv.prune(limit=10) == 50
        assert set(inv.grafted) == {(pid, s.fileno()) for s in live}
        assert inv.prune(limit=2) == 2 and set(inv.grafted) == {(pid, live[-1].fileno())}
    finally:
        for s in live:
            s.close()
