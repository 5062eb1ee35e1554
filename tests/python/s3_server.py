"""moto's S3 server (same arguments as `python -m moto.server`) with atomic conditional writes.

moto checks a PUT's `If-None-Match: *` / `If-Match` and then writes the object as two steps,
so two writers that race for one key could both be told they won (never seen here: 0 of 800
rounds of 8-16 writers; but nothing in moto rules it out), and two cloud nodes' Delta commits of
one version would then overwrite each other. S3 itself decides atomically.
Here every request runs under one lock, which makes the check and the write one step (moto
serves requests one at a time under Python's GIL anyway). The cloud checks this at start
(`storage.single_writer` in docs/configuration.md).
"""

import sys
import threading

import moto.server as server

_lock = threading.Lock()


class OneAtATime(server.DomainDispatcherApplication):
    def __call__(self, environ, start_response):
        with _lock:
            return list(super().__call__(environ, start_response))


server.DomainDispatcherApplication = OneAtATime
server.main(sys.argv[1:])
