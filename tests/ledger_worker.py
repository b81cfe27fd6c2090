"""A run that only books FLOPs, for the ledger tests that need real processes (test_ledger.py):

    python tests/ledger_worker.py '{"ledger": ..., "plan": 40, "spend": [20, 20], ...}'

It reserves `plan` FLOPs (drawing on $QWEN_MIN_RESERVATION, as train.py does), writes
{"pid", "id"} to `report` (a file), starts its `children` (specs like its own) with its
reservation in $QWEN_MIN_RESERVATION, waits for the file `go` if given, charges each of `spend`
after `pause` seconds, waits for its children and releases. Refused: the line train.py prints,
exit code 3. `lease` sets ledger.LEASE_S (how long a reservation that cannot be checked by pid
outlives its last refresh)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ledger  # noqa: E402  (the repository root, above)


def main(spec: dict) -> int:
    ledger.LEASE_S = spec.get("lease", ledger.LEASE_S)
    try:
        booking = ledger.reserve(spec["ledger"], spec["plan"], spec.get("budget", 100),
                                 name=spec.get("name", "worker"))
    except ledger.BudgetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    with booking:
        report = Path(spec["report"])  # written whole: the test polls for it
        report.with_suffix(".tmp").write_text(json.dumps({"pid": os.getpid(), "id": booking.id}))
        report.with_suffix(".tmp").replace(report)
        env = os.environ | {ledger.PARENT_ENV: booking.id}
        children = [subprocess.Popen([sys.executable, __file__, json.dumps(child)], env=env)
                    for child in spec.get("children", [])]
        while spec.get("go") and not Path(spec["go"]).exists():
            time.sleep(0.02)
        for n in spec.get("spend", []):
            time.sleep(spec.get("pause", 0))
            booking.append({"kind": "train", "name": spec.get("name", "worker"), "flops": n})
        for child in children:
            child.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
