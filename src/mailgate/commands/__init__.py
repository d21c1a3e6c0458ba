"""The `mailgate` command line: one module (or package) per subcommand, `cli` dispatching."""
