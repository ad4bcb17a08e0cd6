"""A workload that talks to the SPIFFE Workload API, run by the identity kernel tests.

Usage: wl_client.py SOCKET ACTION...  Prints one JSON line per result.
  x509 [N]      fetch the X509-SVID stream and report the first N responses (default 1)
  jwt AUD       fetch a JWT-SVID for AUD, validate it for AUD, for another audience,
                and a tampered copy
  exec PATH ... after connecting nowhere, exec PATH with the rest as arguments
"""

from __future__ import annotations

import json
import os
import sys

import grpc
from cryptography import x509

from sidecar.api.workload import workload_pb2 as pb
from sidecar.api.workload import workload_pb2_grpc as pb_grpc
from sidecar.identity.x509 import verify_svid

META = (("workload.spiffe.io", "true"),)


def say(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


def certs(der: bytes) -> list[x509.Certificate]:
    out = []
    while der:
        # DER certificates are concatenated: read each by its length header.
        length = der[1]
        if length & 0x80:
            n = length & 0x7F
            length = int.from_bytes(der[2 : 2 + n], "big") + 2 + n
        else:
            length += 2
        cert = x509.load_der_x509_certificate(der[:length])
        out.append(cert)
        der = der[length:]
    return out


def main() -> int:
    sock, action = sys.argv[1], sys.argv[2]
    if action == "exec":
        os.execv(sys.argv[3], sys.argv[3:])
    with grpc.insecure_channel(f"unix:{sock}") as ch:
        stub = pb_grpc.SpiffeWorkloadAPIStub(ch)
        try:
            if action == "x509":
                want = int(sys.argv[3]) if len(sys.argv) > 3 else 1
                for i, resp in enumerate(stub.FetchX509SVID(pb.X509SVIDRequest(), metadata=META)):
                    svid = resp.svids[0]
                    chain = certs(svid.x509_svid)
                    roots = certs(svid.bundle)
                    sid = verify_svid(chain[0], chain[1:], roots)
                    leaf = chain[0]
                    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
                    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
                    sans = leaf.extensions.get_extension_for_class(
                        x509.SubjectAlternativeName
                    ).value.get_values_for_type(x509.UniformResourceIdentifier)
                    say(
                        kind="x509",
                        spiffe_id=svid.spiffe_id,
                        verified_id=str(sid),
                        serial=f"{leaf.serial_number:x}",
                        uri_sans=sans,
                        ca=bc.ca,
                        digital_signature=ku.digital_signature,
                        key_cert_sign=ku.key_cert_sign,
                        ttl=(leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds(),
                    )
                    if i + 1 >= want:
                        break
            elif action == "jwt":
                aud = sys.argv[3]
                token = (
                    stub.FetchJWTSVID(pb.JWTSVIDRequest(audience=[aud]), metadata=META)
                    .svids[0]
                    .svid
                )
                ok = stub.ValidateJWTSVID(
                    pb.ValidateJWTSVIDRequest(audience=aud, svid=token), metadata=META
                )
                results = {"valid_for_own_audience": ok.spiffe_id}
                for name, a, t in (
                    ("other_audience", "someone-else", token),
                    ("tampered", aud, token[:-3] + ("AAA" if token[-3:] != "AAA" else "BBB")),
                ):
                    try:
                        stub.ValidateJWTSVID(
                            pb.ValidateJWTSVIDRequest(audience=a, svid=t), metadata=META
                        )
                        results[name] = "accepted"
                    except grpc.RpcError as exc:
                        results[name] = exc.code().name
                say(kind="jwt", **results)
        except grpc.RpcError as exc:
            say(kind="error", code=exc.code().name, details=exc.details())
    return 0


if __name__ == "__main__":
    sys.exit(main())
