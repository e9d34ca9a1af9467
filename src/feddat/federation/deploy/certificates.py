"""The TLS material of a deployment: a certificate authority and the SuperLink's certificate it signs, and the
SuperNodes' key pairs for Flower's node authentication.

`cryptography` is imported inside the functions that make the files: `feddat`'s command-line parser imports the
deployment for its options, and needs none of it."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class TLSFiles:
    ca: Path         # the CA certificate: SuperNodes and flwr (--root-certificates) trust it
    cert: Path       # the SuperLink's certificate, signed by the CA
    key: Path        # the SuperLink's private key


def write_tls_files(directory: Path, hosts: tuple[str, ...] = ("localhost", LOOPBACK), days: int = 30) -> TLSFiles:
    """A new CA and a SuperLink certificate it signs, valid for `hosts` (names or IP addresses)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def usage(ca: bool) -> x509.KeyUsage:
        return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                             data_encipherment=False, key_agreement=not ca, key_cert_sign=ca, crl_sign=ca,
                             encipher_only=False, decipher_only=False)

    def sans() -> list[x509.GeneralName]:
        out: list[x509.GeneralName] = []
        for h in hosts:
            try:
                out.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                out.append(x509.DNSName(h))
        return out

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = name("FedDAT deployment CA")
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(usage(ca=True), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder().subject_name(name(hosts[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    plain = serialization.NoEncryption()
    files = TLSFiles(directory / "ca.pem", directory / "superlink.pem", directory / "superlink.key")
    _write_private(directory / "ca.key", ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, plain))
    files.ca.write_bytes(ca_cert.public_bytes(pem))
    files.cert.write_bytes(cert.public_bytes(pem))
    _write_private(files.key, key.private_bytes(pem, serialization.PrivateFormat.PKCS8, plain))
    return files


def write_node_key(path: Path) -> Path:
    """A SuperNode's key pair in OpenSSH format (EC P-384, what Flower's node authentication takes): the private
    key at `path` (mode 600), the public one at `path`.pub, which is returned."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()))
    public = path.with_name(path.name + ".pub")
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + b"\n")
    return public


def _write_private(path: Path, data: bytes) -> None:
    path.touch(mode=0o600, exist_ok=True)
    os.chmod(path, 0o600)
    path.write_bytes(data)
