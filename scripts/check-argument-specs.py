#!/usr/bin/env python3
"""Every role variable is documented, and internal variables follow one naming convention.

For each role under roles/: every key of defaults/main.yml must be an option of an entry point in
meta/argument_specs.yml, every option must be prefixed with the role name, and the role's
README.md must mention every option. Internal variables: computed ones (vars/main.yml, a task's
vars:) are `_<role>_*`; registered results and set_fact facts are `__<role>_*`, except facts the role
publishes for other roles (`<role>_*`, documented in its README). A task's vars: on an include_role
must each be an option of the included role's entry point (argument specs do not refuse unknown
names, so a misspelt one would silently fall back to a default). Prints each problem and exits 1
if there is any.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

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


def _module(task: dict[str, Any], short: str) -> Any:
    """The arguments of a task's module, under its FQCN, ansible.legacy or its short name."""
    for key in (f"ansible.builtin.{short}", f"ansible.legacy.{short}", short):
        if key in task:
            return task[key]
    return None


def _options(role: Path, entry: str) -> set[str]:
    specs = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text()) or {}
    return set(((specs.get("argument_specs") or {}).get(entry) or {}).get("options") or {})


def _task_names(tasks: object, out: list[tuple[str, str]]) -> None:
    """(kind, name) of the computed, registered and set_fact variables and include_role vars in a task list."""
    for task in tasks if isinstance(tasks, list) else []:
        if not isinstance(task, dict):
            continue
        include = _module(task, "include_role") or _module(task, "import_role")
        if include is not None:
            target = include if isinstance(include, dict) else {"name": str(include)}
            entry = str(target.get("tasks_from") or "main")
            out.extend((f"option:{target.get('name')}:{entry}", str(k)) for k in task.get("vars") or {})
        else:
            out.extend(("computed", str(k)) for k in task.get("vars") or {})
        if "register" in task:
            out.append(("registered", str(task["register"])))
        facts = _module(task, "set_fact")
        if isinstance(facts, str):  # free form: set_fact: a=1 b=2
            facts = dict(pair.split("=", 1) for pair in facts.split() if "=" in pair)
        out.extend(("fact", str(k)) for k in facts or {} if k != "cacheable")
        loop_var = (task.get("loop_control") or {}).get("loop_var")
        if loop_var:
            out.append(("computed", str(loop_var)))
        for key in ("block", "rescue", "always"):
            _task_names(task.get(key), out)


def check_names(role: Path) -> list[str]:
    name = role.name
    problems: list[str] = []
    names: list[tuple[str, str, str]] = []
    for f in sorted((role / "vars").rglob("*.y*ml")) if (role / "vars").is_dir() else []:
        where = str(f.relative_to(role))
        names += [("computed", str(k), where) for k in yaml.safe_load(f.read_text()) or {}]
    for sub in ("tasks", "handlers"):
        for f in sorted((role / sub).rglob("*.y*ml")) if (role / sub).is_dir() else []:
            found: list[tuple[str, str]] = []
            _task_names(yaml.safe_load(f.read_text()), found)
            names += [(kind, var, str(f.relative_to(role))) for kind, var in found]
    readme = (role / "README.md").read_text() if (role / "README.md").is_file() else ""
    for kind, var, where in names:
        if var.startswith("ansible_"):  # Ansible's own (connection, check mode, ...)
            continue
        if kind.startswith("option:"):
            _, target, entry = kind.split(":")
            ok = (ROOT / "roles" / target).is_dir() and var in _options(ROOT / "roles" / target, entry)
            want = f"an option of {target}'s entry point {entry}"
        elif kind == "computed":
            ok = var.startswith(f"_{name}_") and not var.startswith(f"__{name}_")
            want = f"_{name}_*"
        else:
            documented = kind == "fact" and var.startswith(f"{name}_") and f"`{var}`" in readme
            ok = var.startswith(f"__{name}_") or documented
            want = f"__{name}_*" + (f" (or a {name}_* fact its README documents)" if kind == "fact" else "")
        if not ok:
            problems.append(f"{name}: {kind.split(':')[0]} variable {var} in {where} is not {want}")
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
