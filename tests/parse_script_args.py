"""Parse a documented script command's arguments with the script's own argparse parser, and stop there.

Usage: ``python tests/parse_script_args.py CWD SCRIPT [ARG ...]``. Runs SCRIPT as ``__main__`` from CWD
until its first ``ArgumentParser.parse_args`` returns, prints the parsed arguments as JSON and exits 0;
an argument the parser refuses exits 2 with argparse's message, as the script would. For the commands
in the docs whose full run takes hours (tests/test_docs.py): the options they print still exist and
take these values.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys


class Parsed(Exception):
    pass


def main() -> int:
    cwd, script, *args = sys.argv[1:]
    os.chdir(cwd)
    script = os.path.abspath(script)
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise Parsed(vars(original(self, args, namespace)))

    argparse.ArgumentParser.parse_args = parse_and_stop
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(script))
    try:
        runpy.run_path(script, run_name="__main__")
    except Parsed as parsed:
        print(json.dumps(parsed.args[0], default=str))
        return 0
    print(f"{script} ended without parsing its arguments", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
