"""Extra CLI subcommands: each module here defines ``add(subparsers)`` and is picked up by cli.py."""
