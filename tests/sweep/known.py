"""``python -m tests.sweep.known <dir>``: write ``known_failures.json`` from a recorded sweep
(``REGFW_SWEEP_RECORD=<dir> make test-sweep``): per case, the failure classes it showed. Review the
diff: every entry is a rule that fails on a model, to be fixed in the rules and then removed."""
from __future__ import annotations

import json
import sys
from pathlib import Path

KNOWN = Path(__file__).with_name("known_failures.json")


def main() -> None:
    found = {}
    for path in sorted(Path(sys.argv[1]).glob("*.json")):
        record = json.loads(path.read_text())
        if record["failures"]:
            found[record["case"]] = sorted(record["failures"])
    KNOWN.write_text(json.dumps(found, indent=1, sort_keys=True) + "\n")
    print(f"{len(found)} case(s) with known failures written to {KNOWN}")


if __name__ == "__main__":
    main()
