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


#: gRPC status details that mean TLS is misconfigured (wrong CA, name mismatch, TLS to a plaintext cloud)
TLS_FAILURES = ("handshake failed", "ssl_error", "certificate_verify_failed", "hostname verification",
                "wrong_version_number", "tsi_", "certificate")


def tls_failure(detail: str) -> bool:
    """True when a connection failure's details are a TLS configuration error, not a network outage."""
    d = detail.lower()
    return any(m in d for m in TLS_FAILURES)


def speaks_tls(address: str, timeout_s: float = 2.0) -> bool:
    """True when the server at HOST:PORT completes a TLS handshake (certificate unchecked): a plaintext end
    talking to it sees only "Socket closed", which would otherwise look like an outage."""
    import socket
    import ssl
    host, _, port = address.rpartition(":")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s) as sock:
            with ctx.wrap_socket(sock, server_hostname=host.strip("[]") or None):
                return True
    except (OSError, ValueError):
        return False
