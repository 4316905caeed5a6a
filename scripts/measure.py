#!/usr/bin/env python3
"""make bench's stopwatch: runs COMMAND (its stderr discarded) and prints one tab-separated
row: the LABELs, wall seconds, kernel (sys) seconds, peak RSS in MiB. The figures are
RUSAGE_CHILDREN of this process, so of the command alone. VAR=VALUE arguments before `--`
are set in the command's environment.

Usage: scripts/measure.py LABEL... [VAR=VALUE...] -- COMMAND [ARG...]"""
import os
import resource
import subprocess
import sys
import time

if "--" not in sys.argv:
    sys.exit(__doc__)
split = sys.argv.index("--")
before, cmd = sys.argv[1:split], sys.argv[split + 1:]
labels = [a for a in before if "=" not in a]
env = dict(os.environ)
env.update(a.split("=", 1) for a in before if "=" in a)
if not labels or not cmd:
    sys.exit(__doc__)
start = time.monotonic()
done = subprocess.run(cmd, stderr=subprocess.DEVNULL, env=env)
if done.returncode != 0:
    sys.exit(f"measure: {' '.join(labels)} failed ({' '.join(cmd)}); rerun it by hand to see its error")
use = resource.getrusage(resource.RUSAGE_CHILDREN)
print("\t".join(labels + [f"{time.monotonic() - start:.1f}", f"{use.ru_stime:.1f}", f"{use.ru_maxrss / 1024:.0f}"]), flush=True)
