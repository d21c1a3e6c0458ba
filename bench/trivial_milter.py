"""A trivial pymilter milter for reference: `Milter.Base` with every default callback (only end
of message is negotiated; it answers CONTINUE), on the socket given as the first argument.

    trivial_milter.py unix:/path | inet:PORT@127.0.0.1 [--nodelay] [--data-reply] [--like-mailgate]

`--like-mailgate` negotiates what mailgate's milter negotiates (connect, MAIL, RCPT, every header
and the body, all without a reply; end of message changing the envelope sender) and does nothing
with it: the floor of any pymilter milter that reads the headers, to set mailgate's own CPU
per message against (bench/RESULTS.md).

`--nodelay` sets TCP_NODELAY on libmilter's listening socket (Linux copies it to every accepted
connection): the experiment behind the "inet: stall" finding in bench/RESULTS.md.
"""

from __future__ import annotations

import os
import sys

import Milter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _nodelay import set_nodelay_on_listeners  # noqa: E402


class Trivial(Milter.Base):
    """Accepts everything; pymilter's defaults decide what is negotiated."""


class TrivialDataReply(Milter.Base):
    """The same, but the DATA event is negotiated and answered (see bench/inet_stall.py)."""

    def data(self):
        return Milter.CONTINUE


class TrivialLikeMailgate(Milter.Base):
    """mailgate's callbacks and reply flags, with none of its work."""

    @Milter.noreply
    def connect(self, hostname, family, hostaddr):
        self.headers = []
        return Milter.CONTINUE

    @Milter.noreply
    def envfrom(self, sender, *params):
        self.headers = []
        return Milter.CONTINUE

    @Milter.noreply
    def envrcpt(self, recipient, *params):
        return Milter.CONTINUE

    @Milter.noreply
    def header(self, name, value):
        self.headers.append((name, value))
        return Milter.CONTINUE

    @Milter.noreply
    def body(self, chunk):
        return Milter.CONTINUE

    def eom(self):
        self.chgfrom("<bounce+trivial@mycompany.com>")
        return Milter.CONTINUE


def main() -> None:
    spec = sys.argv[1]
    nodelay = "--nodelay" in sys.argv[2:]
    Milter.factory = TrivialDataReply if "--data-reply" in sys.argv[2:] else Trivial
    if "--like-mailgate" in sys.argv[2:]:
        Milter.factory = TrivialLikeMailgate
        Milter.set_flags(Milter.CHGFROM)
    milter = Milter.milter
    # What Milter.runmilter does, with the socket opened explicitly so that it can be tuned.
    milter.set_connect_callback(Milter.connect_callback)
    milter.set_helo_callback(lambda ctx, host: ctx.getpriv().hello(host))
    milter.set_envfrom_callback(lambda ctx, *b: ctx.getpriv().envfrom_bytes(*b))
    milter.set_envrcpt_callback(lambda ctx, *b: ctx.getpriv().envrcpt_bytes(*b))
    milter.set_header_callback(lambda ctx, f, v: ctx.getpriv().header_bytes(f, v))
    milter.set_eoh_callback(lambda ctx: ctx.getpriv().eoh())
    milter.set_body_callback(lambda ctx, chunk: ctx.getpriv().body(chunk))
    milter.set_eom_callback(lambda ctx: ctx.getpriv().eom())
    milter.set_abort_callback(lambda ctx: ctx.getpriv().abort())
    milter.set_close_callback(Milter.close_callback)
    milter.setconn(spec)
    milter.settimeout(600)
    milter.register("trivial", data=lambda ctx: ctx.getpriv().data(),
                    unknown=lambda ctx, cmd: ctx.getpriv().unknown(cmd),
                    negotiate=Milter.negotiate_callback)
    old = os.umask(0)  # user postfix must be able to connect to a unix socket
    try:
        milter.opensocket(True)
    finally:
        os.umask(old)
    if nodelay:
        set_nodelay_on_listeners()
    milter.main()


if __name__ == "__main__":
    main()
