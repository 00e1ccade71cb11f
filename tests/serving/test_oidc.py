"""ServiceAccountTokens against a real OIDC issuer: a discovery document and JWKS served over HTTP on
127.0.0.1, tokens signed with real RSA and EC keys, and the requests the issuer saw counted."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import ipaddress
import json
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from collections.abc import Iterator

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from kfloop.event_types import DRIFT_EVENT
from kfloop.errors import Forbidden, InputError, Unauthenticated, UpstreamError
from kfloop.local.supervisor import free_port
from kfloop.serving.oidc import MAX_TOKEN_CHARS, ServiceAccountTokens
from oidc_issuer import ATTACKER_KEY, DISCOVERY, EC_KEY, ISSUER, JWKS, NEXT_RSA_KEY, RSA_KEY, Issuer, public_jwk

AUDIENCE = "kfloop-trigger"
TRIGGER = "system:serviceaccount:ml:retrain-oidc-eventing.knative.dev-trigger"


def cluster_ca(folder: Path, name: str) -> tuple[Path, ssl.SSLContext]:
    """A CA written to ``folder/<name>.crt`` and a server context presenting a 127.0.0.1 certificate it signed."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + datetime.timedelta(hours=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    server = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
              .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now).not_valid_after(now + datetime.timedelta(hours=1))
              .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
              .sign(ca_key, hashes.SHA256()))
    ca_file, chain, key = folder / f"{name}.crt", folder / f"{name}-server.crt", folder / f"{name}-server.key"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    chain.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain, key)
    return ca_file, context


class QuickRotation(ServiceAccountTokens):
    refetch_seconds = 0.5


@pytest.fixture
def issuer() -> Iterator[Issuer]:
    server = Issuer()
    yield server
    server.stop()


@pytest.fixture
def bearer_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text("the-servers-own-sa-token\n")
    return path


@pytest.fixture
def tokens(issuer: Issuer, bearer_file: Path) -> ServiceAccountTokens:
    return ServiceAccountTokens(AUDIENCE, [TRIGGER], issuer_url=issuer.url, ca_file=None, bearer_file=bearer_file)


def claims(**changes: object) -> dict[str, object]:
    now = int(time.time())
    base: dict[str, object] = {"iss": ISSUER, "aud": [AUDIENCE], "sub": TRIGGER, "iat": now, "nbf": now, "exp": now + 3600}
    return {name: value for name, value in {**base, **changes}.items() if value is not None}


def signed(private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = RSA_KEY, kid: str = "rsa-1", **changes: object) -> str:
    algorithm = "RS256" if isinstance(private_key, rsa.RSAPrivateKey) else "ES256"
    return jwt.encode(claims(**changes), private_key, algorithm=algorithm, headers={"kid": kid})


def forged(header: dict[str, str], secret: bytes | None) -> str:
    """A token PyJWT refuses to make: ``alg: none`` (no signature) or HMAC keyed with whatever ``secret`` is."""
    def part(data: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    signing_input = f"{part(header)}.{part(claims())}"
    signature = b"" if secret is None else hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def refused(tokens: ServiceAccountTokens, headers: dict[str, str], match: str) -> Unauthenticated:
    with pytest.raises(Unauthenticated, match=match) as caught:
        tokens.check(headers)
    assert caught.value.status == 401
    return caught.value


@pytest.mark.parametrize("key, kid", [(RSA_KEY, "rsa-1"), (EC_KEY, "ec-1")], ids=["RS256", "ES256"])
def test_a_trigger_token_signed_by_the_cluster_passes(tokens: ServiceAccountTokens, issuer: Issuer, key, kid: str) -> None:
    tokens.check(bearer(signed(key, kid)))
    assert issuer.seen == [(DISCOVERY, "Bearer the-servers-own-sa-token"), (JWKS, "Bearer the-servers-own-sa-token")]


def test_a_token_whose_aud_list_contains_the_audience_passes(tokens: ServiceAccountTokens) -> None:
    tokens.check(bearer(signed(aud=["someone-else", AUDIENCE])))
    tokens.check(bearer(signed(aud=AUDIENCE)))


def test_a_token_expired_within_the_leeway_passes(tokens: ServiceAccountTokens) -> None:
    tokens.check(bearer(signed(exp=int(time.time()) - 10)))


def test_a_request_without_a_token_is_401_before_any_fetch(tokens: ServiceAccountTokens, issuer: Issuer) -> None:
    refused(tokens, {}, "this endpoint needs credentials")
    refused(tokens, {"authorization": "Basic dXNlcjpwYXNz"}, "must be 'Bearer <token>'")
    assert issuer.seen == []


@pytest.mark.parametrize("token", ["garbage", "a.b.c", "bm90IGpzb24.e30.c2ln", "x" * 100])
def test_a_token_that_is_not_a_jwt_is_401(tokens: ServiceAccountTokens, token: str) -> None:
    error = refused(tokens, bearer(token), "the bearer token is not a JWT")
    assert token not in str(error)


def test_an_oversized_token_is_401_unparsed(tokens: ServiceAccountTokens, issuer: Issuer) -> None:
    refused(tokens, bearer("e" * (MAX_TOKEN_CHARS + 1)), f"longer than {MAX_TOKEN_CHARS} characters")
    assert issuer.seen == []


def test_a_token_signed_by_another_key_under_the_clusters_kid_is_401(tokens: ServiceAccountTokens) -> None:
    token = signed(ATTACKER_KEY, "rsa-1")
    error = refused(tokens, bearer(token), "signature does not verify")
    assert token not in str(error)


def test_a_token_whose_algorithm_does_not_fit_its_key_is_401(tokens: ServiceAccountTokens) -> None:
    refused(tokens, bearer(signed(EC_KEY, "rsa-1")), "the token's algorithm ES256 does not fit its key \\(RS256\\)")


def test_an_expired_token_is_401(tokens: ServiceAccountTokens) -> None:
    refused(tokens, bearer(signed(iat=int(time.time()) - 7200, exp=int(time.time()) - 60)), "the token has expired")


def test_a_token_from_the_future_is_401(tokens: ServiceAccountTokens) -> None:
    refused(tokens, bearer(signed(nbf=int(time.time()) + 600)), r"not valid yet \(its nbf or iat")


def test_a_token_for_another_audience_is_401(tokens: ServiceAccountTokens) -> None:
    refused(tokens, bearer(signed(aud=["eventing.knative.dev/broker/ml/default"])), "not for audience 'kfloop-trigger'")


def test_a_token_from_another_issuer_is_401(tokens: ServiceAccountTokens) -> None:
    refused(tokens, bearer(signed(iss="https://evil.example")), f"not issued by this cluster \\(expected iss '{ISSUER}'\\)")


def test_a_token_without_exp_is_401(tokens: ServiceAccountTokens) -> None:
    refused(tokens, bearer(signed(exp=None)), "the token has no 'exp' claim")


def test_an_unsigned_token_is_401(tokens: ServiceAccountTokens, issuer: Issuer) -> None:
    refused(tokens, bearer(forged({"alg": "none", "kid": "rsa-1"}, None)), "algorithm is not one of RS256, ES256")
    assert issuer.seen == []


def test_an_hs256_token_keyed_with_the_public_key_is_401(tokens: ServiceAccountTokens) -> None:
    public_pem = RSA_KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    refused(tokens, bearer(forged({"alg": "HS256", "kid": "rsa-1", "typ": "JWT"}, public_pem)), "algorithm is not one of RS256, ES256")


def test_a_token_without_a_kid_is_401(tokens: ServiceAccountTokens) -> None:
    token = jwt.encode(claims(), RSA_KEY, algorithm="RS256")
    refused(tokens, bearer(token), r"names no signing key \(kid\)")


def test_a_valid_token_of_another_serviceaccount_is_403(tokens: ServiceAccountTokens) -> None:
    with pytest.raises(Forbidden, match="ServiceAccount 'system:serviceaccount:ml:default' may not send requests here") as caught:
        tokens.check(bearer(signed(sub="system:serviceaccount:ml:default")))
    assert caught.value.status == 403


def test_a_rotated_key_is_accepted_after_one_refetch_with_the_fresh_bearer(issuer: Issuer, bearer_file: Path) -> None:
    tokens = QuickRotation(AUDIENCE, [TRIGGER], issuer_url=issuer.url, ca_file=None, bearer_file=bearer_file)
    tokens.check(bearer(signed()))
    issuer.keys = [public_jwk(NEXT_RSA_KEY, "rsa-2")]
    bearer_file.write_text("the-rotated-sa-token")
    time.sleep(QuickRotation.refetch_seconds)

    tokens.check(bearer(signed(NEXT_RSA_KEY, "rsa-2")))

    assert issuer.fetches(DISCOVERY) == 1
    assert issuer.fetches(JWKS) == 2
    assert issuer.seen[-1] == (JWKS, "Bearer the-rotated-sa-token")
    refused(tokens, bearer(signed()), "a key this cluster does not publish")  # the old key is gone from the JWKS


def test_forged_kids_cause_at_most_one_refetch_per_interval(issuer: Issuer, bearer_file: Path) -> None:
    tokens = QuickRotation(AUDIENCE, [TRIGGER], issuer_url=issuer.url, ca_file=None, bearer_file=bearer_file)
    forgeries = [signed(ATTACKER_KEY, f"forged-{n}") for n in range(100)]  # signed up front: the checks alone are timed
    tokens.check(bearer(signed()))
    for token in forgeries[:50]:
        refused(tokens, bearer(token), r"does not publish \(unknown kid\)")
    assert issuer.fetches(JWKS) == 1  # all within the interval of the first fetch

    time.sleep(QuickRotation.refetch_seconds)
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda token: _outcome(tokens, token), forgeries[50:]))
    assert outcomes == [401] * 50
    assert issuer.fetches(JWKS) == 2
    assert issuer.fetches(DISCOVERY) == 1


def test_concurrent_checks_on_a_cold_cache_fetch_once(tokens: ServiceAccountTokens, issuer: Issuer) -> None:
    token = signed()
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda _: _outcome(tokens, token), range(32)))
    assert outcomes == [200] * 32
    assert issuer.fetches(DISCOVERY) == 1 and issuer.fetches(JWKS) == 1


def test_an_unreachable_issuer_is_a_502_the_sender_retries(bearer_file: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    tokens = ServiceAccountTokens(AUDIENCE, [TRIGGER], issuer_url=url, ca_file=None, bearer_file=bearer_file)
    with pytest.raises(UpstreamError, match=f"cannot reach OIDC discovery at {url}{DISCOVERY}") as caught:
        tokens.check(bearer(signed()))
    assert caught.value.status == 502


def test_the_issuer_is_reached_over_tls_verified_with_the_cluster_ca(tmp_path: Path, bearer_file: Path) -> None:
    ca_file, server_tls = cluster_ca(tmp_path, "cluster")
    other_ca, _ = cluster_ca(tmp_path, "other")
    issuer = Issuer(server_tls)
    try:
        ServiceAccountTokens(AUDIENCE, [TRIGGER], issuer_url=issuer.url, ca_file=ca_file, bearer_file=bearer_file).check(bearer(signed()))
        assert issuer.fetches(DISCOVERY) == 1 and issuer.fetches(JWKS) == 1

        impostor = ServiceAccountTokens(AUDIENCE, [TRIGGER], issuer_url=issuer.url, ca_file=other_ca, bearer_file=bearer_file)
        with pytest.raises(UpstreamError, match="cannot reach OIDC discovery at .*CERTIFICATE_VERIFY_FAILED"):
            impostor.check(bearer(signed()))
        assert issuer.fetches(DISCOVERY) == 1  # the bearer never went to a server the cluster CA did not vouch for
    finally:
        issuer.stop()


def test_a_failed_refetch_is_a_502_and_the_known_keys_still_work(issuer: Issuer, bearer_file: Path) -> None:
    tokens = QuickRotation(AUDIENCE, [TRIGGER], issuer_url=issuer.url, ca_file=None, bearer_file=bearer_file)
    tokens.check(bearer(signed()))
    issuer.keys = []
    time.sleep(QuickRotation.refetch_seconds)
    with pytest.raises(UpstreamError, match="the JWKS at .* cannot be used"):
        tokens.check(bearer(signed(NEXT_RSA_KEY, "rsa-2")))
    tokens.check(bearer(signed()))


def test_a_misconfigured_authenticator_names_every_bad_argument() -> None:
    with pytest.raises(InputError, match="audience must not be empty; subjects must name at least one ServiceAccount.*"
                                         "issuer_url must be an http.s. URL; leeway_seconds must be >= 0"):
        ServiceAccountTokens("", [], issuer_url="kubernetes.default.svc", leeway_seconds=-1)
    with pytest.raises(InputError, match="subjects must name at least one ServiceAccount"):
        ServiceAccountTokens(AUDIENCE, TRIGGER)
    with pytest.raises(InputError, match=r"subjects 'retrain', 'system:serviceaccount:ml' are not system:serviceaccount:<ns>:<name>"):
        ServiceAccountTokens(AUDIENCE, [TRIGGER, "retrain", "system:serviceaccount:ml"])


def _outcome(tokens: ServiceAccountTokens, token: str) -> int:
    try:
        tokens.check(bearer(token))
    except (Unauthenticated, Forbidden) as exc:
        return exc.status
    return 200


def test_kfloop_trigger_with_oidc_takes_alarms_only_from_the_knative_triggers_service_account(issuer: Issuer, tmp_path: Path) -> None:
    """The cluster mode of ``kfloop trigger`` as a real process: the CLI wires ServiceAccountTokens to ``POST /``."""
    import subprocess
    import sys

    import httpx
    from cloudevents.conversion import to_binary
    from cloudevents.http import CloudEvent

    from testbed import wait_until_answering

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "kfloop", "trigger", "--registry", str(tmp_path / "registry"), "--model", "leaf",
         "--home", str(tmp_path / "home"), "--http-port", str(port), "--alarm-auth", "oidc",
         "--oidc-issuer-url", issuer.url, "--oidc-audience", AUDIENCE, "--oidc-subject", TRIGGER],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_answering(url + "/healthz", "trigger", 60)
        # A drift alarm for another model: admitted past authentication, then ignored (no run can start).
        headers, body = to_binary(CloudEvent({"type": DRIFT_EVENT, "source": "broker", "id": "a-1"},
                                             {"model": "someone-else"}))

        def send(extra: dict[str, str]) -> httpx.Response:
            return httpx.post(url + "/", headers=headers | extra, content=body, timeout=10)

        assert send({}).status_code == 401
        assert send(bearer(signed(aud=["eventing.knative.dev/broker/ml/default"]))).status_code == 401
        assert send(bearer(signed(ATTACKER_KEY))).status_code == 401
        other = send(bearer(signed(sub="system:serviceaccount:ml:watch")))
        assert other.status_code == 403
        admitted = send(bearer(signed()))
        assert admitted.status_code == 204 and "this service retrains 'leaf'" in admitted.headers["x-kfloop-ignored"]
        for data in (b"", b"not json", b"[1]", b'{"kind": "drift"}'):  # an alarm must name its model
            unnamed = httpx.post(url + "/", headers=headers | bearer(signed()), content=data, timeout=10)
            assert unnamed.status_code == 400 and "x-kfloop-outcome" not in unnamed.headers, data
        # No Host check in cluster mode: broker-filter calls the Service by its cluster DNS name.
        assert send(bearer(signed()) | {"host": "kfloop-trigger.ml.svc.cluster.local"}).status_code == 204
        status = httpx.get(url + "/status").json()
        assert status["pending"] == [] and status["runs"] == []
    finally:
        process.terminate()
        process.wait(30)
