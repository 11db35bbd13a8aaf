"""Run one stage module as a child process and record its peak resident memory and wall time.

    python -m bench.measure LABEL MODULE [ARGS...]

Appends one JSON line {label, module, seconds, max_rss_bytes, rc} to the file named by $CXRSYNTH_MEASURE_LOG (no
file: prints it) and exits with the child's status. The peak is `ru_maxrss` of the child from `os.wait4`: the
largest resident set the stage process reached (file pages it mapped count; pages read with `pread` do not).
`bench/scale.py` wraps every stage's command in it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m bench.measure LABEL MODULE [ARGS...]", file=sys.stderr)
        return 2
    label, module, rest = argv[0], argv[1], argv[2:]
    t0 = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", module, *rest])
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    record = {"label": label, "module": module, "seconds": round(seconds, 2),
              "max_rss_bytes": int(usage.ru_maxrss) * 1024, "rc": rc}
    log = os.environ.get("CXRSYNTH_MEASURE_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    else:
        print(json.dumps(record))
    return rc


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
