"""Delivery failure reports that come back to `bounce+TOKEN@...`: who failed, why, and whose fault.

The rows this produces feed Odoo's bounce counter, and five hard bounces in 91 days blacklist an
address, so a wrong "hard" costs a customer. Hence the order of trust:

1. RFC 3464 delivery status notifications (a message/delivery-status part): Postfix, Sendmail,
   Exchange/Office 365, Gmail, Amazon SES and most modern MTAs. Each recipient group says what
   happened (Action) and why (Status, Diagnostic-Code); nothing is guessed.
2. Auto-replies and vacation notices are screened out next, before any heuristic runs: they
   arrive at the same address and flufl.bounce's looser patterns would read them as failures.
3. Reports without a DSN part (kind "flufl"), only when they look like reports (a daemon
   sender, or a report subject and failure wording): flufl.bounce's detectors (Exim, qmail,
   Yahoo, Exchange 5.5, SimpleMatch...), then `bouncetext.RECIPIENT_LINE_RES` for the formats
   flufl does not know (OpenSMTPD, DragonFly, old Sendmail...). Both only name addresses, so the
   status and reason of each are read from the report text around that address.

Permanent or not comes from `phrases.is_permanent`; the reason (`userunknown`, `blocked`...)
from `rules.bounce_reasons.classify`, and hard (the recipient's fault, what the blacklist counts
by default) from the reason; `judge.judged` applies all three to every recipient, read either way.

`parse_bounce` and `find_token` never raise: this runs in Postfix's pipe, where an exception
would bounce the bounce. Input is capped (1 MiB, 998-byte lines) so no pattern meets a
pathological line.
"""

from mailgate.bounceparse.parse import find_token, parse_bounce
from mailgate.bounceparse.report import NOT_A_BOUNCE, BouncedRecipient, BounceReport, report_json

__all__ = ["BouncedRecipient", "BounceReport", "NOT_A_BOUNCE", "find_token", "parse_bounce", "report_json"]
