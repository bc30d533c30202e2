"""Who may call what: the inference API key and the admin token, checked the same way at the gRPC and HTTP doors."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from ..errors import PermissionDenied, Unauthenticated


@dataclass(frozen=True)
class Access:
    """The credentials a server asks for, both sent as `authorization: Bearer <secret>`.

    Attributes:
        admin_token: Needed by admin calls (RegisterTask, DeleteTask) when set; it opens inference calls too.
        api_key: Needed by every other call (Generate, Route, tasks, stats, the HTTP `/v1` endpoints) when set;
            without an admin token it also opens admin calls. Health checks stay open.
    """

    admin_token: str | None = None
    api_key: str | None = None

    def check(self, authorization: str | None, *, admin: bool) -> None:
        """Raise unless `authorization` (the header or metadata value) opens a call of this kind.

        Raises:
            Unauthenticated: No credentials where some are needed, or a wrong API key.
            PermissionDenied: An admin call whose secret is not the admin token.
        """
        accepted = self._accepted(admin)
        if not accepted:
            return
        given = (authorization or "").strip()
        secret = given.removeprefix("Bearer ").strip()
        if not secret:
            what = "the admin token" if admin and self.admin_token else "the API key"
            raise Unauthenticated(f"send 'authorization: Bearer <secret>' with {what}", field="authorization")
        if any(hmac.compare_digest(secret.encode(), s.encode()) for s in accepted):
            return
        if admin and self.admin_token:
            raise PermissionDenied("admin token does not match", field="authorization")
        raise Unauthenticated("API key does not match", field="authorization")

    def _accepted(self, admin: bool) -> list[str]:
        if admin:
            return [self.admin_token] if self.admin_token else [self.api_key] if self.api_key else []
        return [s for s in (self.api_key, self.admin_token) if s] if self.api_key else []
