"""Outbound rows written many messages to a commit (group commit), by the milter's threads in turn.

Every outgoing message needs its row (and its recipients' digests) before the milter answers
its end: the row id goes into the bounce token, and the row is what a bounce for the message is
matched against. Written by each libmilter thread in a transaction of its own, on a connection of
its own, a row cost a commit (and, in SQLite, the write lock taken in turn by ten threads, and a
page cache that every other connection's commit invalidates): the larger part of a message's cost.

Here the messages that end while a batch is being written are written together, in one
transaction, with the blacklist read each message needs, by one of the milter's own threads: the
first to arrive leads, writes what is waiting (its own message among it) and commits; the others
wait for the commit of their batch and only then answer Postfix. A leader writes one batch and,
if more have queued meanwhile, hands the lead to the first of them, so no message waits behind more
than the batch before its own. There is no writer thread: handing each message to a thread of its
own and waiting for that thread to be scheduled cost a sender about a millisecond at the median on
a busy 2-core machine (bench/RESULTS.md, round 4), more than writing the row. The leader writes on
its own thread's connection (the store keeps a few idle ones for the next threads).
So the guarantee is the one a transaction per message gave: a message Postfix accepted has its
committed row before anything (its bounce included) can happen to it. A crash (the milter process
killed) loses only the batch not yet committed, whose messages have had no answer: Postfix
tempfails them and the client's retry is a new message; a committed batch whose answers were not
all sent leaves rows of messages that were never accepted, as a crash between commit and answer
always could. With SQLite in WAL mode and `synchronous=NORMAL` a commit is a write to the WAL,
never a wait on a disk flush; PostgreSQL's commit waits for its WAL flush once per batch instead of
once per message.

A batch that fails is written again message by message, so that one bad row costs only its own
message a temporary failure.
"""

from __future__ import annotations

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
    done: threading.Lock = field(default_factory=threading.Lock)  # held until written, or handed the lead
    leads: bool = False
    row_id: int = 0
    blacklisted: set[str] = field(default_factory=set)
    error: BaseException | None = None
    written: bool = False


class WriterStopped(RuntimeError):
    """The writer is stopped (or took too long): the message is tempfailed, never accepted unrecorded."""


class OutboundWriter:
    """`record(record, recipients)` from any thread: the committed row id, and which of the
    (normalised) recipients are blacklisted."""

    def __init__(self, store: Store, max_batch: int = MAX_BATCH) -> None:
        self.store = store
        self.max_batch = max_batch
        self.batches = 0          # commits made, for tests and benchmarks
        self._lock = threading.Lock()
        self._waiting: list[_Job] = []
        self._leader = False      # a thread is writing a batch
        self._stopped = False

    def record(self, record: OutboundRecord, recipients: Sequence[str]) -> tuple[int, set[str]]:
        if self._stopped:
            raise WriterStopped("the outbound writer is stopped")
        job = _Job(record, recipients)
        job.done.acquire()
        with self._lock:
            self._waiting.append(job)
            job.leads = not self._leader
            self._leader = True
        while not job.written:
            if job.leads:
                self._lead()
            elif not job.done.acquire(timeout=ANSWER_TIMEOUT) and self._withdraw(job):
                raise WriterStopped(f"the outbound row was not written within {ANSWER_TIMEOUT:.0f} s")
        if job.error is not None:
            raise job.error
        return job.row_id, job.blacklisted

    def stop(self) -> None:
        """Refuse new messages; those already waiting are written by their leader."""
        self._stopped = True

    def _withdraw(self, job: _Job) -> bool:
        """Take a message that waited too long out of the queue, unless it is being written or
        was just handed the lead (then it stays, and waits or leads)."""
        with self._lock:
            queued = job in self._waiting and not job.leads
            if queued:
                self._waiting.remove(job)
        return queued

    def _lead(self) -> None:
        """Write the waiting messages (the leader's own among them), then hand the lead on."""
        with self._lock:
            batch, self._waiting = self._waiting[:self.max_batch], self._waiting[self.max_batch:]
        self._write(batch)
        for job in batch:
            job.leads = False
            job.written = True
            job.done.release()
        with self._lock:
            successor = self._waiting[0] if self._waiting else None
            self._leader = successor is not None
            if successor is not None:
                successor.leads = True
                successor.done.release()

    def _write(self, batch: list[_Job]) -> None:
        """One transaction for the batch; should it fail, each message alone, so that every
        waiter gets its own outcome."""
        try:
            with self.store.transaction():
                for job in batch:
                    self._write_one(job)
            self.batches += 1
        except BaseException as exc:
            if len(batch) > 1:
                for job in batch:
                    self._write([job])
                return
            batch[0].error = exc

    def _write_one(self, job: _Job) -> None:
        job.row_id = self.store.record_outbound(job.record)
        job.blacklisted = self.store.blacklisted(list(job.recipients)) if job.recipients else set()
