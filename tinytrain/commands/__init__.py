"""The command line: the `tinytrain` dispatcher and one module per command."""
