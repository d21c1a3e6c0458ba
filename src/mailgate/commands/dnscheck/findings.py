"""What a check concludes: a `Finding`, and the wording of every kind in the `TEXT` table."""

from __future__ import annotations

from dataclasses import dataclass

# key -> (message, fix); both formatted with the finding's values.
TEXT: dict[str, tuple[str, str | None]] = {
    "dns-error": ("could not look up {name}: {error}", "check this host's DNS resolver, then run again"),
    "spf-missing": ("no SPF record on {domain}: receivers cannot tell which servers may send for it",
                    'publish {domain}. TXT "{proposal}"'),
    "spf-several": ("{count} SPF records on {domain}: receivers answer permerror and ignore all of them",
                    'merge them into one: {domain}. TXT "{proposal}"'),
    "spf-syntax": ("the SPF record of {domain} does not parse ({error}): receivers answer permerror",
                   "correct the record: terms are [+-~?]mechanism[:domain][/cidr] or name=value"),
    "spf-record": ("SPF record of {domain}: {record} ({lookups} of 10 DNS lookups)", None),
    "spf-lookups": ("SPF needs {lookups} DNS lookups, over the limit of 10 (RFC 7208 §4.6.4): "
                    "receivers answer permerror",
                    "replace includes by the ip4:/ip6: ranges they hold, or drop includes no server uses"),
    "spf-include-broken": ("{term} in the SPF tree cannot be used: {reason}; receivers answer permerror",
                           "remove {term}, or have {target} publish one valid SPF record"),
    "spf-all-pass": ("SPF ends in {term}: every host on the Internet may send as {domain}",
                     "end the record with ~all (or -all)"),
    "spf-all-neutral": ("SPF ends in {term}: unlisted hosts are neutral, so forgeries are not rejected",
                        "end the record with ~all (or -all)"),
    "spf-no-all": ("SPF has no final all: unlisted hosts are neutral", "end the record with ~all (or -all)"),
    "spf-covered": ("server '{server}' ({host}: {ips}) is authorised by SPF", None),
    "spf-uncovered": ("server '{server}' ({host}) is not authorised by SPF: {results}",
                      'add {terms}: {domain}. TXT "{proposal}"'),
    "spf-unknown": ("server '{server}' ({host}): SPF could not be evaluated for {results}",
                    "the record uses ptr, exists or macros, which are not evaluated here: send a test "
                    "message to a mailbox that shows Authentication-Results"),
    "spf-private": ("server '{server}' ({host}) has the private address {ips}: the public address it "
                    "sends from is not known here", "make sure SPF authorises the relay's public address"),
    "spf-unresolved": ("server '{server}': {host} has no A or AAAA record", "correct the server's host"),
    "spf-provider": ("server '{server}' ({host}) is {provider}: include:{include} is in the SPF record",
                     None),
    "spf-provider-missing": ("server '{server}' ({host}) is {provider}, whose documented SPF include "
                             "include:{include} is missing", 'add it: {domain}. TXT "{proposal}"'),
    "spf-provider-unevaluated": ("server '{server}' is {provider}: include:{include} is in the record "
                                 "but could not be evaluated ({reason})",
                                 "check {provider}'s SPF documentation for the current include"),
    "spf-no-server": ("no active server sends for {domain}: its mail leaves through Postfix's default "
                      "route", "make sure SPF authorises this host's public address"),
    "dmarc-missing": ("no DMARC record at _dmarc.{domain}: receivers apply their own policy and send "
                      "no reports", 'publish _dmarc.{domain}. TXT "{proposal}" (rua: a mailbox you read)'),
    "dmarc-several": ("{count} DMARC records at _dmarc.{where}: receivers ignore all of them",
                      "keep exactly one v=DMARC1 record"),
    "dmarc-invalid": ("the DMARC record at _dmarc.{where} has no valid policy (p={policy}): {record}",
                      'publish _dmarc.{where}. TXT "{proposal}"'),
    "dmarc-none": ("DMARC policy p=none at _dmarc.{where}: monitoring only, forged mail is delivered",
                   'once the reports show your mail passes, publish _dmarc.{where}. TXT "{proposal}"'),
    "dmarc-ok": ("DMARC policy p={policy}{pct} at _dmarc.{where}", None),
    "dkim-no-selector": ("no DKIM selector given: DKIM was not checked",
                         "pass the selector(s) your signer or upstream provider uses (--selector S)"),
    "dkim-ok": ("DKIM selector {selector}: key published at {name} ({key})", None),
    "dkim-weak": ("DKIM selector {selector}: {key} at {name}: receivers ignore RSA keys under 1024 bits",
                  "publish a 2048-bit RSA key and sign with it"),
    "dkim-missing": ("DKIM selector {selector}: no key at {name}: signatures with it fail",
                     'publish {name}. TXT "v=DKIM1; k=rsa; p=<public key>" from your DKIM signer'),
    "dkim-revoked": ("DKIM selector {selector}: the key at {name} is revoked (empty p=)",
                     "publish the current public key, or sign with another selector"),
    "dkim-invalid": ("DKIM selector {selector}: the record at {name} is not a DKIM key: {record}",
                     'publish {name}. TXT "v=DKIM1; k=rsa; p=<public key>"'),
    "mx-missing": ("no MX for {domain}: replies to the aliases fall back to its A record or bounce",
                   "publish {domain}. MX 10 {here}."),
    "mx-null": ("{domain} publishes a null MX (0 .): it accepts no mail, so replies bounce",
                "replace it: {domain}. MX 10 {here}."),
    "mx-listed": ("MX of {domain}: {mx}", None),
    "mx-here": ("MX of {domain}: {mx}; the preferred one points at this host", None),
    "mx-backup": ("MX of {domain}: {mx}; only a backup MX points at this host",
                  "give this host the lowest preference: {domain}. MX 10 {here}."),
    "mx-elsewhere": ("MX of {domain}: {mx}; none points at this host ({names})",
                     "publish {domain}. MX 10 {here}. (or relay the aliases' mail from those hosts here)"),
}


@dataclass(frozen=True)
class Finding:
    """One verdict; `fix` is the record to publish or the change to make, when there is one."""

    check: str
    level: str
    message: str
    fix: str | None = None
    domain: str = ""          # the alias domain checked


def finding(check: str, level: str, text: str, /, **values: object) -> Finding:
    message, fix = TEXT[text]
    return Finding(check, level, message.format(**values), fix.format(**values) if fix else None)
