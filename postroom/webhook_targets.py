"""Where a webhook may go: https on a public address, unless POSTROOM_WEBHOOK_ALLOW_PRIVATE
allows http and loopback, private, link-local and other non-global addresses. Checked when a URL
is set and again at every send, against the addresses its host resolves to then."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from postroom.errors import InvalidInput

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
MAX_URL_LENGTH = 2000


class TargetRefused(Exception):
    """The target is not allowed (scheme, private address) or does not resolve."""


def split_target(url: str, *, allow_private: bool) -> tuple[str, str, int]:
    """(scheme, host, port) of an allowed-looking URL, before any resolution."""
    if len(url) > MAX_URL_LENGTH:
        raise TargetRefused(f"is over {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise TargetRefused(f"is not a URL ({e})") from e
    schemes = ("https", "http") if allow_private else ("https",)
    if parts.scheme not in schemes:
        raise TargetRefused(
            f"must be an {' or '.join(schemes)} URL, not {parts.scheme or 'schemeless'!r}"
        )
    if not parts.hostname:
        raise TargetRefused("has no host")
    if parts.username or parts.password:
        raise TargetRefused("must not carry credentials")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        raise TargetRefused(f"has a bad port: {e}") from e
    return parts.scheme, parts.hostname, port


def resolve_target(url: str, *, allow_private: bool) -> list[Address]:
    """The addresses to send to, every one of them allowed.

    Raises:
        TargetRefused: saying why (scheme, a non-public address, no address).
    """
    _, host, port = split_target(url, allow_private=allow_private)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError) as e:  # gaierror is an OSError
        raise TargetRefused(f"host {host!r} does not resolve ({e})") from e
    addresses: list[Address] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if not allow_private and not address.is_global:
            raise TargetRefused(
                f"host {host!r} resolves to {address}, a loopback, private or reserved address; "
                "webhooks go to public addresses only"
            )
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise TargetRefused(f"host {host!r} has no address")
    return addresses


def check_webhook_url(url: str | None, *, allow_private: bool, field: str = "webhook_url") -> None:
    """Refuse a webhook URL that could not be delivered to (422 naming the field)."""
    if url is None:
        return
    try:
        resolve_target(url, allow_private=allow_private)
    except TargetRefused as e:
        raise InvalidInput(
            f"{field} {url[:200]!r} {e}. Use a public https URL (POSTROOM_WEBHOOK_ALLOW_PRIVATE "
            "lets a deployment allow others)",
            details=[{"field": field, "reason": str(e)}],
        ) from e
