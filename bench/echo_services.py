"""The harness's own ceiling: trivial asyncio servers speaking the two wire protocols.

    echo_services.py SOCKETMAP_PATH POLICY_PATH

The socketmap server answers every netstring request `<map> <key>` with `OK <key>`; the policy
server answers every request (lines up to an empty line) with `action=DUNNO`. Plain
`asyncio.Protocol`s, no validation, no lookup: what any Python asyncio server pays per request.
"""

from __future__ import annotations

import asyncio
import os
import sys


class SocketmapEcho(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.buf = b""

    def data_received(self, data):
        buf = self.buf + data
        out = []
        while True:
            colon = buf.find(b":")
            if colon < 0:
                break
            size = int(buf[:colon])
            end = colon + 1 + size
            if len(buf) <= end:
                break
            key = buf[colon + 1:end].partition(b" ")[2]
            reply = b"OK " + key
            out.append(b"%d:%s," % (len(reply), reply))
            buf = buf[end + 1:]
        self.buf = buf
        if out:
            self.transport.write(b"".join(out))


class PolicyEcho(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.buf = b""

    def data_received(self, data):
        buf = self.buf + data
        count = buf.count(b"\n\n")
        if count:
            buf = buf[buf.rfind(b"\n\n") + 2:]
            self.transport.write(b"action=DUNNO\n\n" * count)
        self.buf = buf


async def main(socketmap: str, policy: str) -> None:
    loop = asyncio.get_running_loop()
    old = os.umask(0)
    try:
        await loop.create_unix_server(SocketmapEcho, socketmap)
        await loop.create_unix_server(PolicyEcho, policy)
    finally:
        os.umask(old)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
