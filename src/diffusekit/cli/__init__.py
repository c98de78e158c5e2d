"""Subcommands of ``diffusekit``: one module each, exposing ``add_parser(commands)`` and ``run(args) -> int``.

``diffusekit.__main__.COMMANDS`` maps each command name to its module here; a new command is a new module and
one line there.
"""
