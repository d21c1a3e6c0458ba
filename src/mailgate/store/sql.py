"""Every query of the store, once, for both backends.

The statements are plain SQL with `?` placeholders; a backend supplies the connection handling
(`_execute`), the placeholder style and the few expressions that differ between SQLite and
PostgreSQL (dates, greatest, the id sequences). Nothing here commits on its own: a caller that
needs a count and the row it leads to to be atomic wraps them in `transaction(lock keys...)`.
Rows come back as the typed records of `mailgate.store.interface`, the 0/1 flag columns as bools.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence, Set as AbstractSet
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, fields
from functools import partial
from typing import Any, TypeVar

from mailgate.rules.bounce_reasons import reason_and_hard
from mailgate.rules.quota import recipients_within
from mailgate.store.interface import (
    BlacklistEntry,
    BounceDay,
    BounceFact,
    BounceRecord,
    BounceStats,
    DeliveryCount,
    DeliveryRecord,
    DeliveryTotal,
    DomainBounces,
    InboundRecord,
    KindBounces,
    OutboundRecord,
    QuotaBatch,
    ReasonBounces,
    ReputationAlert,
    SenderSideCount,
    ServerBounces,
    StoredBounce,
    StoredDelivery,
    StoredOutbound,
    TableBatch,
    bounce_ids_of,
)

QUOTA_COUNTERS = ("create table quota_counters (key text not null, stream text not null, minute bigint not null, "
                  "count integer not null, primary key (key, stream, minute))")
# StoredBounce.kind in SQL: hard (the recipient's fault), soft, unknown (neither a status nor words).
BOUNCE_KIND = ("case when hard = 1 then 'hard' when permanent is null and coalesce(reason, 'undefined') "
               "in ('undefined', 'onhold') then 'unknown' else 'soft' end")
PURGE_BATCH = 1000   # rows per purge transaction: the write lock is held for one batch, never a whole purge
# What retention may delete: table -> (its key, its time column). Never the blacklist, nor
# log_positions (where watch-log stands).
PURGEABLE = {"messages": ("id", "created_at"), "inbound_messages": ("id", "created_at"),
             "bounces": ("id", "created_at"), "bounce_resets": ("address", "at"), "deliveries": ("id", "at"),
             "reputation_alerts": ("window_start", "window_start")}
# Every table holding the store's data (not its schema version nor its identity), parents before
# the rows that name them: what `migrate-store` copies, the only tables its methods take by name.
DATA_TABLES = ("messages", "outbound_recipients", "inbound_messages", "inbound_routes", "bounces", "bounce_resets",
               "blacklist", "quota_counters", "deliveries", "log_positions", "purged_counts", "reputation_alerts")
TABLES_WITH_IDS = ("messages", "inbound_messages", "bounces", "blacklist", "deliveries")
COPY_BATCH = 1000    # rows per `table_rows` batch
LOOKUP_BATCH = 500   # values per `in (...)` list: far below either backend's limit on parameters

Record = TypeVar("Record")


def new_store_id() -> str:
    """A store's identity, made once with its schema (random: a re-created store gets another)."""
    return secrets.token_hex(16)


def _columns(record_type: type) -> str:
    """The select list of a stored record: its fields, which are its table's columns."""
    return ", ".join(field.name for field in fields(record_type))


def _row(record: object) -> dict[str, Any]:
    """A record's fields as a column -> value dict, one level deep: `dataclasses.asdict` copies
    every value recursively, a tenth of a message's Python time for fields that are strings."""
    return {field.name: getattr(record, field.name) for field in fields(record)}  # type: ignore[arg-type]


def _flag(value: int | None) -> bool | None:
    """A 0/1 column as a bool (NULL stays None: a row from before the column existed)."""
    return None if value is None else bool(value)


def _stored_outbound(row: dict) -> StoredOutbound:
    return StoredOutbound(**{**row, "mass": _flag(row["mass"]), "tokenised": _flag(row["tokenised"])})


def _stored_bounce(row: dict) -> StoredBounce:
    return StoredBounce(**{**row, "permanent": _flag(row["permanent"]), "stale": bool(row["stale"]),
                           "matched": bool(row["matched"]), "hard": bool(row["hard"])})


def reclassify_bounces(fetch: Callable[[str, list[Any]], Sequence[Sequence[Any]]],
                       write: Callable[[list[tuple[str, int, str | None, int]]], object]) -> None:
    """Schema v9 on either backend: every bounce classified, `CLASSIFY_BATCH` rows at a time
    (a million rows never sit in memory at once). `fetch(sql, params)` reads rows, `write` runs
    `RECLASSIFY` over a batch."""
    last = 0
    while rows := fetch(UNCLASSIFIED, [last, CLASSIFY_BATCH]):
        write(classified_bounces(rows))
        last = rows[-1][0]


def classified_bounces(rows: Sequence[Sequence[Any]]) -> list[tuple[str, int, str | None, int]]:
    """Schema v9: rows (id, status, reason text, permanent) of bounces recorded before reasons
    existed, as the values of `RECLASSIFY` (the text moves to `diagnostic`)."""
    updated: list[tuple[str, int, str | None, int]] = []
    for row_id, status, text, permanent in rows:
        reason, hard = reason_and_hard(status, None if permanent is None else bool(permanent), text)
        updated.append((reason, int(hard), text, row_id))
    return updated


RECLASSIFY = "update bounces set reason = ?, hard = ?, diagnostic = ? where id = ?"
CLASSIFY_BATCH = 5000
UNCLASSIFIED = "select id, status, reason, permanent from bounces where id > ? order by id limit ?"


def _data_table(table: str) -> str:
    """`table`, checked to be one of the store's data tables (it is put into SQL by name)."""
    if table not in DATA_TABLES:
        raise ValueError(f"not a table of the store: {table!r}")
    return table


class SQLStore:
    """The store's queries; subclasses implement `_execute`, `transaction` and the dialect."""

    day_of = "date({}, 'unixepoch')"      # a unix time column as YYYY-MM-DD
    greatest = "max"                       # the larger of two values

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement on the current connection (the transaction's, if one is open);
        return a cursor."""
        raise NotImplementedError

    def transaction(self, *lock_keys: str) -> AbstractContextManager[None]:
        raise NotImplementedError

    def _in_transaction(self) -> bool:
        """Whether this thread is inside `transaction` (a dialect hook)."""
        raise NotImplementedError

    def _execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run one statement once per row, as one batch (a dialect hook)."""
        raise NotImplementedError

    @contextmanager
    def _atomically(self) -> Iterator[None]:
        """The caller's transaction when one is open, else one of its own: several statements
        that must land together, without nesting transactions."""
        if self._in_transaction():
            yield
        else:
            with self.transaction():
                yield

    def close(self) -> None:
        raise NotImplementedError

    def checkpoint(self) -> None:
        """Move the backend's log into its files where the backend leaves that to the caller."""
        raise NotImplementedError

    @property
    def schema_version(self) -> int:
        """The schema version the store stands at (each backend keeps it its own way)."""
        raise NotImplementedError

    _store_id: str | None = None

    def store_id(self) -> str:
        """This store's random identity (made with the schema, never changed): bounce tokens mix
        it in, so that a token of a lost and re-created store, whose row ids start again at 1,
        never matches a message of the new one. Read once, then cached."""
        if self._store_id is None:
            self._store_id = self._scalar("select id from store_identity")
        return self._store_id

    def check_writable(self) -> None:
        """A write that changes nothing, committed: the health check's proof that the store takes
        writes now (its write lock, a page or row written), or the backend's error."""
        with self.transaction("store:health"):
            self._execute("update store_identity set id = id")

    # -- helpers ------------------------------------------------------------------------------------

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict]:
        cursor = self._execute(sql, params)
        names = [c[0] for c in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def _records(self, make: Callable[[dict], Record], sql: str, params: Sequence[Any] = ()) -> list[Record]:
        """The rows of a query as records (`make` builds one from a row's column -> value dict)."""
        return [make(row) for row in self._rows(sql, params)]

    def _record(self, make: Callable[[dict], Record], sql: str, params: Sequence[Any] = ()) -> Record | None:
        records = self._records(make, sql, params)
        return records[0] if records else None

    def _scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        row = self._execute(sql, params).fetchone()
        return row[0] if row else None

    def _insert(self, table: str, row: dict) -> int:
        names = ", ".join(row)
        return self._scalar(f"insert into {table} ({names}) values ({', '.join('?' * len(row))}) returning id",
                            list(row.values()))

    @staticmethod
    def _marks(values: Sequence[Any]) -> str:
        return ",".join("?" * len(values))

    # -- outbound -------------------------------------------------------------------------------------

    def record_outbound(self, record: OutboundRecord) -> int:
        """The message row and its recipients' digests (one batch), in one transaction: the
        caller's when one is open, else its own (one commit, as the row alone took)."""
        row = _row(record)
        digests = list(dict.fromkeys(row.pop("recipient_digests")))
        row.update(mass=int(record.mass), tokenised=int(record.tokenised), direction="outbound",
                   recipient_count=len(digests))
        with self._atomically():
            row_id = self._insert("messages", row)
            if digests:
                self._execute_many("insert into outbound_recipients (message, recipient_digest) values (?, ?)",
                                   [(row_id, digest) for digest in digests])
        return row_id

    def sent_to(self, message: int, recipient_digests: Sequence[str]) -> set[str]:
        """Those of the digests that are recipients of the message (docs/rules.md B1)."""
        digests = list(dict.fromkeys(recipient_digests))
        found: set[str] = set()
        for start in range(0, len(digests), LOOKUP_BATCH):
            chunk = digests[start:start + LOOKUP_BATCH]
            rows = self._execute(f"select recipient_digest from outbound_recipients where message = ? "
                                 f"and recipient_digest in ({self._marks(chunk)})", [message, *chunk]).fetchall()
            found.update(row[0] for row in rows)
        return found

    def outbound_message(self, row_id: int) -> StoredOutbound | None:
        """The outgoing message a bounce token names (by row id)."""
        return self._record(_stored_outbound, f"select {_columns(StoredOutbound)} from messages "
                            "where id = ? and direction = 'outbound'", [row_id])

    def outbound_by_message_id(self, message_id: str) -> StoredOutbound | None:
        """The latest outgoing message with this Message-ID (a report without our token)."""
        return self._record(_stored_outbound, f"select {_columns(StoredOutbound)} from messages "
                            "where message_id = ? and direction = 'outbound' order by id desc limit 1", [message_id])

    def outbound_by_queue_id(self, queue_id: str) -> StoredOutbound | None:
        """The latest outgoing message with this Postfix queue id (a delivery in the log)."""
        return self._record(_stored_outbound, f"select {_columns(StoredOutbound)} from messages "
                            "where queue_id = ? and direction = 'outbound' order by id desc limit 1", [queue_id])

    def known_outbound(self, message_ids: list[str]) -> str | None:
        """The most recently sent of these Message-IDs, as Odoo picks the thread of a reply."""
        if not message_ids:
            return None
        return self._scalar(f"select message_id from messages where direction = 'outbound' and message_id in "
                            f"({self._marks(message_ids)}) order by id desc limit 1", message_ids)

    # -- inbound --------------------------------------------------------------------------------------

    def already_received(self, message_id: str) -> bool:
        """A copy was delivered: accepted by the milter and confirmed queued (rows from before
        schema v7 have no confirmation and count as confirmed)."""
        return self._scalar("select 1 from inbound_messages where message_id = ? and action = 'deliver' "
                            "and coalesce(confirmed, 1) = 1 limit 1", [message_id]) is not None

    def recent_count(self, sender: str, key: str, since: float) -> int:
        return self._scalar("select count(*) from inbound_routes where sender = ? and route_key = ? "
                            "and created_at >= ?", [sender, key, since])

    def record_inbound(self, record: InboundRecord, route_keys: list[str]) -> int:
        row_id = self._insert("inbound_messages", _row(record))
        for key in route_keys:
            self._execute("insert into inbound_routes (message, sender, route_key, created_at) values (?, ?, ?, ?)",
                          [row_id, record.sender, key, record.created_at])
        return row_id

    def confirm_inbound(self, row_id: int) -> None:
        self._execute("update inbound_messages set confirmed = 1 where id = ?", [row_id])

    # -- bounces and the blacklist ------------------------------------------------------------------

    def record_bounce(self, record: BounceRecord) -> int:
        row = asdict(record)
        row.update(stale=int(record.stale), matched=int(record.matched), hard=int(record.hard),
                   permanent=None if record.permanent is None else int(record.permanent))
        return self._insert("bounces", row)

    def bounce_recorded(self, message: int, recipient: str) -> bool:
        """Whether a failure of this message for this recipient is recorded already (B1: once
        per message and recipient, whichever reader learnt it)."""
        return self._scalar("select 1 from bounces where message = ? and recipient = ? limit 1",
                            [message, recipient]) is not None

    def countable_bounces(self, address: str, since: float) -> list[BounceFact]:
        """Bounces that may count: matched, not stale, newer than the window and the last reset."""
        rows = self._execute(
            f"select id, created_at, permanent, reason, hard from bounces where recipient = ? and created_at >= "
            f"{self.greatest}(?, coalesce((select at from bounce_resets where address = ?), 0)) and stale = 0 "
            "and matched = 1 order by created_at", [address, since, address]).fetchall()
        return [BounceFact(r[0], r[1], _flag(r[2]), r[3], bool(r[4])) for r in rows]

    def reset_bounces(self, address: str, at: float) -> None:
        self._execute("insert into bounce_resets (address, at) values (?, ?) "
                      "on conflict (address) do update set at = excluded.at", [address, at])

    def blacklisted(self, addresses: list[str]) -> set[str]:
        if not addresses:
            return set()
        rows = self._execute(f"select distinct address from blacklist where removed_at is null and address in "
                             f"({self._marks(addresses)})", addresses).fetchall()
        return {r[0] for r in rows}

    def blacklist_add(self, address: str, at: float, reason: str, source: str, bounce_ids: list[int]) -> bool:
        if self.blacklisted([address]):
            return False
        self._insert("blacklist", {"address": address, "added_at": at, "reason": reason, "source": source,
                                   "bounce_ids": ",".join(str(i) for i in bounce_ids)})
        return True

    def blacklist_remove(self, address: str, at: float, reason: str, source: str | None = None) -> bool:
        """End the address's active entry; with `source`, only an entry that source made (a
        delivery that succeeds clears the rule's entries, never the operator's)."""
        sql = "update blacklist set removed_at = ?, removed_reason = ? where address = ? and removed_at is null"
        params: list = [at, reason, address]
        if source is not None:
            sql += " and source = ?"
            params.append(source)
        return self._execute(sql, params).rowcount > 0

    def blacklist_entries(self, include_removed: bool = False) -> list[BlacklistEntry]:
        """The active entries (with `include_removed`, the ended ones too), oldest first."""
        where = "" if include_removed else " where removed_at is null"
        return self._records(lambda row: BlacklistEntry(**row),
                             f"select {_columns(BlacklistEntry)} from blacklist{where} order by added_at")

    def blacklist_history(self, address: str) -> list[BlacklistEntry]:
        """Every entry the address ever had, oldest first (`blacklist why`)."""
        return self._records(lambda row: BlacklistEntry(**row), f"select {_columns(BlacklistEntry)} from blacklist "
                             "where address = ? order by added_at", [address])

    def blacklisted_by_rule(self) -> list[BlacklistEntry]:
        """The active entries the blacklist rule made (an operator's are never re-judged)."""
        return [entry for entry in self.blacklist_entries() if entry.source == "rule"]

    def sender_side_counts(self, since: float, reasons: Sequence[str]) -> list[SenderSideCount]:
        """Bounces with one of `reasons` since a time, per server, recipient domain and reason."""
        domain = self.domain_of("recipient")
        return self._records(lambda row: SenderSideCount(**row),
                             f"select coalesce(server, '-') as server, {domain} as domain, reason, count(*) as bounces "
                             f"from bounces where created_at >= ? and reason in ({self._marks(reasons) or 'null'}) "
                             f"group by coalesce(server, '-'), {domain}, reason order by bounces desc, server, domain",
                             [since, *reasons])

    def record_reputation_alert(self, alert: ReputationAlert) -> bool:
        """Write the alert unless one for its window, server and domain exists (then False):
        concurrent gateways log it once between them."""
        return self._execute("insert into reputation_alerts (window_start, server, domain, reason, bounces, at) "
                             "values (?, ?, ?, ?, ?, ?) on conflict do nothing",
                             list(asdict(alert).values())).rowcount > 0

    def reputation_alerts(self, since: float) -> list[ReputationAlert]:
        """The alerts of windows starting at or after `since`, newest first."""
        return self._records(lambda row: ReputationAlert(**row), f"select {_columns(ReputationAlert)} from "
                             "reputation_alerts where window_start >= ? order by window_start desc, bounces desc",
                             [since])

    def take_pending_task(self, name: str) -> bool:
        """True once per task a migration left (`PENDING_REEVALUATION`): the first to ask does it."""
        return self._execute("delete from pending_tasks where name = ?", [name]).rowcount > 0

    def _blacklist_evidence(self) -> set[int]:
        """The bounces some blacklist entry names: `blacklist why` shows them for ever."""
        rows = self._execute("select bounce_ids from blacklist where bounce_ids is not null and bounce_ids <> ''")
        return {bounce_id for row in rows.fetchall() for bounce_id in bounce_ids_of(row[0])}

    def bounce_rows(self, since: float = 0.0, address: str | None = None, ids: list[int] | None = None,
                    limit: int | None = None) -> list[StoredBounce]:
        """Bounces since a time, of one address or with these ids, newest first."""
        clauses: list[str] = ["created_at >= ?"]
        params: list[Any] = [since]
        if address:
            clauses.append("recipient = ?")
            params.append(address)
        if ids is not None:
            clauses.append(f"id in ({self._marks(ids) or 'null'})")
            params += ids
        tail = f" limit {int(limit)}" if limit else ""
        return self._records(_stored_bounce, f"select {_columns(StoredBounce)} from bounces "
                             f"where {' and '.join(clauses)} order by created_at desc{tail}", params)

    def bounce_stats(self, since: float) -> BounceStats:
        """Counts per day, per server, hard/soft and the top recipient domains (SQL aggregates)."""
        day, kind = self.day_of.format("created_at"), BOUNCE_KIND
        return BounceStats(
            per_day=tuple(self._records(lambda row: BounceDay(**row),
                                        f"select {day} as day, count(*) as bounces, "
                                        "coalesce(sum(hard), 0) as hard from bounces "
                                        f"where created_at >= ? group by {day} order by day", [since])),
            per_server=tuple(self._records(lambda row: ServerBounces(**row),
                                           "select coalesce(server, '-') as server, count(*) as bounces from bounces "
                                           "where created_at >= ? group by server order by bounces desc, server",
                                           [since])),
            per_kind=tuple(self._records(lambda row: KindBounces(**row),
                                         f"select {kind} as kind, count(*) as bounces from bounces "
                                         f"where created_at >= ? group by {kind} order by bounces desc", [since])),
            per_reason=tuple(self._records(lambda row: ReasonBounces(**row),
                                           "select coalesce(reason, '-') as reason, count(*) as bounces, "
                                           "coalesce(sum(hard), 0) as hard from bounces where created_at >= ? "
                                           "group by reason order by bounces desc, reason", [since])),
            top_domains=tuple(self._records(lambda row: DomainBounces(**row),
                                            f"select {self.domain_of('recipient')} as domain, count(*) as bounces "
                                            f"from bounces where created_at >= ? "
                                            f"group by {self.domain_of('recipient')} "
                                            "order by bounces desc, domain limit 10", [since])),
        )

    def bounce_kind_totals(self) -> list[KindBounces]:
        """All-time bounces per kind, those purged by retention included (for Prometheus: a
        counter must never go down)."""
        return self._records(lambda row: KindBounces(**row),
                             f"select kind, cast(sum(bounces) as bigint) as bounces from ("
                             f"select {BOUNCE_KIND} as kind, count(*) as bounces from bounces group by {BOUNCE_KIND} "
                             "union all select status, count from purged_counts where family = 'bounces') as totals "
                             "group by kind order by bounces desc, kind")

    def domain_of(self, column: str) -> str:
        """The SQL of an address column's domain (a dialect hook: PostgreSQL has split_part)."""
        return f"substr({column}, instr({column}, '@') + 1)"

    # -- deliveries (from Postfix's log) --------------------------------------------------------------

    def record_delivery(self, record: DeliveryRecord) -> int:
        return self._insert("deliveries", asdict(record))

    def deliveries_of(self, queue_id: str, since: float) -> list[StoredDelivery]:
        """One queue id's recorded attempts since a time, oldest first."""
        return self._records(lambda row: StoredDelivery(**row), f"select {_columns(StoredDelivery)} from deliveries "
                             "where queue_id = ? and at >= ? order by id", [queue_id, since])

    def delivery_stats(self, since: float) -> list[DeliveryCount]:
        """Attempts per day, server, status and the domain the message left with (from its
        outbound row, the latest with that queue id)."""
        day = self.day_of.format("d.at")
        # The latest outbound row is found by id in the join, so that its domain is computed once
        # per attempt: a scalar subquery for the domain itself is evaluated again by the GROUP BY.
        latest = ("m.id = (select max(o.id) from messages o where o.queue_id = d.queue_id "
                  "and o.direction = 'outbound')")
        return self._records(lambda row: DeliveryCount(**row),
                             f"select day, server, status, domain, count(*) as count from (select {day} as day, "
                             f"coalesce(d.server, '-') as server, d.status, "
                             f"coalesce(lower({self.domain_of('m.envelope_from')}), '-') as domain "
                             f"from deliveries d left join messages m on {latest} "
                             "where d.at >= ?) as attempts group by day, server, status, domain "
                             "order by day, server, status, domain", [since])

    def delivery_totals(self) -> list[DeliveryTotal]:
        """All-time counters per server and status, rows purged by retention included (for
        Prometheus: a counter must never go down)."""
        return self._records(lambda row: DeliveryTotal(**row),
                             "select server, status, cast(sum(count) as bigint) as count from ("
                             "select coalesce(server, '-') as server, status, count(*) as count from deliveries "
                             "group by server, status union all select server, status, count from purged_counts "
                             "where family = 'deliveries') as totals group by server, status order by server, status")

    def log_position(self, path: str) -> tuple[int, int] | None:
        row = self._execute("select inode, \"offset\" from log_positions where path = ?", [path]).fetchone()
        return (row[0], row[1]) if row else None

    def save_log_position(self, path: str, inode: int, offset: int, at: float) -> None:
        self._execute("insert into log_positions (path, inode, \"offset\", updated_at) values (?, ?, ?, ?) "
                      "on conflict (path) do update set inode = excluded.inode, \"offset\" = excluded.\"offset\", "
                      "updated_at = excluded.updated_at", [path, inode, offset, at])

    # -- quota ----------------------------------------------------------------------------------------

    def quota_count(self, key: str, stream: str, since: float) -> int:
        """Recipients taken since `since`, to the minute (the minute `since` falls in counts whole)."""
        return self._scalar("select coalesce(sum(count), 0) from quota_counters where key = ? and stream = ? "
                            "and minute >= ?", [key, stream, int(since // 60)])

    def quota_take(self, key: str, stream: str, at: float, count: int = 1) -> None:
        """Take `count` recipients at `at`."""
        self.quota_take_many([(key, stream, at, count)])

    def quota_counts(self, counters: Sequence[tuple[str, str]], since: float) -> dict[tuple[str, str], int]:
        """`quota_count` of each (key, stream), in one statement per `LOOKUP_BATCH` counters: the
        policy service counts a batch's counters in one round trip (PostgreSQL's cost is the trip)."""
        unique = list(dict.fromkeys(counters))
        found = dict.fromkeys(unique, 0)
        for start in range(0, len(unique), LOOKUP_BATCH):
            chunk = unique[start:start + LOOKUP_BATCH]
            pairs = " or ".join(["(key = ? and stream = ?)"] * len(chunk))
            rows = self._execute(f"select key, stream, coalesce(sum(count), 0) from quota_counters "
                                 f"where minute >= ? and ({pairs}) group by key, stream",
                                 [int(since // 60), *(value for counter in chunk for value in counter)]).fetchall()
            for key, stream, total in rows:
                found[(key, stream)] = int(total)
        return found

    def quota_take_many(self, takes: Sequence[tuple[str, str, float, int]]) -> None:
        """Take (key, stream, at, count) each, as one batch (the policy service takes a turn's
        requests together; psycopg sends the batch in one pipeline)."""
        if takes:
            self._execute_many("insert into quota_counters (key, stream, minute, count) values (?, ?, ?, ?) "
                               "on conflict (key, stream, minute) do update "
                               "set count = quota_counters.count + excluded.count",
                               [(key, stream, int(at // 60), count) for key, stream, at, count in takes])

    def quota_give_back(self, key: str, stream: str, at: float, count: int) -> None:
        """Give back `count` recipients taken at `at` that were never sent (their transaction ended
        without the message): the same minute's counter goes down, never below zero."""
        self._execute("update quota_counters set count = case when count > ? then count - ? else 0 end "
                      "where key = ? and stream = ? and minute = ?", [count, count, key, stream, int(at // 60)])

    def quota_batch(self, batch: QuotaBatch) -> dict[tuple[str, str], int]:
        """A policy batch's give-backs, takes again, counts and takes (`QuotaBatch`) in one
        transaction holding its locks; returns each claimed counter's count before the batch's
        takes. Here statement by statement (SQLite's are calls into the library, not round trips);
        PostgreSQL does it in one."""
        with self.transaction(*batch.locks):
            for key, stream, at, count in batch.give_backs:
                self.quota_give_back(key, stream, at, count)
            self.quota_take_many(batch.retakes)
            if not batch.claims:
                return {}
            counts = self.quota_counts([(key, stream) for key, stream, _, _ in batch.claims], batch.since)
            self.quota_take_many([(key, stream, batch.at, taken) for key, stream, wanted, limit in batch.claims
                                  if (taken := recipients_within(counts[(key, stream)], wanted, limit))])
        return counts

    def purge_quota(self, before: float) -> int:
        """Forget the minutes before `before`; returns how many recipients that was."""
        minute = int(before // 60)
        taken = self._scalar("select coalesce(sum(count), 0) from quota_counters where minute < ?", [minute])
        self._execute("delete from quota_counters where minute < ?", [minute])
        return taken

    # -- copying a whole store (migrate-store) ----------------------------------------------------------

    def table_rows(self, table: str, batch: int = COPY_BATCH) -> Iterator[TableBatch]:
        """Every row of one of the store's data tables (`DATA_TABLES`) as stored, ids included,
        `batch` rows at a time: a copy keeps the ids, which other rows name."""
        cursor = self._execute(f"select * from {_data_table(table)}")
        columns = tuple(column[0] for column in cursor.description)
        while rows := cursor.fetchmany(batch):
            yield TableBatch(columns, rows)

    def tables_with_rows(self, tables: Sequence[str]) -> list[str]:
        """Those of `tables` that hold a row (a copy goes only into tables that hold none)."""
        return [table for table in tables
                if self._scalar(f"select 1 from {_data_table(table)} limit 1") is not None]

    def insert_rows(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Insert rows as they are, ids included (`table_rows` batches of another store)."""
        names = ", ".join(f'"{name}"' for name in columns)
        insert = f"insert into {_data_table(table)} ({names}) values ({self._marks(columns)})"
        for row in rows:
            self._execute(insert, row)

    def reset_id_sequences(self) -> None:
        """After rows were inserted with their ids: make the next id of each table follow the
        largest one (a dialect hook)."""
        raise NotImplementedError

    def adopt_store_id(self, store_id: str) -> None:
        """Take another store's identity: a copy holds the same rows, so the bounce tokens
        already issued for them must keep matching."""
        self._execute("update store_identity set id = ?", [store_id])
        self._store_id = None    # read again: the transaction may still roll back

    # -- retention ------------------------------------------------------------------------------------

    def purge(self, cutoffs: Mapping[str, float], batch: int = PURGE_BATCH) -> dict[str, int]:
        """Delete the rows older than each table's cutoff (`mailgate.rules.retention.retention_cutoffs`);
        returns the rows deleted per table. `inbound_messages` takes its `inbound_routes` along,
        `messages` its `outbound_recipients`;
        `quota_counters` is the quota's own purge (`purge_quota`, its figure is recipients, under
        `quota_recipients`). Bounces a blacklist entry names are kept; deleted bounces and
        deliveries are added to `purged_counts`, so that the all-time totals never go down."""
        unknown = set(cutoffs) - set(PURGEABLE) - {"quota_counters"}
        if unknown:
            raise ValueError(f"retention never deletes from {', '.join(sorted(unknown))}")
        deleted: dict[str, int] = {}
        for table, cutoff in cutoffs.items():
            if table == "quota_counters":
                with self.transaction("retention:quota_counters"):
                    deleted["quota_recipients"] = self.purge_quota(cutoff)
                continue
            routes: list[int] = []
            recipients: list[int] = []
            before_delete: dict[str, Callable[[list[Any]], Any]] = {
                "messages": partial(self._collect_recipients_of, recipients),
                "inbound_messages": partial(self._collect_routes_of, routes),
                "bounces": partial(self._count_purged, "bounces", BOUNCE_KIND),
                "deliveries": partial(self._count_purged, "deliveries", "status")}
            keep = self._blacklist_evidence() if table == "bounces" else frozenset()
            deleted[table] = self._purge_batches(table, cutoff, batch, keep, before_delete.get(table))
            if table == "inbound_messages":
                deleted["inbound_routes"] = sum(routes)
            if table == "messages":
                deleted["outbound_recipients"] = sum(recipients)
        return deleted

    def _purge_batches(self, table: str, cutoff: float, batch: int, keep: AbstractSet[Any] = frozenset(),
                       before_delete: Callable[[list], Any] | None = None) -> int:
        """Oldest first, `batch` rows per transaction, skipping the keys in `keep`;
        `before_delete(keys)` runs in the same transaction, before the rows go. Each batch resumes at the time the
        last one ended (the time column is indexed), so kept rows are not read again."""
        key, column = PURGEABLE[table]
        deleted, after = 0, None
        passed: list[Any] = []
        while True:
            clauses, params = [f"{column} < ?"], [cutoff]
            if after is not None:
                clauses.append(f"{column} >= ?")
                params.append(after)
            if passed:
                clauses.append(f"{key} not in ({self._marks(passed)})")
                params += passed
            with self.transaction(f"retention:{table}"):   # gateways purging together count each row once
                rows = self._execute(f"select {key}, {column} from {table} where {' and '.join(clauses)} "
                                     f"order by {column} limit {int(batch)}", params).fetchall()
                doomed = [row[0] for row in rows if row[0] not in keep]
                if doomed:
                    if before_delete is not None:
                        before_delete(doomed)
                    self._execute(f"delete from {table} where {key} in ({self._marks(doomed)})", doomed)
            deleted += len(doomed)
            if len(rows) < batch:
                return deleted
            last = rows[-1][1]
            # kept rows at the time the next batch starts from (rows of one report share it)
            passed = (passed if last == after else []) + [k for k, at in rows if at == last and k in keep]
            after = last

    def _collect_recipients_of(self, deleted: list[int], ids: list[int]) -> None:
        deleted.append(self._execute(f"delete from outbound_recipients where message in ({self._marks(ids)})",
                                     ids).rowcount)

    def _collect_routes_of(self, deleted: list[int], ids: list[int]) -> None:
        deleted.append(self._delete_routes_of(ids))

    def _delete_routes_of(self, ids: list[int]) -> int:
        return self._execute(f"delete from inbound_routes where message in ({self._marks(ids)})", ids).rowcount

    def _count_purged(self, family: str, status_sql: str, ids: list[int]) -> None:
        """Add the rows about to be purged to the per server and status counts they leave behind."""
        counts = self._execute(f"select coalesce(server, '-'), {status_sql}, count(*) from {family} where id in "
                               f"({self._marks(ids)}) group by coalesce(server, '-'), {status_sql}", ids).fetchall()
        for server, label, count in counts:
            self._execute("insert into purged_counts (family, server, status, count) values (?, ?, ?, ?) "
                          "on conflict (family, server, status) do update set count = purged_counts.count + "
                          "excluded.count", [family, server, label, count])
