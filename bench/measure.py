"""Run one stage module as a child process and record its peak memory and wall time.

    python -m bench.measure LABEL MODULE [ARGS...]

Appends one JSON line to the file named by $CXRSYNTH_MEASURE_LOG (no file: prints it) and exits with the child's
status. Two peaks are recorded:

- `max_rss_bytes`: `ru_maxrss` of the child from `os.wait4`, the largest resident set the process reached. It counts
  file pages the process mapped (a memmap walked end to end is counted whole although the kernel may drop those pages
  at any time), so it overstates what a stage needs.
- `max_anon_bytes`: the largest `RssAnon + RssShmem` read from `/proc/PID/status` every `POLL` seconds (Linux only;
  absent elsewhere): the memory the process owns and the kernel cannot reclaim without swapping. This is the figure a
  box's RAM has to hold. Sampling can miss a peak shorter than `POLL`; `VmHWM` bounds it from above.
`bench/scale.py` wraps every stage's command in it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

POLL = 0.02


def _status_kb(pid: int) -> dict[str, int] | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    out = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssShmem", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


class _Poller(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.anon, self.file, self.ok = pid, 0, 0, False
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            s = _status_kb(self.pid)
            if s and "RssAnon" in s:
                self.ok = True
                self.anon = max(self.anon, s["RssAnon"] + s.get("RssShmem", 0))
                self.file = max(self.file, s.get("RssFile", 0))
            self.done.wait(POLL)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m bench.measure LABEL MODULE [ARGS...]", file=sys.stderr)
        return 2
    label, module, rest = argv[0], argv[1], argv[2:]
    t0 = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", module, *rest])
    poller = _Poller(child.pid)
    poller.start()
    _, status, usage = os.wait4(child.pid, 0)
    poller.done.set()
    poller.join()
    seconds = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    record = {"label": label, "module": module, "seconds": round(seconds, 2),
              "max_rss_bytes": int(usage.ru_maxrss) * 1024, "rc": rc}
    if poller.ok:
        record["max_anon_bytes"] = poller.anon * 1024
        record["max_file_bytes"] = poller.file * 1024
    log = os.environ.get("CXRSYNTH_MEASURE_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    else:
        print(json.dumps(record))
    return rc


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
