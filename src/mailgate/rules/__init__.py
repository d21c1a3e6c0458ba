"""The rules wing: every decision mailgate takes, as pure functions (docs/rules.md).

A rule module imports only the standard library, the configuration objects (`mailgate.config`),
other rules and the store interface (`mailgate.store.interface`); never an adapter, a command, a
store backend, `sqlite_utils`, `psycopg` or pymilter (tests/test_layout.py imports each one
alone in a fresh interpreter and checks). Time is passed in; what the store knows is passed in
as the interface or as plain callables.
"""
