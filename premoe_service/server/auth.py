"""Who may call what: the inference API key and the admin token, checked the same way at the gRPC and HTTP doors."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from ..errors import InvalidArgument, PermissionDenied, Unauthenticated

BEARER = b"bearer "


@dataclass(frozen=True)
class Access:
    """The credentials a server asks for, both sent as `authorization: Bearer <secret>`.

    Secrets are compared as bytes in constant time, so a header of any bytes is answered UNAUTHENTICATED or
    PERMISSION_DENIED, never an error of the comparison.

    Attributes:
        admin_token: Needed by admin calls (RegisterTask, DeleteTask) when set; it opens inference calls too.
        api_key: Needed by every other call (Generate, Route, tasks, stats, the HTTP `/v1` endpoints) when set;
            without an admin token it also opens admin calls. Health checks stay open.

    Raises:
        InvalidArgument: A configured secret that no client could send: not printable ASCII (header values are),
            or with spaces at its ends (the check strips them from what clients send). Empty means none.
    """

    admin_token: str | None = None
    api_key: str | None = None

    def __post_init__(self) -> None:
        for name in ("admin_token", "api_key"):
            secret = getattr(self, name)
            if secret and not (secret.isascii() and secret.isprintable() and secret == secret.strip()):
                raise InvalidArgument(
                    "must be printable ASCII without spaces at its ends (it travels in an HTTP header)", field=name
                )

    def check(self, authorization: str | bytes | None, *, admin: bool) -> None:
        """Raise unless `authorization` (the header or metadata value, text or raw bytes) opens a call of this kind.

        Raises:
            Unauthenticated: No credentials where some are needed, or a wrong API key.
            PermissionDenied: An admin call whose secret is not the admin token.
        """
        accepted = self._accepted(admin)
        if not accepted:
            return
        secret = _secret(authorization)
        if not secret:
            what = "the admin token" if admin and self.admin_token else "the API key"
            raise Unauthenticated(f"send 'authorization: Bearer <secret>' with {what}", field="authorization")
        # Every accepted secret is compared, so the time taken does not tell which one came close.
        matches = [hmac.compare_digest(secret, s.encode("ascii")) for s in accepted]
        if any(matches):
            return
        if admin and self.admin_token:
            raise PermissionDenied("admin token does not match", field="authorization")
        raise Unauthenticated("API key does not match", field="authorization")

    def _accepted(self, admin: bool) -> list[str]:
        if admin:
            return [self.admin_token] if self.admin_token else [self.api_key] if self.api_key else []
        return [s for s in (self.api_key, self.admin_token) if s] if self.api_key else []


def _secret(authorization: str | bytes | None) -> bytes:
    """The secret of an `authorization` value as bytes: text as UTF-8 (lone surrogates kept), `Bearer ` dropped."""
    if authorization is None:
        return b""
    if isinstance(authorization, str):
        authorization = authorization.encode("utf-8", "surrogatepass")
    given = authorization.strip()
    if given[: len(BEARER)].lower() == BEARER:
        given = given[len(BEARER) :]
    return given.strip()
