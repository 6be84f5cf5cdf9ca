"""``OUT/summary.json`` of ``bench/gpu_check.sh``, rewritten after every step (standard library only).

    python bench/gpu_summary.py OUT STEPS_TSV DRY "name:budget name:budget ..."

``STEPS_TSV`` has one line per finished step: name, budget (s), wall time (ms), exit code or
``skipped: why``. The summary holds the plan, what the check found (the ``found:`` line of
``OUT/log.txt``), each step's outcome, the pytest counts of the ``tests`` step, and ``ok``:
every step that ran exited 0.
"""
from __future__ import annotations

import json
import pathlib
import re
import sys
from typing import Dict, List


def parse_plan(text: str) -> List[Dict]:
    plan = []
    for item in text.split():
        name, _, budget = item.partition(":")
        plan.append({"step": name, "budget_s": int(budget)})
    return plan


def parse_steps(text: str) -> List[Dict]:
    steps = []
    for line in text.splitlines():
        if not line.strip():
            continue
        name, budget, wall_ms, code = line.split("\t", 3)
        row = {"step": name, "budget_s": int(budget), "wall_s": round(int(wall_ms) / 1000, 1)}
        if code.startswith("skipped"):
            row.update(status="skipped", why=code.partition(":")[2].strip())
        else:
            rc = int(code)
            row.update(exit=rc, status="ok" if rc == 0 else ("time limit" if rc in (124, 137) else "failed"))
        steps.append(row)
    return steps


def pytest_counts(log: str) -> Dict[str, int]:
    """The counts of the last pytest summary line inside the ``tests`` step of the log."""
    part = log.split("== tests (", 1)[-1].split("== tests: exit", 1)[0] if "== tests (" in log else ""
    lines = [ln for ln in part.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    if not lines:
        return {}
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", lines[-1])}


def summary(out: pathlib.Path, steps_tsv: str, dry: bool, plan_text: str) -> Dict:
    log = (out / "log.txt").read_text(errors="replace") if (out / "log.txt").exists() else ""
    found = next((ln[len("found: "):] for ln in log.splitlines() if ln.startswith("found: ")), None)
    plan = parse_plan(plan_text)
    steps = parse_steps(steps_tsv)
    return {"dry_run": dry, "found": found, "plan": plan, "plan_total_s": sum(p["budget_s"] for p in plan),
            "steps": steps, "tests": pytest_counts(log),
            "ok": all(s["status"] in ("ok", "skipped") for s in steps)}


def main(argv: List[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    out, steps_file, dry, plan_text = pathlib.Path(argv[0]), pathlib.Path(argv[1]), argv[2] == "1", argv[3]
    text = steps_file.read_text() if steps_file.exists() else ""
    (out / "summary.json").write_text(json.dumps(summary(out, text, dry, plan_text), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
