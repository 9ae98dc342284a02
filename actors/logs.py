"""The engine's log in its actors' processes: ``configure`` once per process.

Ray configures only its own ``ray`` logger in a worker process, and nothing else
here configures logging, so without this the engine's lines would go to Python's
last-resort handler: WARNING and above only (the API's address, "indexing dead
letters", "client closed the connection": dropped), each a bare message with no
time, level or source. Ray keeps a worker's stderr in its log files (and
shows it on the driver), where these lines then land. (A job started with Ray's own
``logging_config`` has a root handler in each worker: that one is used instead.)
"""

from __future__ import annotations

import logging
import sys
import time

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


# aiohttp's own lines in the API actor: a request handler or a connection that failed
# outside the engine's routes ("Error handling request"), logged by ``aiohttp.server``
# and ``aiohttp.web`` at ERROR with a traceback; its access log is off (actors/api.py)
LIBRARIES = ("aiohttp",)
# the broker clients' own lines: each failed connect and metadata refresh while a broker
# is down (aiokafka: about 7 a second per destination), beside the engine's own line that
# says why; each kind (logger and message) said once a minute at most
SPARSE_LIBRARIES = ("aiokafka", "aiormq", "aio_pika")
SPARSE_SEC = 60.0


class Sparse(logging.Filter):
    """Lets a record of one kind (its logger and message template) through once every
    ``every`` seconds at most."""

    def __init__(self, every: float = SPARSE_SEC) -> None:
        super().__init__()
        self.every = every
        self.said: dict[tuple[str, str], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg)[:200])
        now = time.monotonic()
        last = self.said.get(key)
        if last is not None and now - last < self.every:
            return False
        if len(self.said) > 1_000:  # kinds are few; bounded all the same
            self.said.clear()
        self.said[key] = now
        return True


def configure() -> None:
    """Give the ``hookray`` logger (and so ``hookray.api``...) a handler on stderr at
    INFO, the ``aiohttp`` logger the same handler at WARNING, and the broker clients'
    loggers one at WARNING that says each kind of line once a minute, once per process (an
    actor restarted in the same worker process, or several actors in one, add none
    more). A process whose logging was configured otherwise (a handler on the root
    logger, or on ``hookray``) is left as it is: its handlers already say these lines,
    and one more would say each twice."""
    engine = logging.getLogger("hookray")
    if engine.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    engine.addHandler(handler)
    if engine.level == logging.NOTSET:
        engine.setLevel(logging.INFO)
    sparse = logging.StreamHandler(sys.stderr)
    sparse.setFormatter(logging.Formatter(FORMAT))
    sparse.addFilter(Sparse())
    for names, given in ((LIBRARIES, handler), (SPARSE_LIBRARIES, sparse)):
        for name in names:
            library = logging.getLogger(name)
            if not library.handlers:
                # (its child loggers' lines, aiokafka.conn's say, reach it too: not the
                # root's last-resort handler, which said each one bare)
                library.addHandler(given)
                if library.level == logging.NOTSET:
                    library.setLevel(logging.WARNING)
