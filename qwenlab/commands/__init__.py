"""Subcommand modules: each calls qwenlab.cli.register(name, help, add_arguments, run) at import."""
