"""Kubernetes ServiceAccount tokens as credentials: which cluster identities may send a kfloop server events.

With Knative OIDC on, broker-filter calls a Trigger's subscriber with ``Authorization: Bearer <JWT>``
for the Trigger's own ServiceAccount (``system:serviceaccount:<ns>:<sa>``, ``<sa>`` being Knative's
``kmeta.ChildName(<trigger>, "-oidc-eventing.knative.dev-trigger")``: shortened with a hash for long Trigger
names, see ``kfloop.manifests.render``), with ``aud`` set to the audience the Trigger names. :class:`ServiceAccountTokens` is the
:class:`~kfloop.serving.auth.Authenticator` that checks such a token the way Knative's own data plane does --
against the cluster's signing keys found by OIDC discovery, not by TokenReview, so the server needs no
``system:auth-delegator`` role -- and then admits only the listed subjects.

This module owns that check and the key cache behind it: discovery and the JWKS are fetched on first use,
and again on an unknown key id (key rotation) at most once per :attr:`ServiceAccountTokens.refetch_seconds`,
so tokens with forged key ids cannot make the server hammer the API server.
"""

from __future__ import annotations

import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping, Sequence

import httpx
import jwt

from kfloop.errors import Forbidden, InputError, Unauthenticated, UpstreamError
from kfloop.http_clients import http_client
from kfloop.serving.auth import bearer_token

__all__ = ["ALGORITHMS", "MAX_TOKEN_CHARS", "ServiceAccountTokens"]

ALGORITHMS = ("RS256", "ES256")  # what Kubernetes signs ServiceAccount tokens with; never none or HS*
MAX_TOKEN_CHARS = 16 * 1024  # a ServiceAccount token is about 1 KiB; anything far longer is refused unparsed
_REQUIRED_CLAIMS = ["exp", "iat", "iss", "aud", "sub"]
_FETCH_TIMEOUT = httpx.Timeout(5.0)
_SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


@dataclass(frozen=True)
class _Discovery:
    """The two fields of an OIDC discovery document this module uses."""

    issuer: str
    jwks_uri: str


class ServiceAccountTokens:
    """Admits requests carrying a valid ServiceAccount JWT for ``audience`` whose ``sub`` is one of ``subjects``.

    Refuses with :class:`~kfloop.errors.Unauthenticated` (401) a missing, malformed, oversized, expired or
    not-yet-valid token, a bad signature, an unknown key, another audience or another issuer; with
    :class:`~kfloop.errors.Forbidden` (403) a valid token of another subject; and raises
    :class:`~kfloop.errors.UpstreamError` (502, the sender retries) when the keys cannot be fetched.

    ``issuer_url`` is where discovery is served (``{issuer_url}/.well-known/openid-configuration``); the
    token's ``iss`` must equal the ``issuer`` that document names. Fetches verify TLS with ``ca_file`` when
    that file exists and send ``Authorization: Bearer <bearer_file>`` when that file exists (re-read on
    every fetch: the kubelet rotates it), because Kubernetes serves discovery to ServiceAccounts only.
    ``leeway_seconds`` is the clock skew allowed on ``exp``, ``nbf`` and ``iat``.

    Safe to call from several threads: one lock guards the key cache, and a fetch holds it, so concurrent
    checks on a cold cache fetch once.
    """

    # Least time between two key fetches for unknown key ids. A class attribute, not a constructor
    # argument, because only tests (subclassing to shorten it) have a reason to change it.
    refetch_seconds: float = 60.0

    def __init__(
        self,
        audience: str,
        subjects: Sequence[str],
        *,
        issuer_url: str = "https://kubernetes.default.svc",
        ca_file: Path | None = _SERVICE_ACCOUNT / "ca.crt",
        bearer_file: Path | None = _SERVICE_ACCOUNT / "token",
        leeway_seconds: float = 30.0,
    ) -> None:
        malformed = [] if isinstance(subjects, str) else [subject for subject in subjects if not _is_service_account(subject)]
        problems = [problem for problem in (
            "audience must not be empty" if not audience else None,
            "subjects must name at least one ServiceAccount (system:serviceaccount:<ns>:<name>)"
            if not subjects or isinstance(subjects, str) else None,
            f"subjects {', '.join(repr(s) for s in malformed)} are not system:serviceaccount:<ns>:<name>" if malformed else None,
            "issuer_url must be an http(s) URL" if not issuer_url.startswith(("https://", "http://")) else None,
            f"leeway_seconds must be >= 0 (got {leeway_seconds})" if leeway_seconds < 0 else None,
        ) if problem]
        if problems:
            raise InputError("ServiceAccountTokens: " + "; ".join(problems))
        self.audience = audience
        self.subjects = frozenset(subjects)
        self.issuer_url = issuer_url.rstrip("/")
        self.ca_file = ca_file
        self.bearer_file = bearer_file
        self.leeway_seconds = leeway_seconds
        self._lock = threading.Lock()
        self._discovery: _Discovery | None = None
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = 0.0  # time.monotonic() of the last JWKS fetch attempt, failed or not

    def check(self, headers: Mapping[str, str]) -> None:
        token = bearer_token(headers)
        if len(token) > MAX_TOKEN_CHARS:
            raise Unauthenticated(f"the bearer token is longer than {MAX_TOKEN_CHARS} characters; "
                                  "a Kubernetes ServiceAccount token is expected")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise Unauthenticated("the bearer token is not a JWT; a Kubernetes ServiceAccount token is expected") from None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in ALGORITHMS:
            raise Unauthenticated(f"the token's signing algorithm is not one of {', '.join(ALGORITHMS)}")
        if not isinstance(kid, str) or not kid:
            raise Unauthenticated("the token's header names no signing key (kid)")
        key, issuer = self._key(kid)
        if alg != key.algorithm_name:
            raise Unauthenticated(f"the token's algorithm {alg} does not fit its key ({key.algorithm_name})")
        subject = self._verified_subject(token, key, issuer)
        if subject not in self.subjects:
            raise Forbidden(f"ServiceAccount {subject!r} may not send requests here; it is not one of the "
                            f"{len(self.subjects)} admitted subjects")

    def _key(self, kid: str) -> tuple[jwt.PyJWK, str]:
        """The published key ``kid`` and the cluster's issuer, fetching the keys if they are due."""
        with self._lock:
            due = not self._keys or time.monotonic() - self._fetched_at >= self.refetch_seconds
            if kid not in self._keys and due:
                self._fetch()
            key, discovery = self._keys.get(kid), self._discovery
        if key is None or discovery is None:
            raise Unauthenticated("the token is signed with a key this cluster does not publish (unknown kid)")
        return key, discovery.issuer

    def _verified_subject(self, token: str, key: jwt.PyJWK, issuer: str) -> str:
        """The ``sub`` of a token whose signature, audience, times and issuer all check out."""
        try:
            claims = jwt.decode(token, key, algorithms=[key.algorithm_name], audience=self.audience, issuer=issuer,
                                leeway=self.leeway_seconds, options={"require": _REQUIRED_CLAIMS})
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("the token is not valid yet (its nbf or iat lies in the future)") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated(f"the token is not for audience {self.audience!r}") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated(f"the token was not issued by this cluster (expected iss {issuer!r})") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated("the token's signature does not verify with the cluster's key") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"the token has no {exc.claim!r} claim") from None
        except jwt.InvalidTokenError as exc:  # PyJWT's messages name the fault, never the token
            raise Unauthenticated(f"the token is invalid: {exc}") from None
        return claims["sub"]

    def _fetch(self) -> None:
        """Fetch discovery (once it has succeeded, never again) and the JWKS; the caller holds the lock."""
        self._fetched_at = time.monotonic()
        with http_client(timeout=_FETCH_TIMEOUT, headers=self._credentials(), verify=self._tls()) as client:
            if self._discovery is None:
                url = f"{self.issuer_url}/.well-known/openid-configuration"
                self._discovery = _parse_discovery(_get_json(client, url, "OIDC discovery"), url)
            url = self._discovery.jwks_uri
            self._keys = _usable_keys(_get_json(client, url, "the cluster's JWKS"), url)

    def _tls(self) -> ssl.SSLContext | bool:
        if self.ca_file is None or not self.ca_file.exists():
            return True
        try:
            return ssl.create_default_context(cafile=str(self.ca_file))
        except OSError as exc:  # ssl.SSLError is one
            raise UpstreamError(f"cannot use the cluster CA {self.ca_file}: {exc}") from exc

    def _credentials(self) -> dict[str, str]:
        if self.bearer_file is None or not self.bearer_file.exists():
            return {}
        try:
            return {"authorization": f"Bearer {self.bearer_file.read_text().strip()}"}
        except OSError as exc:
            raise UpstreamError(f"cannot read the ServiceAccount token {self.bearer_file}: {exc}") from exc


def _is_service_account(subject: str) -> bool:
    prefix, _, rest = subject.partition("system:serviceaccount:")
    namespace, _, name = rest.partition(":")
    return not prefix and bool(namespace) and bool(name) and ":" not in name


def _get_json(client: httpx.Client, url: str, what: str) -> dict[str, object]:
    try:
        response = client.get(url)
    except httpx.HTTPError as exc:
        raise UpstreamError(f"cannot reach {what} at {url}: {exc}") from exc
    if response.status_code != 200:
        hint = (" (the server's ServiceAccount needs the system:service-account-issuer-discovery role)"
                if response.status_code in (401, 403) else "")
        raise UpstreamError(f"{what} at {url} answered {response.status_code}{hint}")
    try:
        document = response.json()
    except ValueError:
        raise UpstreamError(f"{what} at {url} did not answer JSON") from None
    if not isinstance(document, dict):
        raise UpstreamError(f"{what} at {url} did not answer a JSON object")
    return document


def _parse_discovery(document: dict[str, object], url: str) -> _Discovery:
    issuer, jwks_uri = document.get("issuer"), document.get("jwks_uri")
    if not isinstance(issuer, str) or not issuer or not isinstance(jwks_uri, str) or not jwks_uri:
        raise UpstreamError(f"the OIDC discovery document at {url} lacks 'issuer' or 'jwks_uri'")
    return _Discovery(issuer, jwks_uri)


def _usable_keys(document: dict[str, object], url: str) -> dict[str, jwt.PyJWK]:
    """The JWKS's signing keys by key id, for :data:`ALGORITHMS` only (no symmetric key can slip in)."""
    try:
        keys = jwt.PyJWKSet.from_dict(document)
    except jwt.PyJWTError as exc:
        raise UpstreamError(f"the JWKS at {url} cannot be used: {exc}") from exc
    usable = {key.key_id: key for key in keys
              if key.key_id and key.algorithm_name in ALGORITHMS and key.public_key_use in (None, "sig")}
    if not usable:
        raise UpstreamError(f"the JWKS at {url} has no {' or '.join(ALGORITHMS)} signing key with a key id")
    return usable
