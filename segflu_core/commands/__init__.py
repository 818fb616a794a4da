"""Subcommands of the ``segflu`` command line, one module each."""
