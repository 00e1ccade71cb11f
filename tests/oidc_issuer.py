"""A real OIDC issuer for the tests: a discovery document and JWKS served over HTTP on 127.0.0.1, as a
cluster's API server serves them, with real RSA and EC keys to sign ServiceAccount tokens."""

from __future__ import annotations

import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

ISSUER = "https://kubernetes.default.svc.cluster.local"  # differs from the discovery URL, as in a real cluster
DISCOVERY = "/.well-known/openid-configuration"
JWKS = "/openid/v1/jwks"

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
NEXT_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ATTACKER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def public_jwk(private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str) -> dict[str, str]:
    if isinstance(private_key, rsa.RSAPrivateKey):
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
        return {**jwk, "kid": kid, "alg": "RS256", "use": "sig"}
    jwk = jwt.algorithms.ECAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
    return {**jwk, "kid": kid, "alg": "ES256", "use": "sig"}


class Issuer:
    """A real HTTP server playing the cluster's OIDC issuer; ``keys`` is what its JWKS publishes right now."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.keys: list[dict[str, str]] = [public_jwk(RSA_KEY, "rsa-1"), public_jwk(EC_KEY, "ec-1")]
        self.seen: list[tuple[str, str]] = []  # (path, Authorization header) of every request
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                issuer.seen.append((self.path, self.headers.get("authorization", "")))
                if self.path == DISCOVERY:
                    body = {"issuer": ISSUER, "jwks_uri": f"{issuer.url}{JWKS}", "id_token_signing_alg_values_supported": ["RS256"]}
                elif self.path == JWKS:
                    body = {"keys": list(issuer.keys)}
                else:
                    self.send_error(404)
                    return
                raw = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def fetches(self, path: str) -> int:
        return sum(1 for seen_path, _ in self.seen if seen_path == path)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
