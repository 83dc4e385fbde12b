"""Subcommands of ``corefbot``; each module exposes ``register(subparsers)``."""
