"""API keys, the tenant each names, and the cache namespace each tenant gets.

With API keys configured, every caller is a tenant: the one named beside its key in the key
file, or, for a key alone on its line, a tenant of that key alone. Each tenant's prompts hash
under their own root (`tenant_cache_salt`), so its KV blocks are never another tenant's hits,
on any replica, in any tier: the `cached_tokens` a caller sees count its own earlier prompts
only, and cannot tell it what someone else sent. A client's `cache_salt` splits its tenant's
namespace further; it cannot reach into another's.

`serve.tenants_share_cache` puts every tenant in one namespace again (more hits across keys);
`cached_tokens` is then reported as 0, since a hit may be on another tenant's prompt.

Key file (`serve.api_key_file`, a mounted secret), one key a line, `#` comments:

    acme     sk-acme-1
    acme     sk-acme-2         # several keys of one tenant share its namespace
    sk-lone-key                # a key without a tenant name: a namespace of its own
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from cluster.config import ConfigError, ServeSettings
from deployments.errors import api_error


def load_api_keys(settings: ServeSettings) -> dict[str, str] | None:
    """key -> tenant, or None when no key is configured (an open server)."""
    if settings.api_key_file is not None:
        return _parse_key_file(settings.api_key_file)
    if settings.api_key is not None:
        return {settings.api_key: _anonymous_tenant(settings.api_key)}
    return None


def _parse_key_file(path: str) -> dict[str, str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"serve.api_key_file: cannot read {path}: {error}") from None
    keys: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) > 2:
            raise ConfigError(f"serve.api_key_file: {path} line {number}: expected `<key>` or `<tenant> <key>`")
        key = fields[-1]
        keys[key] = fields[0] if len(fields) == 2 else _anonymous_tenant(key)
    if not keys:
        raise ConfigError(f"serve.api_key_file: {path} holds no key")
    return keys


def _anonymous_tenant(key: str) -> str:
    return "key-" + _digest(key)[:16]  # names the namespace without revealing the key


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def bearer_auth(api_keys: dict[str, str]):
    """A dependency that returns the caller's tenant, from `Authorization: Bearer <key>`; 401 otherwise."""
    tenants = {_digest(key): tenant for key, tenant in api_keys.items()}
    # Looked up by digest: the time a lookup takes tells nothing about how much of a key was right.
    scheme = HTTPBearer(auto_error=False, description="An API key from serve.api_key or serve.api_key_file.")

    async def tenant_of(credentials: HTTPAuthorizationCredentials | None = Depends(scheme)) -> str:
        tenant = None if credentials is None else tenants.get(_digest(credentials.credentials))
        if tenant is None:
            raise api_error(401, "missing or invalid API key (send `Authorization: Bearer <key>`)",
                            code="invalid_api_key")  # fmt: skip
        return tenant

    return tenant_of


async def no_auth() -> None:
    """The caller of an open server: no tenant."""
    return None


def tenant_cache_salt(tenant: str | None, cache_salt: str | None) -> str | None:
    """The salt that roots a request's prefix hashes: its tenant's namespace, the client's salt within."""
    if tenant is None:
        return cache_salt
    return json.dumps(["tenant", tenant, cache_salt])  # unambiguous: no two (tenant, salt) pairs collide
