#!/usr/bin/env python3
"""Every role variable is documented: defaults/main.yml == meta/argument_specs.yml == README.

For each role under roles/: every key of defaults/main.yml must be an option of an entry point in
meta/argument_specs.yml, every option must be prefixed with the role name, and the role's
README.md must mention every option. Prints each problem and exits 1 if there is any.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def check_role(role: Path) -> list[str]:
    problems: list[str] = []
    name = role.name
    specs_file = role / "meta" / "argument_specs.yml"
    if not specs_file.is_file():
        return [f"{name}: no meta/argument_specs.yml"]
    specs = yaml.safe_load(specs_file.read_text()) or {}
    options: set[str] = set()
    for entry in (specs.get("argument_specs") or {}).values():
        options.update((entry or {}).get("options") or {})
    defaults_file = role / "defaults" / "main.yml"
    defaults = yaml.safe_load(defaults_file.read_text()) if defaults_file.is_file() else {}
    for key in sorted(set(defaults or {}) - options):
        problems.append(f"{name}: default {key} is not in meta/argument_specs.yml")
    for key in sorted(options):
        if not key.startswith(name + "_"):
            problems.append(f"{name}: variable {key} is not prefixed with {name}_")
    readme = role / "README.md"
    text = readme.read_text() if readme.is_file() else ""
    if not text:
        problems.append(f"{name}: no README.md")
    for key in sorted(options):
        if text and key not in text:
            problems.append(f"{name}: README.md does not document {key}")
    return problems


def main() -> int:
    roles = sorted(p for p in (ROOT / "roles").iterdir() if p.is_dir())
    problems = [p for role in roles for p in check_role(role)]
    for problem in problems:
        print(problem)
    print(f"argument specs: {len(roles)} roles checked, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
