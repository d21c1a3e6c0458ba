"""The DMARC, DKIM and MX checks: one lookup per record, judged as a receiver or a replier would."""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Sequence

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key

from mailgate.commands.dnscheck.findings import Finding, finding
from mailgate.commands.dnscheck.resolver import Dns, DnsTrouble, IPAddress


def _tags(record: str) -> dict[str, str]:
    pairs = (part.split("=", 1) for part in record.split(";") if "=" in part)
    return {k.strip().lower(): v.strip() for k, v in pairs}


def check_dmarc(domain: str, dns_: Dns) -> list[Finding]:
    """The domain's record, else its parents' (receivers walk up to the organisational domain)."""
    proposal = f"v=DMARC1; p=quarantine; rua=mailto:dmarc-reports@{domain}"
    labels = domain.split(".")
    for where in (".".join(labels[i:]) for i in range(max(1, len(labels) - 1))):
        records = [t for t in dns_.txt(f"_dmarc.{where}") if re.match(r"v\s*=\s*DMARC1\s*(;|$)", t, re.I)]
        if records:
            break
    else:
        return [finding("dmarc", "FAIL", "dmarc-missing", domain=domain, proposal=proposal)]
    if len(records) > 1:
        return [finding("dmarc", "FAIL", "dmarc-several", count=len(records), where=where)]
    tags = _tags(records[0])
    policy = (tags["sp"] if where != domain and "sp" in tags else tags.get("p", "")).lower()
    if policy not in ("none", "quarantine", "reject"):
        return [finding("dmarc", "FAIL", "dmarc-invalid", where=where, policy=policy,
                        record=records[0], proposal=proposal)]
    if policy == "none":
        better = re.sub(r"(?i)\bp\s*=\s*none", "p=quarantine", records[0], count=1)
        return [finding("dmarc", "WARN", "dmarc-none", where=where, proposal=better)]
    pct = f" on {tags['pct']}% of failing mail" if tags.get("pct", "100") != "100" else ""
    return [finding("dmarc", "OK", "dmarc-ok", policy=policy, pct=pct, where=where)]


def _key_description(key_type: str, data: str) -> tuple[str, bool]:
    """("RSA 2048 bits", weak?) from the p= value; ed25519 and unreadable keys are not judged."""
    try:
        key = load_der_public_key(base64.b64decode(data))
    except (ValueError, UnsupportedAlgorithm):
        return key_type, False
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size} bits", key.key_size < 1024
    return key_type, False


def check_dkim(domain: str, selectors: Sequence[str], dns_: Dns) -> list[Finding]:
    if not selectors:
        return [finding("dkim", "WARN", "dkim-no-selector")]
    findings = []
    for selector in selectors:
        name = f"{selector}._domainkey.{domain}"
        values = {"selector": selector, "name": name}
        records = dns_.txt(name)
        if not records:
            findings.append(finding("dkim", "FAIL", "dkim-missing", **values))
            continue
        tags = _tags(records[0])
        if tags.get("v", "DKIM1").upper() != "DKIM1" or "p" not in tags:
            findings.append(finding("dkim", "FAIL", "dkim-invalid", record=records[0][:80], **values))
        elif not tags["p"]:
            findings.append(finding("dkim", "FAIL", "dkim-revoked", **values))
        else:
            key, weak = _key_description(tags.get("k", "rsa"), re.sub(r"\s", "", tags["p"]))
            findings.append(finding("dkim", "WARN" if weak else "OK",
                                    "dkim-weak" if weak else "dkim-ok", key=key, **values))
    return findings


def check_mx(domain: str, this_host: list[str] | None, dns_: Dns) -> list[Finding]:
    names = [n.lower().rstrip(".") for n in this_host or []]
    here = next((n for n in names if not _is_ip(n)), "<this host's name>")
    records = dns_.mx(domain)
    if not records:
        return [finding("mx", "FAIL", "mx-missing", domain=domain, here=here)]
    if [host for _, host in records] == [""]:
        return [finding("mx", "FAIL", "mx-null", domain=domain, here=here)]
    values = {"domain": domain, "here": here, "mx": ", ".join(f"{p} {h}" for p, h in records)}
    if not names:
        return [finding("mx", "OK", "mx-listed", **values)]
    addresses = {a for n in names for a in _quiet_addresses(dns_, n)}

    def points_here(host: str) -> bool:
        return host in names or bool(addresses & set(_quiet_addresses(dns_, host)))

    best = records[0][0]
    if any(points_here(h) for p, h in records if p == best):
        return [finding("mx", "OK", "mx-here", **values)]
    if any(points_here(h) for _, h in records):
        return [finding("mx", "WARN", "mx-backup", **values)]
    return [finding("mx", "WARN", "mx-elsewhere", names=", ".join(names), **values)]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def _quiet_addresses(dns_: Dns, name: str) -> list[IPAddress]:
    """Addresses for comparing hosts; a name that does not resolve just compares by name."""
    try:
        return dns_.addresses(name)
    except DnsTrouble:
        return []
