"""A tiny authoritative DNS server on 127.0.0.1 for the check-dns tests.

The DNS checks must run real dnspython queries (no mocks), and the test box has no Internet, so
each test starts this server with its own in-memory zone: a dict of name → {type: [values]}.
It answers A, AAAA, MX, TXT and CNAME (following a CNAME inside the zone), NODATA for a name
that exists without the type (including empty non-terminals such as `_domainkey.example.test`),
and NXDOMAIN otherwise, over UDP (truncating to the client's size, so big answers retry over TCP)
and TCP on the same port.
"""

from __future__ import annotations

import socketserver
import struct
import threading
from collections.abc import Iterable, Mapping

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.rrset
from dns.rdtypes.ANY.TXT import TXT

Zone = Mapping[str, Mapping[str, Iterable[str]]]


def _key(name: str | dns.name.Name) -> str:
    return str(name).lower().rstrip(".") + "."


def _rdata(rdtype: str, value: str) -> dns.rdata.Rdata:
    """TXT values are plain text, split into 255-byte strings as a zone file would hold them."""
    if rdtype == "TXT":
        data = value.encode()
        chunks = tuple(data[i:i + 255] for i in range(0, len(data), 255)) or (b"",)
        return TXT(dns.rdataclass.IN, dns.rdatatype.TXT, chunks)
    return dns.rdata.from_text(dns.rdataclass.IN, rdtype, value)


class DnsServer:
    """Serve `zone` on 127.0.0.1 (UDP and TCP, one free port) until `stop()`."""

    def __init__(self, zone: Zone, ttl: int = 60) -> None:
        self.ttl = ttl
        self.records: dict[tuple[str, str], list[dns.rdata.Rdata]] = {}
        for name, types in zone.items():
            for rdtype, values in types.items():
                self.records[(_key(name), rdtype.upper())] = [_rdata(rdtype.upper(), v) for v in values]
        self.names = {name for name, _ in self.records}
        self.queries: list[tuple[str, str]] = []
        self._servers: list[socketserver.BaseServer] = []

    def _exists(self, name: str) -> bool:
        return name in self.names or any(n.endswith("." + name) for n in self.names)

    def answer(self, wire: bytes, max_size: int) -> bytes:
        query = dns.message.from_wire(wire)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        qname, qtype = question.name, dns.rdatatype.to_text(question.rdtype)
        self.queries.append((_key(qname), qtype))
        name = _key(qname)
        for _ in range(8):
            cname = self.records.get((name, "CNAME"))
            if qtype == "CNAME" or not cname:
                break
            response.answer.append(dns.rrset.from_rdata(name, self.ttl, *cname))
            name = _key(cname[0].target)
        rdatas = self.records.get((name, qtype))
        if rdatas:
            response.answer.append(dns.rrset.from_rdata(name, self.ttl, *rdatas))
        elif not response.answer and not self._exists(name):
            response.set_rcode(dns.rcode.NXDOMAIN)
        try:
            return response.to_wire(max_size=max_size)
        except dns.exception.TooBig:
            response.answer.clear()
            response.flags |= dns.flags.TC
            return response.to_wire()

    def start(self) -> DnsServer:
        """Bind UDP on a free port, then TCP on the same one (retrying if TCP's is taken)."""
        owner = self

        class Udp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                query = dns.message.from_wire(data)
                size = max(512, query.payload) if query.edns >= 0 else 512
                sock.sendto(owner.answer(data, size), self.client_address)

        class Tcp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                stream = self.request.makefile("rb")
                while header := stream.read(2):
                    data = stream.read(struct.unpack("!H", header)[0])
                    reply = owner.answer(data, 65535)
                    self.request.sendall(struct.pack("!H", len(reply)) + reply)

        for _ in range(20):
            udp = socketserver.ThreadingUDPServer(("127.0.0.1", 0), Udp)
            try:
                tcp = socketserver.ThreadingTCPServer(("127.0.0.1", udp.server_address[1]), Tcp)
            except OSError:
                udp.server_close()
                continue
            break
        else:
            raise RuntimeError("no free port for both UDP and TCP")
        for server in (udp, tcp):
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
            self._servers.append(server)
        return self

    @property
    def port(self) -> int:
        return self._servers[0].server_address[1]

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()

    def resolver(self, timeout: float = 2.0) -> dns.resolver.Resolver:
        """A resolver that asks only this server: what the checks get instead of the system's."""
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = self.port
        resolver.lifetime = timeout
        resolver.timeout = timeout
        return resolver

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

