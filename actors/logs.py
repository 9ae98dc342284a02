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

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


# aiohttp's own lines in the API actor: a request handler or a connection that failed
# outside the engine's routes ("Error handling request"), logged by ``aiohttp.server``
# and ``aiohttp.web`` at ERROR with a traceback; its access log is off (actors/api.py)
LIBRARIES = ("aiohttp",)


def configure() -> None:
    """Give the ``hookray`` logger (and so ``hookray.api``...) a handler on stderr at
    INFO, and the ``aiohttp`` logger the same handler at WARNING, once per process (an
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
    for name in LIBRARIES:
        library = logging.getLogger(name)
        if not library.handlers:
            library.addHandler(handler)
            if library.level == logging.NOTSET:
                library.setLevel(logging.WARNING)
