"""One failed or delayed recipient, judged: permanent or not, the reason, the recipient's fault
or not. Both reading paths (DSN groups and free text) end here, so that a recipient read either
way is judged by the same rules (docs/rules.md B4, B5)."""

from __future__ import annotations

from mailgate.bounceparse import phrases as bt
from mailgate.bounceparse.mime import clean
from mailgate.bounceparse.report import BouncedRecipient
from mailgate.rules.bounce_reasons import classify, smtp_command
from mailgate.rules.reason_vocabulary import UNDECIDED, is_hard


def judged(address: str, status: str | None, action: str | None, diagnostic: str | None,
           remote_mta: str | None, *, context: str | None = None, transcript: str | None = None,
           program: bool = False) -> BouncedRecipient:
    """`context`: report wording outside the recipient's own lines (the introduction of a
    free-text report), read for permanence and the reason only when the recipient's lines say
    nothing;
    `transcript`: the report's human-readable lines about the recipient, where the SMTP command
    it failed at is often told when the diagnostic does not say; `program`: the diagnostic is a
    local delivery program's (DSN type `x-unix`: procmail, a pipe's exit status), whose failure
    is a mailer error unless its words say the mailbox is full."""
    code = bt.find_smtp_code(diagnostic)
    permanent = bt.is_permanent(status, diagnostic, smtp_code=code)
    if permanent is None and context:
        permanent = bt.is_permanent(None, context)
    command = smtp_command(diagnostic) or smtp_command(transcript)
    remote = bt.find_status(diagnostic)
    # The remote server's own code, where the reporting MTA wrote another of the same class.
    said = remote if remote and status and remote[0] == status[0] else status
    reason = classify(said, code, command, diagnostic, delayed=action == "delayed")
    if reason in UNDECIDED and context:
        from_context = classify(said, code, command, context, delayed=action == "delayed")
        reason = reason if from_context in UNDECIDED else from_context
    if program and reason != "mailboxfull":
        reason = "mailererror"
    return BouncedRecipient(address, permanent, status, action, clean(diagnostic), clean(remote_mta),
                            reason, is_hard(reason, permanent))
