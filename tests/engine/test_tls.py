"""engine.transports.tls: a hook's CA file is read without blocking, and only a plain,
non-empty file of a CA's size; every refusal is a ConnectError naming the file and why."""

from __future__ import annotations

import asyncio
import os
import ssl
from pathlib import Path

import pytest
import trustme

from engine.errors import ConnectError
from engine.transports.tls import (
    MAX_CA_FILE_BYTES,
    client_context,
    client_context_for,
)


def refusal(path: str) -> str:
    """The ConnectError text for ``path``, which must come within 5 s (a wait
    would end as TimeoutError, which is no ConnectError)."""
    with pytest.raises(ConnectError) as err:
        asyncio.run(asyncio.wait_for(client_context_for("broker b:5671", path), 5))
    text = str(err.value)
    assert text.startswith(f"broker b:5671: TLS CA file {path!r} cannot be used: "), text
    return text


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "ca.pem"
    os.mkfifo(fifo)
    assert refusal(str(fifo)).endswith("not a regular file")


def test_a_device_or_a_directory_is_refused(tmp_path: Path) -> None:
    assert refusal("/dev/null").endswith("not a regular file")
    assert refusal(str(tmp_path)).endswith("not a regular file")


def test_an_empty_file_and_proc_files_are_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pem"
    empty.write_bytes(b"")
    assert refusal(str(empty)).endswith("the file is empty")
    # /proc files show a size of 0: none is read (nor could hold a certificate)
    assert refusal("/proc/self/environ").endswith("the file is empty")


def test_a_file_larger_than_a_ca_bundle_is_refused_unread(tmp_path: Path) -> None:
    big = tmp_path / "big.pem"
    with big.open("wb") as f:
        f.truncate(MAX_CA_FILE_BYTES + 1)  # sparse: nothing written
    assert refusal(str(big)).endswith(
        f"{MAX_CA_FILE_BYTES + 1:,} bytes: a CA file may hold at most {MAX_CA_FILE_BYTES:,}")


def test_a_missing_file_or_one_without_a_certificate_is_refused(tmp_path: Path) -> None:
    assert "No such file or directory" in refusal(str(tmp_path / "missing.pem"))
    text = tmp_path / "notes.txt"
    text.write_text("no certificate here\n")
    assert "cadata does not contain a certificate" in refusal(str(text))


def test_a_pem_bundle_or_a_der_certificate_is_trusted(tmp_path: Path) -> None:
    ca = trustme.CA()
    pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(pem))
    der = tmp_path / "ca.der"
    der.write_bytes(ssl.PEM_cert_to_DER_cert(ca.cert_pem.bytes().decode()))
    for path in (pem, der):
        context = asyncio.run(client_context_for("b", str(path)))
        assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
        assert len(context.get_ca_certs()) == 1  # that CA only, not the system's
    system = client_context(None)
    assert system.verify_mode == ssl.CERT_REQUIRED and system.check_hostname


def test_pem_files_load_as_openssl_loads_a_cafile(tmp_path: Path) -> None:
    """Text around the certificates (non-ASCII too, as in curl's cacert.pem), a byte
    order mark, OpenSSL's TRUSTED CERTIFICATE blocks: read as a cafile always was."""
    first, second = trustme.CA(), trustme.CA()
    pem = first.cert_pem.bytes()
    trusted = pem.replace(b"BEGIN CERTIFICATE", b"BEGIN TRUSTED CERTIFICATE") \
        .replace(b"END CERTIFICATE", b"END TRUSTED CERTIFICATE")
    for name, data, count in (
            ("bundle.pem", "# Főtanúsítvány\n".encode() + pem + "# Ä\n".encode()
             + second.cert_pem.bytes(), 2),
            ("bom.pem", b"\xef\xbb\xbf" + pem, 1),
            ("trusted.pem", trusted, 1)):
        path = tmp_path / name
        path.write_bytes(data)
        context = asyncio.run(client_context_for("b", str(path)))
        assert len(context.get_ca_certs()) == count, name
