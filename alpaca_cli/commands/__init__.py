"""One module per command: parse the flags, call the core, print the result."""
