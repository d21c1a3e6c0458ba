"""The milter adapter (outbound and inbound roles), built on pymilter."""
