"""What a delivery report comes down to: who failed, who is only delayed, and the summary
handed to Odoo."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BouncedRecipient:
    address: str                 # normalised: lower-cased, no angle brackets, no "rfc822;" prefix
    permanent: bool | None       # the failure is permanent (class 5); None: the report did not say
    status: str | None           # enhanced status "5.1.1"
    action: str | None           # "failed" | "delayed" | ... (DSN Action), "failed" for non-DSN
    diagnostic: str | None       # what the report says, one line, capped
    remote_mta: str | None
    reason: str = "undefined"    # the class (rules.reason_vocabulary.Reason): "userunknown", "blocked"...
    hard: bool = False           # the recipient's fault (rules.reason_vocabulary.is_hard)


@dataclass(frozen=True)
class BounceReport:
    is_bounce: bool              # a failure report (delayed-only reports: False); "unnamed": none named
    kind: str                    # "dsn", "ses", "flufl", "unnamed", "delay", "autoreply", "none"
    recipients: tuple[BouncedRecipient, ...]   # failed ones only
    reporting_mta: str | None
    original_message_id: str | None
    delayed: tuple[BouncedRecipient, ...] = ()


NOT_A_BOUNCE = BounceReport(False, "none", (), None, None)


def report_json(report: BounceReport, token: str | None) -> dict:
    """The summary handed to Odoo and the logs: exactly these keys, JSON-serialisable."""
    return {
        "is_bounce": report.is_bounce,
        "recipients": [{"address": r.address, "permanent": r.permanent, "hard": r.hard, "status": r.status,
                        "reason": r.reason, "diagnostic": r.diagnostic} for r in report.recipients],
        "token": token,
    }
