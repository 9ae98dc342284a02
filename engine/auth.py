"""API tokens: per account, role ``master`` or ``ingest``, stored hashed in Redis.

A token is ``hr_<token id>_<secret>`` (the secret: 32 random bytes, urlsafe
base64). Redis keeps only its SHA-256, under ``{p}:tokens`` (a hash: token id ->
JSON ``{"account_id", "role", "name", "hash", "created"}``), so a leaked Redis
dump holds no usable token. The clear token is returned once, by ``create``.

* ``master``: configures hooks, reads stats and dead letters, replays, publishes;
* ``ingest``: publishes events of its own account, nothing else.

``authenticate`` reads the record of the token id embedded in the token and
compares hashes in constant time; a revoked token is gone at once (no cache).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal, cast

import redis

from engine.errors import NotFound, named, quoted
from engine.events import MAX_ID, is_account_id
from engine.health import Repeats, repeated

Role = Literal["master", "ingest"]
log = logging.getLogger("hookray")
ROLES: tuple[Role, ...] = ("master", "ingest")
TOKEN_PREFIX = "hr"
_TOKEN = re.compile(r"hr_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
# a token's id within text that holds it with more (a quote, a comma, "Bearer ")
_TOKEN_ID = re.compile(r"(?<![A-Za-z0-9])hr_([0-9a-f]{16})_")
# text after "hr_<anything>_" in what was given as a token: its secret part, never shown
_SECRET_PART = re.compile(r"(hr_[^_\s]*_)\S*", re.IGNORECASE)


def tokens_key(prefix: str) -> str:
    """The Redis hash of every token: token id -> record JSON (not in engine.keys:
    the API is the only user)."""
    return f"{prefix}:tokens"


@dataclass(frozen=True)
class TokenInfo:
    """A stored token, without its secret."""

    id: str
    account_id: int
    role: Role
    name: str
    created: float  # unix seconds

    def public(self) -> dict[str, Any]:
        return asdict(self)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    def __init__(self, r: redis.Redis, prefix: str) -> None:
        self.r = r
        self.key = tokens_key(prefix)
        # a damaged record is warned about once a minute, not at every request with it
        self.said = Repeats()

    def create(self, account_id: int, role: str, name: str = "") -> tuple[str, TokenInfo]:
        """A new token of ``account_id`` with ``role``: (the clear token, its record).
        The clear token is not stored and cannot be shown again."""
        if role not in ROLES:
            raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
        if not is_account_id(account_id):
            raise ValueError(f"account id {account_id!r} is not an integer from 0 to {MAX_ID}")
        if len(name) > 255:
            raise ValueError("name is longer than 255 characters")
        while True:
            token_id = secrets.token_hex(8)
            token = f"{TOKEN_PREFIX}_{token_id}_{secrets.token_urlsafe(32)}"
            info = TokenInfo(token_id, account_id, cast(Role, role), name,
                             round(time.time(), 3))
            record = {**info.public(), "hash": _digest(token)}
            del record["id"]
            if self.r.hsetnx(self.key, token_id, json.dumps(record)):
                return token, info

    def authenticate(self, token: str) -> TokenInfo | None:
        """The token's record, or None for a malformed, unknown or revoked token."""
        m = _TOKEN.fullmatch(token)
        if m is None:
            return None
        raw = self.r.hget(self.key, m.group(1))
        if raw is None:
            return None
        info = self._info(m.group(1), raw)
        if info is None or not hmac.compare_digest(json.loads(raw)["hash"], _digest(token)):
            return None
        return info

    def list(self, account_id: int | None = None) -> list[TokenInfo]:
        raw: dict[bytes, bytes] = self.r.hgetall(self.key)  # type: ignore[assignment]
        infos = [info for k, v in raw.items()
                 if (info := self._info(k.decode("utf-8", "replace"), v)) is not None]
        return sorted((i for i in infos if account_id is None or i.account_id == account_id),
                      key=lambda i: (i.account_id, i.created, i.id))

    def revoke(self, token_id: str) -> str:
        """Revoke a token by its id, or by the token itself (its id is part of it), also
        as copied with what surrounds it (quotes and a comma from the JSON ``tokens
        create`` printed, "Bearer ", a space); returns the id. The secret part of a
        token is never quoted back."""
        within = _TOKEN_ID.search(token_id)
        token_id = within.group(1) if within else token_id.strip()
        if not self.r.hdel(self.key, token_id):
            # a token damaged in copying (cut, its case changed) is no id: what follows
            # its id is the secret, shown masked
            shown = _SECRET_PART.sub(r"\1***", token_id)
            raise NotFound(f"token {named(shown)} does not exist")
        return token_id


    def _info(self, token_id: str, raw: bytes | str) -> TokenInfo | None:
        """The token's record; None, with a warning (once a minute for one record: a
        producer may send its token hundreds of times a second), for one that cannot
        be read (damaged, or not written by hookray): it authenticates nothing, and
        hides no other token. ``hookray tokens revoke ID`` deletes it."""
        try:
            return _read(token_id, raw)
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            said = (f"token {token_id}: its record cannot be read ({type(exc).__name__}: "
                    f"{exc}); it authenticates nothing. `hookray tokens revoke {token_id}` "
                    "deletes it")
            times = self.said.due(said)
            if times is not None:
                log.warning("%s%s", said, repeated(times))
            return None


def _read(token_id: str, raw: bytes | str) -> TokenInfo:
    """The token's record, or ValueError, KeyError or TypeError naming what is wrong
    with it: each field is taken only as ``create`` writes it (a ``true`` or ``-7``
    account, a ``"nan"`` creation time is damage, not a value to convert)."""
    record = json.loads(raw)
    role, account_id, created = record["role"], record["account_id"], record["created"]
    # compare_digest takes ASCII text only: another hash would raise at every use
    if role not in ROLES:
        raise ValueError(f"role {quoted(role)}")
    if not isinstance(record["hash"], str) or not record["hash"].isascii():
        raise ValueError("hash")
    if not is_account_id(account_id):
        raise ValueError(f"account_id {quoted(account_id)}: not an integer from 0 to {MAX_ID}")
    if not isinstance(created, int | float) or isinstance(created, bool) \
            or not math.isfinite(created):
        raise ValueError(f"created {quoted(created)}: not a finite number of unix seconds")
    return TokenInfo(token_id, account_id, role, str(record.get("name", "")), float(created))
