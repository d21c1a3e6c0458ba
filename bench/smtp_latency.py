"""The time a sender waits: one SMTP transaction at a time, MAIL FROM to the final 250.

Throughput (bench/throughput.py) is measured with ten sessions saturating the machine; what an
application such as Odoo feels is the other figure, the wait for each message it hands over. Here
a single client sends one message per connection, one after another, on an otherwise idle
gateway, and times each transaction from the MAIL command to the reply after the end of data —
what Postfix does before that reply (cleanup, the milter's end of message, the policy service's
END-OF-MESSAGE request) is in it; the connection's greeting and EHLO are not, nor the queue
manager's delivery after it.

The message is the one smtp-source sends (From and To headers, a short body), so the gateway
takes the same path as in the throughput runs. Used by throughput.py for every configuration, in
the same run; `transaction_times` is the whole measurement.
"""

from __future__ import annotations

import smtplib
import time

BODY_LINES = 30


def message(sender: str, recipient: str, number: int) -> bytes:
    """A small message in smtp-source's shape: From, To, Message-ID, Subject and a short body."""
    header = (f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: latency {number}\r\n"
              f"Message-ID: <latency-{number}-{time.time_ns()}@bench.example>\r\n\r\n")
    return header.encode() + b"".join(b"La la la la la la la la la la la la la la la la la la la.\r\n"
                                      for _ in range(BODY_LINES))


def transaction_times(port: int, count: int, sender: str, recipient_of: str) -> list[float]:
    """Seconds from MAIL FROM to the final 250 of each of `count` messages, sent one at a time,
    each on a connection of its own (as Odoo's mail server sends them, a message per connection
    when the queue is short). `recipient_of` is a format with `{n}` (the message's number).
    A refused or failed transaction raises: a latency figure for mail that was not accepted would
    hide a broken configuration."""
    times: list[float] = []
    for number in range(count):
        recipient = recipient_of.format(n=number)
        data = message(sender, recipient, number)
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("latency.bench.example")
            start = time.perf_counter()
            client.sendmail(sender, [recipient], data)  # MAIL, RCPT, DATA; raises on any refusal
            times.append(time.perf_counter() - start)
    return times
