"""``ane-build lint PROGRAM``: the ops of a Core ML program that break what the Apple Neural Engine is
reported to take, per rule (``ane_rules``), read from the program itself without Core ML.

PROGRAM is a ``.pte`` (every Core ML partition, every function of a multifunction one) or an
``.mlpackage``. Prints the report (``lint.md``; ``--json``: ``lint.json``), which the export
stage writes beside its delegation report. Exit status 0 when no finding is outside the
allowlist, 1 when one is, 2 when PROGRAM cannot be read. ``--device-plan`` (macOS 14.4+) also
asks Core ML's own compute plan where each op runs, and counts an op planned off the Neural
Engine as a finding.
"""

import json
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from ane_build.analysis import ane_rules
from ane_build.programs import coreml_program
from ane_build.util import command
from ane_build.util.errors import UserError

JSON_FILE, MARKDOWN_FILE = "lint.json", "lint.md"
ROWS_SHOWN = 12  # per rule in lint.md; lint.json has every finding


def lint(path, device_plan=False):
    """The report (a JSON-able dict) of the program at ``path``; UserError if it cannot be read."""
    if device_plan:
        from ane_build.analysis import device_plan as plan

        plan.require_mac()  # before any reading: a Linux host fails at once
    models = coreml_program.read(path)
    findings = ane_rules.lint_program(models)
    if device_plan:
        lookups = {(m.label, fn.name): {t.name for op in ane_rules.input_lookups(fn) for t in op.outputs}
                   for m in models for fn in m.functions}
        findings += plan.findings(path, lookups)
    return report(Path(path).name, models, findings, device_plan)


def report(program, models, findings, device_plan=False):
    outside = [f for f in findings if not f.allowed]
    counts = Counter(f.rule for f in outside)
    allowed = Counter(f.rule for f in findings if f.allowed)
    return {
        "program": program,
        "clean": not outside,
        "findings": len(outside),
        "allowlisted": len(findings) - len(outside),
        "by_rule": {rule.id: counts[rule.id] for rule in ane_rules.RULES if counts[rule.id]},
        "device_plan": device_plan,
        "models": [{"label": m.label, "weight_bytes": m.weight_bytes,
                    "functions": {fn.name: len(fn.ops) for fn in m.functions}} for m in models],
        "rules": [{**asdict(rule), "sources": list(rule.sources), "findings": counts[rule.id],
                   "allowlisted": allowed[rule.id]} for rule in ane_rules.RULES],
        "allowances": [{**asdict(a), "rules": list(a.rules)} for a in ane_rules.ALLOWANCES],
        "items": [f.as_dict() for f in findings],
    }


def summary(rep):
    """One line: how many findings, by rule."""
    if rep["clean"]:
        return f"no finding outside the allowlist ({rep['allowlisted']} allowlisted)"
    rules = ", ".join(f"{rule} {n}" for rule, n in rep["by_rule"].items())
    return f"{rep['findings']} findings outside the allowlist ({rules}; {rep['allowlisted']} allowlisted)"


def first_finding(rep):
    """The first finding outside the allowlist, in a few words."""
    item = next(i for i in rep["items"] if not i["allowed"])
    return f"{item['rule']}: {item['function'] or item['model']} {item['op']} {item['name']} ({item['detail']})"


def markdown(rep):
    lines = [f"# Neural Engine lint: {rep['program']}", ""]
    for m in rep["models"]:
        functions = ", ".join(f"{name} ({n} ops)" for name, n in m["functions"].items())
        lines.append(f"- {m['label']}: {functions}; {m['weight_bytes'] / 1e6:.1f} MB of weights")
    lines += ["", f"**{'Clean' if rep['clean'] else 'Findings'}**: {summary(rep)}.", "",
              "Each rule is a heuristic from public reports (its sources below); Core ML decides where an op "
              "runs, per chip and OS." + ("" if rep["device_plan"] else " On a Mac, `ane-build lint "
                                          "--device-plan` asks Core ML's own compute plan too."), ""]
    for rule in rep["rules"]:
        rows = [i for i in rep["items"] if i["rule"] == rule["id"] and not i["allowed"]]
        if rows:
            lines += _rule_section(rule, rows)
    for allowance in rep["allowances"]:
        rows = [i for i in rep["items"] if i["allowed"] == allowance["id"]]
        if rows:
            lines += [f"## Allowlisted: {allowance['id']} ({len(rows)})", "", allowance["reason"] + ".", ""]
            lines += _table(rows, with_rule=True)
    return "\n".join(lines).rstrip() + "\n"


def _rule_section(rule, rows):
    return [f"## {rule['id']}: {len(rows)} ({rule['evidence']}, {rule['severity']})", "",
            rule["reason"] + ".", "", "Sources: " + "; ".join(rule["sources"]) + ".", "", *_table(rows)]


def _table(rows, with_rule=False):
    """Rows alike but for the op's name (the same op in every layer) as one, with their count."""
    groups = {}
    for i in rows:
        computes = ", ".join(f"{t['dtype']} {t['shape']}" for t in i["tensors"])
        key = (i["function"] or i["model"], *([i["rule"]] if with_rule else []), i["op"], computes, i["detail"])
        groups.setdefault(key, []).append(i["name"])
    head = ["function", *(["rule"] if with_rule else []), "op", "computes", "detail", "count", "names"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, names in list(groups.items())[:ROWS_SHOWN]:
        shown = ", ".join(f"`{n}`" for n in names[:2]) + (f" and {len(names) - 2} more" if len(names) > 2 else "")
        lines.append("| " + " | ".join([*key, str(len(names)), shown]) + " |")
    if len(groups) > ROWS_SHOWN:
        lines.append(f"\n... and {len(groups) - ROWS_SHOWN} more kinds ({JSON_FILE} lists every finding).")
    return lines + [""]


def write(rep, out_dir):
    (Path(out_dir) / JSON_FILE).write_text(json.dumps(rep, indent=2) + "\n")
    (Path(out_dir) / MARKDOWN_FILE).write_text(markdown(rep))


def add_arguments(parser):
    parser.add_argument("program", help="a .pte (its Core ML partitions) or an .mlpackage")
    parser.add_argument("--json", action="store_true", help=f"print {JSON_FILE} instead of the report")
    parser.add_argument("--device-plan", action="store_true",
                        help="also ask Core ML's compute plan where each op runs (macOS 14.4+)")
    return parser


def main(args):
    try:
        rep = lint(args.program, device_plan=args.device_plan)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(rep, indent=2) if args.json else markdown(rep), end="" if not args.json else "\n")
    return 0 if rep["clean"] else 1


if __name__ == "__main__":
    sys.exit(command.run("python -m ane_build.analysis.lint", __doc__, add_arguments, main))
