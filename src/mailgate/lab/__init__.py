"""A private loopback Postfix and local upstream sinks, shared by the demo and the tests."""
