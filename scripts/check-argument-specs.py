#!/usr/bin/env python3
"""Every role variable is documented, and internal variables follow one naming convention.

For each role under roles/: every key of defaults/main.yml must be an option of an entry point in
meta/argument_specs.yml, every option must be prefixed with the role name, and the role's
README.md must mention every option. Internal variables: computed ones (vars/main.yml, a task's
vars:) are `_<role>_*`; registered results and set_fact facts are `__<role>_*`, except facts the role
publishes for other roles (`<role>_*`, documented in its README). A task's vars: on an include_role
are the included role's options and are left to its argument spec. Prints each problem and exits 1
if there is any.
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


def _task_names(tasks: object, out: list[tuple[str, str]]) -> None:
    """(kind, name) of every computed, registered and set_fact variable in a task list."""
    for task in tasks if isinstance(tasks, list) else []:
        if not isinstance(task, dict):
            continue
        if "ansible.builtin.include_role" not in task and "ansible.builtin.import_role" not in task:
            out.extend(("computed", str(k)) for k in task.get("vars") or {})
        if "register" in task:
            out.append(("registered", str(task["register"])))
        out.extend(("fact", str(k)) for k in task.get("ansible.builtin.set_fact") or {} if k != "cacheable")
        for key in ("block", "rescue", "always"):
            _task_names(task.get(key), out)


def check_names(role: Path) -> list[str]:
    name = role.name
    problems: list[str] = []
    names: list[tuple[str, str, str]] = []
    vars_file = role / "vars" / "main.yml"
    if vars_file.is_file():
        names += [("computed", str(k), "vars/main.yml") for k in yaml.safe_load(vars_file.read_text()) or {}]
    for sub in ("tasks", "handlers"):
        for f in sorted((role / sub).glob("*.yml")):
            found: list[tuple[str, str]] = []
            _task_names(yaml.safe_load(f.read_text()), found)
            names += [(kind, var, f"{sub}/{f.name}") for kind, var in found]
    readme = (role / "README.md").read_text() if (role / "README.md").is_file() else ""
    for kind, var, where in names:
        if kind == "computed":
            ok = var.startswith(f"_{name}_")
            want = f"_{name}_*"
        else:
            ok = var.startswith(f"__{name}_") or (kind == "fact" and var.startswith(f"{name}_") and var in readme)
            want = f"__{name}_*" + (f" (or a {name}_* fact its README documents)" if kind == "fact" else "")
        if not ok:
            problems.append(f"{name}: {kind} variable {var} in {where} is not named {want}")
    return problems


def main() -> int:
    roles = sorted(p for p in (ROOT / "roles").iterdir() if p.is_dir())
    problems = [p for role in roles for p in check_role(role) + check_names(role)]
    for problem in problems:
        print(problem)
    print(f"argument specs: {len(roles)} roles checked, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
