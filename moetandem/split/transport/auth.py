"""Bearer-token authentication of split streams: the token comes from a file, travels in the gRPC metadata
`authorization: Bearer <token>` of every stream, is compared in constant time and is never logged."""
from __future__ import annotations

import hmac
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc

from moetandem.errors import InvalidRequestError

HEADER = "authorization"


def read_token(path: str | Path) -> str:
    """The one token in `path` (surrounding whitespace stripped)."""
    p = Path(path).expanduser()
    try:
        token = p.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise InvalidRequestError(f"cannot read the token file {p}: {e.strerror or e}") from None
    if len(token) < 16 or any(c.isspace() for c in token):
        raise InvalidRequestError(f"the token file {p} must hold one token of at least 16 characters, no spaces "
                                  "(e.g. `python -c 'import secrets; print(secrets.token_hex(32))' > FILE`)")
    return token


def call_metadata(token: str) -> list[tuple[str, str]]:
    return [(HEADER, f"Bearer {token}")]


def authorized(metadata: Iterable[Any] | None, token: str) -> bool:
    """True when the metadata carries exactly our token (constant-time comparison)."""
    sent = ""
    for item in metadata or ():
        key, value = (item.key, item.value) if hasattr(item, "key") else item
        if key.lower() == HEADER and isinstance(value, str):
            sent = value
    scheme, _, given = sent.partition(" ")
    ok = hmac.compare_digest(given.encode(), token.encode())
    return scheme.lower() == "bearer" and ok


def server_credentials(cert: str | Path | None, key: str | Path | None) -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files, or None (plain TCP) when neither is given."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise InvalidRequestError("TLS needs both --tls-cert and --tls-key")
    return grpc.ssl_server_credentials([(_read(key), _read(cert))])


def channel_credentials(ca: str | Path | None) -> grpc.ChannelCredentials:
    """TLS to the cloud; `ca` = PEM of the CA (or self-signed cert) to trust, None = the system roots."""
    return grpc.ssl_channel_credentials(root_certificates=_read(ca) if ca else None)


def _read(path: str | Path) -> bytes:
    p = Path(path).expanduser()
    try:
        return p.read_bytes()
    except OSError as e:
        raise InvalidRequestError(f"cannot read {p}: {e.strerror or e}") from None
