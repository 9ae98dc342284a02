"""Client TLS contexts of the broker transports (RabbitMQ's amqps, Kafka's TLS).

A hook's ``tls_cafile`` names a file on the engine's machines. It is read here, off
the event loop, and only when it is a plain file of at most MAX_CA_FILE_BYTES: a
FIFO or a device (``/dev/kmsg``, a pipe under ``/proc/self/fd``) would block the
reading thread, and an empty file (``/proc`` and ``/sys`` files show a size of 0)
holds no certificate. The context checks the server's certificate against that
file's CAs (else the system's) and its name against the host.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import stat

from engine.errors import ConnectError

MAX_CA_FILE_BYTES = 4 * 2**20  # far more than a CA bundle (the system's: about 220 KB)


def _open_ca_file(path: str) -> int:
    """A descriptor of the CA file ``path``, open for reading; OSError or ValueError
    saying why it cannot be one. Opened without blocking, so a FIFO is refused rather
    than waited on."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        if info.st_size == 0:
            raise ValueError("the file is empty")
        if info.st_size > MAX_CA_FILE_BYTES:
            raise ValueError(f"{info.st_size:,} bytes: a CA file may hold at most "
                             f"{MAX_CA_FILE_BYTES:,}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def client_context(cafile: str | None) -> ssl.SSLContext:
    """A client context trusting ``cafile``'s certificates only, or the system's CAs
    when None. A PEM file is loaded by OpenSSL as a ``cafile`` always was (text around
    the certificates, a byte order mark, ``TRUSTED CERTIFICATE`` blocks), from the
    descriptor checked here; a file without a PEM block is taken as one DER
    certificate. Blocking: see ``client_context_for``."""
    if cafile is None:
        return ssl.create_default_context()
    fd = _open_ca_file(cafile)
    try:
        data = os.pread(fd, MAX_CA_FILE_BYTES + 1, 0)
        if b"-----BEGIN" not in data:
            return ssl.create_default_context(cadata=data)  # DER
        # the file this descriptor has open, not whatever the path names by now
        opened = f"/dev/fd/{fd}" if os.path.isdir("/dev/fd") else cafile
        return ssl.create_default_context(cafile=opened)
    finally:
        os.close(fd)


async def client_context_for(where: str, cafile: str | None) -> ssl.SSLContext:
    """``client_context(cafile)`` made in a thread, for each new connection (a CA file
    replaced on disk is read again); ConnectError naming ``where`` and the file when it
    cannot be used."""
    try:
        return await asyncio.to_thread(client_context, cafile)
    except (OSError, ValueError, ssl.SSLError) as exc:
        what = f"TLS CA file {cafile!r}" if cafile else "the system's TLS CAs"
        raise ConnectError(f"{where}: {what} cannot be used: {exc}") from None
