"""Two companies with an alias domain each, in a real Odoo (docs/rules.md O1, I2): each company's
notification leaves with its own domain, and each company's alias creates its own records.

Odoo 17+ keeps one `mail.alias.domain` per company; a record's mail takes its company's domain,
whose bounce address Odoo puts in MAIL FROM. mailgate has both domains (`alias_domains`): the
Brand company's notification from the administrator (admin@example.com, which no upstream may
send for) is encapsulated into brand.example's notification address and leaves with a token on
brand.example's bounce address; My Company's into mycompany.com's, as before. The same alias
name on both domains reaches each company's own alias. Runs last among the Odoo modules (the
second company stays in the session's database).
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator

import pytest

from mailgate.lab.gateway import LabGateway
from mailgate.lab.odoo import LabOdoo, ensure_alias, hand_mail_to_gateway
from mailgate.lab.postfix import make_basedir
from mailgate.rules.tokens import split_tokenised
from test_e2e_odoo import OdooGateway, inbound, odoo_message, received_by, tag, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.odoo]

MAIN, BRAND = "mycompany.com", "brand.example"
ALIAS, MODEL = "partners", "res.partner"
ALIAS_DOMAINS = f"alias_domains:\n  - name: {MAIN}\n  - name: {BRAND}\n"


@pytest.fixture(scope="module")
def companies(odoo: LabOdoo) -> Iterator[tuple[OdooGateway, int, int]]:
    """(the gateway wired to Odoo, My Company's id, Brand Ltd's id)."""
    base = make_basedir()
    gateway = LabGateway(base, odoo=odoo, alias_domains=ALIAS_DOMAINS,
                         aliases={ALIAS: f"odoo:{MODEL}", f"{ALIAS}@{BRAND}": f"odoo:{MODEL}"})
    try:
        gateway.start()
        assert gateway.pf is not None
        rpc = odoo.rpc()
        port = gateway.pf.port("submission")
        for domain in (MAIN, BRAND):
            hand_mail_to_gateway(rpc, odoo.source.major, host="127.0.0.1", port=port, alias_domain=domain)
            ensure_alias(rpc, ALIAS, MODEL, domain)
        [brand_domain] = rpc.call("mail.alias.domain", "search", [("name", "=", BRAND)])
        main_company = rpc.record_id("base.main_company")
        found = rpc.call("res.company", "search", [("name", "=", "Brand Ltd")])
        brand = int(found[0]) if found else int(rpc.call("res.company", "create", {"name": "Brand Ltd"}))
        rpc.call("res.company", "write", [brand], {"alias_domain_id": brand_domain})
        rpc.call("res.users", "write", [rpc.uid], {"company_ids": [(4, brand)]})
        yield OdooGateway(gateway, odoo, rpc), main_company, brand
    finally:
        gateway.stop()
    shutil.rmtree(base, ignore_errors=True)


def notify(lab: OdooGateway, company: int, companies: list[int], customer: str) -> None:
    """The administrator's chatter message on a contact of `company`, notifying `customer`."""
    context = {"allowed_company_ids": [company, *[c for c in companies if c != company]]}
    rpc = lab.rpc
    record = rpc.call("res.partner", "create", {"name": f"Record {tag()}", "company_id": company}, context=context)
    recipient = rpc.call("res.partner", "create", {"name": "Customer", "email": customer, "company_id": company},
                         context=context)
    rpc.call("res.partner", "message_post", [record], body=f"<p>Hello {tag()}</p>", message_type="comment",
             subtype_xmlid="mail.mt_comment", partner_ids=[recipient], context=context)


@pytest.mark.parametrize("which, domain, sink", [("main", MAIN, "transactional"), ("brand", BRAND, "mass")])
def test_each_companys_notification_leaves_with_its_own_domain(companies, which, domain, sink):
    lab, main, brand = companies
    customer = f"c{uuid.uuid4().hex[:8]}@customer.example"
    notify(lab, main if which == "main" else brand, [main, brand], customer)
    got_sink, got = received_by(lab, customer)
    [author] = got.parsed["From"].addresses
    assert author.addr_spec == f"notifications@{domain}", got.parsed["From"]
    token, token_domain = split_tokenised(got.mail_from, "bounce")
    assert token_domain == domain and lab.gw.token_signer().verify(token) is not None
    assert got_sink == sink   # brand.example: no server lists it, the filter-less one sends (O3)


def test_each_companys_alias_creates_its_own_records(companies):
    lab, _, _ = companies
    created = {}
    for domain in (MAIN, BRAND):
        who = f"c{tag()}@customer.example"
        data, msgid = inbound(who, f"{ALIAS}@{domain}", f"New contact for {domain} {tag()}")
        lab.gw.submit(data, who, [f"{ALIAS}@{domain}"], listener="inbound")
        message = wait_for(f"{msgid} in Odoo", lambda msgid=msgid: odoo_message(lab, msgid))
        assert message["model"] == MODEL
        created[domain] = message["res_id"]
    assert created[MAIN] != created[BRAND]
