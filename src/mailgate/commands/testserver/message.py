"""The real test message sent when the operator asks for one (`--send-to`)."""

from __future__ import annotations

from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from mailgate.config import Server


def test_message(server: Server, sender: str, recipient: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = recipient
    message["Subject"] = f"mailgate test message through server {server.name}"
    message["Date"] = formatdate(localtime=True)
    message["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2])
    message.set_content(f"This message was sent by `mailgate test-server {server.name}` through "
                        f"{server.host}:{server.port}.\nIf it arrived, the server works.\n")
    return message
