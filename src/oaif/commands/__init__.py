"""The ``oaif annotate``, ``oaif eval`` and ``oaif expo`` commands (``oaif.cli`` builds the parser around them).

Each command module has ``add_arguments(parser)`` and ``run(args)``, and imports nothing heavy at
module level: the CLI imports them to build its parser.
"""
