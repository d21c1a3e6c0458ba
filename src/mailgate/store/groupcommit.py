"""Outbound rows written by one thread, many messages to a commit (group commit).

Every outgoing message needs its row (and its recipients' digests) before the milter answers
its end: the row id goes into the bounce token, and the row is what a bounce for the message is
matched against. Written by each libmilter thread in a transaction of its own, on a connection of
its own, a row cost a commit (and, in SQLite, the write lock taken in turn by ten threads, and a
page cache that every other connection's commit invalidates): the larger part of a message's cost.

Here one writer thread, on one connection, takes every message waiting when it is free and writes
them in one transaction, with the blacklist read each message needs; each milter thread waits for
the commit of its own batch and only then answers Postfix. So the guarantee is the one a
transaction per message gave: a message Postfix accepted has its committed row before anything
(its bounce included) can happen to it. A crash (the milter process killed) loses only the
batch not yet committed, whose messages have had no answer: Postfix tempfails them and the
client's retry is a new message; a committed batch whose answers were not all sent leaves rows
of messages that were never accepted, as a crash between commit and answer always could. With
SQLite in WAL mode and `synchronous=NORMAL` a commit is a write to the WAL, never a wait on a disk
flush; PostgreSQL's commit waits for its WAL flush once per batch instead of once per message.

A batch that fails is written again message by message, so that one bad row costs only its own
message a temporary failure.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from mailgate.store.interface import OutboundRecord, Store

MAX_BATCH = 64
ANSWER_TIMEOUT = 60.0
"""Seconds a milter thread waits for its batch; past it the message is tempfailed (Postfix's own
milter timeouts are longer, so the answer is ours, with a logged reason)."""


@dataclass
class _Job:
    record: OutboundRecord
    recipients: Sequence[str]
    done: threading.Lock = field(default_factory=threading.Lock)
    row_id: int = 0
    blacklisted: set[str] = field(default_factory=set)
    error: BaseException | None = None


class WriterStopped(RuntimeError):
    """The writer is stopped (or took too long): the message is tempfailed, never accepted unrecorded."""


class OutboundWriter:
    """`record(record, recipients)` from any thread: the committed row id, and which of the
    (normalised) recipients are blacklisted."""

    def __init__(self, store: Store, max_batch: int = MAX_BATCH) -> None:
        self.store = store
        self.max_batch = max_batch
        self.batches = 0          # commits made, for tests and benchmarks
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="outbound-writer", daemon=True)
        self._thread.start()

    def record(self, record: OutboundRecord, recipients: Sequence[str]) -> tuple[int, set[str]]:
        if self._stopped:
            raise WriterStopped("the outbound writer is stopped")
        job = _Job(record, recipients)
        job.done.acquire()
        self._jobs.put(job)
        if not job.done.acquire(timeout=ANSWER_TIMEOUT):
            raise WriterStopped(f"the outbound row was not written within {ANSWER_TIMEOUT:.0f} s")
        if job.error is not None:
            raise job.error
        return job.row_id, job.blacklisted

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued, then end the thread."""
        self._stopped = True
        self._jobs.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._jobs.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                batch.append(job)
            self._write(batch)

    def _write(self, batch: list[_Job]) -> None:
        try:
            with self.store.transaction():
                for job in batch:
                    self._write_one(job)
            self.batches += 1
        except BaseException as exc:  # every waiter must get an answer
            if len(batch) > 1:
                for job in batch:
                    self._write([job])
                return
            batch[0].error = exc
        for job in batch:
            job.done.release()

    def _write_one(self, job: _Job) -> None:
        job.row_id = self.store.record_outbound(job.record)
        job.blacklisted = self.store.blacklisted(list(job.recipients)) if job.recipients else set()
