"""A throwaway CA and a server certificate for TLS between Postfix and the lab sinks.

Postfix's smtp client verifies upstream certificates against a CA file (security level
``secure``), so the lab needs a real chain, not a self-signed leaf: a CA that signs a leaf
for ``localhost`` and ``127.0.0.1``. Everything lives one day; nothing is ever reused.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import pwd
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class CertBundle:
    """Paths of the PEM files: the CA to trust, the leaf certificate and its key."""

    ca_cert: Path
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hostnames: Iterable[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def _write(path: Path, data: bytes, mode: int) -> None:
    path.write_bytes(data)
    os.chmod(path, mode)


def _give_to_postfix(path: Path) -> None:
    """Let Postfix daemons (running as user ``postfix``) read the key if it serves it too."""
    try:
        entry = pwd.getpwnam("postfix")
    except KeyError:
        return
    if os.geteuid() == 0:
        os.chown(path, 0, entry.pw_gid)


def make_ca_and_cert(
    directory: Path, hostnames: Iterable[str] = ("localhost", "127.0.0.1")
) -> CertBundle:
    """Create ``ca.pem``, ``cert.pem`` (leaf then CA) and ``key.pem`` in ``directory``.

    The directory is made world-traversable and the certificates world-readable because
    Postfix's smtp client reads the CA file as user ``postfix``; the key is readable by
    group ``postfix`` only, for an smtpd that serves this certificate.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o755)
    hostnames = tuple(hostnames)
    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("mailgate lab CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name(hostnames[0]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(hostnames), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )

    pem = serialization.Encoding.PEM
    bundle = CertBundle(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    _write(bundle.ca_cert, ca_cert.public_bytes(pem), 0o644)
    _write(bundle.cert, leaf.public_bytes(pem) + ca_cert.public_bytes(pem), 0o644)
    _write(
        bundle.key,
        leaf_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        0o640,
    )
    _give_to_postfix(bundle.key)
    return bundle
