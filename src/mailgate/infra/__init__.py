"""What the adapters and commands share: log lines, socket files, the clock, the runtime
(configuration, store, token signer) a service works with."""
