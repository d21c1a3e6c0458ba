"""docs/rules.md T1, I2.1, I5, I6, I7: Odoo's own pre-token bounce address.

Odoo 16 and older put `<bounce_alias>+<mail.mail id>-<model>-<res_id>@<alias domain>` (or
`<bounce_alias>+<mail.mail id>@…`) in the mail they sent themselves; reports on mail sent before
the cut-over to mailgate come back to it. It is Odoo's, neither our token nor a forgery: accepted
at RCPT, routed as a bounce to Odoo's pipe as addressed, and never tied to a message row of ours.
"""

from __future__ import annotations

import pytest

from mailgate.configfile import parse_config
from mailgate.rules.classify import bounce_token_of, is_odoo_own_bounce, recipient_verdict, takes_inbound_role
from mailgate.rules.delivery import delivery_transport
from mailgate.rules.inbound import decide_inbound
from mailgate.rules.message import InboundMessage
from mailgate.rules.tokens import TokenSigner

CONFIG = parse_config("alias_domain: mycompany.com\n", check_files=False).config
SIGNER = TokenSigner(b"s" * 32, "a" * 32)
OURS = SIGNER.make(7, "trans", 1.8e9)

ODOO_OWN = ["bounce+991-mail.mail-17@mycompany.com", "bounce+991@mycompany.com",
            "Bounce+37-res.partner-9@MyCompany.com", "bounce+12-mail.test_simple-0@mycompany.com"]
NOT_ODOO_OWN = ["bounce+aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa@mycompany.com", "bounce+991-mail.mail@mycompany.com",
                "bounce+x991-mail.mail-17@mycompany.com", "bounce+991-mail.mail-17x@mycompany.com",
                "bounce+1234567890123456789@mycompany.com", "bounce+991-mail mail-17@mycompany.com",
                "bounce+991-mail.mail-17@other.example", "catchall+991-mail.mail-17@mycompany.com"]


@pytest.mark.parametrize("address", ODOO_OWN)
def test_odoos_own_form_is_odoos_not_a_token(address):
    assert is_odoo_own_bounce(CONFIG, address) and bounce_token_of(CONFIG, address) is None


@pytest.mark.parametrize("address", NOT_ODOO_OWN)
def test_other_suffixes_are_not_odoos_form(address):
    assert not is_odoo_own_bounce(CONFIG, address)


def test_our_token_is_never_taken_for_odoos_form():
    assert bounce_token_of(CONFIG, f"bounce+{OURS}@mycompany.com") == OURS
    assert not is_odoo_own_bounce(CONFIG, f"bounce+{OURS}@mycompany.com")


@pytest.mark.parametrize("address", ODOO_OWN)
def test_the_policy_service_accepts_odoos_own_form(address):
    """I6: accepted at RCPT (it was refused as a forged token); a forged token still is refused."""
    assert recipient_verdict(CONFIG, address, lambda token: False) == "accept"
    assert recipient_verdict(CONFIG, "bounce+aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa@mycompany.com",
                             lambda token: False) == "forged_bounce"


@pytest.mark.parametrize("address", ODOO_OWN)
def test_odoos_own_form_is_delivered_to_odoos_bounce_pipe(address):
    """I5: delivered through the pipe as a bounce, so Odoo reads its own address."""
    assert delivery_transport(CONFIG, address) == "mailgate-odoo:bounce"


def decide(rcpts: tuple[str, ...], to: str):
    message = InboundMessage((("From", "MAILER-DAEMON@remote.example"), ("To", to)), rcpts)
    return decide_inbound(CONFIG, message, known_outbound=lambda ids: None, already_received=lambda m: False,
                          recent_count=lambda s, k: 0, verify_token=SIGNER.verify)


@pytest.mark.parametrize("address", ODOO_OWN)
def test_a_report_to_odoos_own_form_is_a_bounce_without_a_token(address):
    """I2.1: a bounce, delivered; no token travels with it (it names no message row of ours)."""
    decision = decide((address,), address)
    assert decision.action == "deliver" and decision.labels == ["bounce"] and decision.bounce_token is None


def test_a_forged_token_beside_odoos_form_is_still_refused():
    forged = "bounce+aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa@mycompany.com"
    decision = decide(("bounce+991-mail.mail-17@mycompany.com",), forged)
    assert decision.action == "reject" and str(decision.reply).startswith("550 5.7.1 ")


def test_postfix_own_report_to_odoos_form_takes_the_inbound_role():
    """I7: Postfix's own report (null sender) on mail that carried Odoo's own address."""
    assert takes_inbound_role(CONFIG, "ORIGINATING", "", ["bounce+991-mail.mail-17@mycompany.com"])
