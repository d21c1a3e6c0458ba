"""`mailgate check-dns`: do SPF, DKIM, DMARC and MX let the gateway's mail be delivered?

Mail sent through an upstream server is judged by the receiver against the alias domain's DNS:
SPF must authorise every server that sends for it (the envelope sender is `bounce+token@` that
domain), DMARC says what happens when checks fail, DKIM keys must be published, and the MX must
bring replies back to this host. Each problem becomes a `Finding` whose `fix` is the record to
publish or the change to make; the wording lives in the `TEXT` table.

SPF is evaluated the way a receiver does (RFC 7208 `check_host`, first matching term wins) for
each address of each server, through real DNS queries; the 10-lookup limit is counted over the
whole include tree, since a receiver evaluating a non-matching address walks all of it.
"""

from mailgate.commands.dnscheck.checks import check_dns
from mailgate.commands.dnscheck.findings import TEXT, Finding
from mailgate.commands.dnscheck.report import LEVELS, findings_json, render
from mailgate.commands.dnscheck.resolver import IPAddress
from mailgate.commands.dnscheck.spf import (
    DNS_TERMS,
    LOOKUP_LIMIT,
    MECHANISMS,
    QUALIFIER_RESULTS,
    is_spf,
    parse_spf,
)
from mailgate.commands.dnscheck.spf_check import LOCAL_NETWORKS, PROVIDER_INCLUDES

__all__ = [
    "DNS_TERMS", "LEVELS", "LOCAL_NETWORKS", "LOOKUP_LIMIT", "MECHANISMS", "PROVIDER_INCLUDES",
    "QUALIFIER_RESULTS", "TEXT", "Finding", "IPAddress", "check_dns", "findings_json", "is_spf",
    "parse_spf", "render",
]
