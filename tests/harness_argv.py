"""Stand-in for ``python3`` under benchmarks/gpu/run_h200.sh (its ``PY``): ``-c`` and ``-m`` run for real; a script
is imported and run with its real ``main`` until its argument parser has parsed the options the harness passes,
then exits 0 and records the script. An option the script no longer takes fails here (argparse exits 2), not on
the lent GPU machine."""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from pathlib import Path

if sys.argv[1] in ("-c", "-m"):
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])

script, argv = sys.argv[1], sys.argv[2:]
parse = argparse.ArgumentParser.parse_args


class Parsed(SystemExit):
    pass


def parse_then_stop(self, args=None, namespace=None):
    parse(self, args, namespace)  # raises SystemExit(2) on an unknown or malformed option
    with open(Path(os.environ["OUT"], "parsed.txt"), "a") as f:
        f.write(f"{Path(script).as_posix()} {' '.join(argv)}\n")
    raise Parsed(0)


argparse.ArgumentParser.parse_args = parse_then_stop
sys.argv = [script, *argv]
sys.path.insert(0, str(Path(script).resolve().parent))
runpy.run_path(script, run_name="__main__")
