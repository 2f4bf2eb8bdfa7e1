#!/usr/bin/python
# -*- coding: utf-8 -*-
# SPDX-License-Identifier: MIT
"""Idempotent Mosquitto password file management."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: mosquitto_passwd
short_description: Manage a Mosquitto password file idempotently
description:
  - Writes a Mosquitto 2.0 compatible password file (C($7$) PBKDF2-SHA512 hashes, as C(mosquitto_passwd) makes).
  - An existing hash is kept when it still verifies against the wanted password, so a second run
    with the same passwords changes nothing (a new random salt on every run is the known trap).
  - Existing C($6$) (salted SHA512, Mosquitto 1.x) hashes are verified too and kept when they match.
  - Supports check mode. Never returns hashes or passwords and never shows a diff.
options:
  path:
    description: Password file path.
    type: path
    required: true
  users:
    description:
      - Wanted users, dicts with O(users[].name) and O(users[].password); other keys are ignored.
    type: list
    elements: dict
    required: true
    suboptions:
      name:
        description: User name (no colon).
        type: str
        required: true
      password:
        description: Clear text password.
        type: str
        required: true
  exclusive:
    description: Remove users found in the file that are not in O(users).
    type: bool
    default: true
  iterations:
    description: PBKDF2 iterations for new hashes (Mosquitto uses 101).
    type: int
    default: 101
extends_documentation_fragment:
  - ansible.builtin.files
author:
  - facepipe
"""

EXAMPLES = r"""
- name: Write the broker password file
  mosquitto_passwd:
    path: /etc/mosquitto/passwd
    users:
      - name: face-writer
        password: "{{ vault_face_writer_password }}"
    owner: root
    group: mosquitto
    mode: "0640"
  no_log: true
"""

RETURN = r"""
users_added:
  description: Names of users that were added.
  type: list
  returned: always
users_updated:
  description: Names of users whose hash was replaced (password changed).
  type: list
  returned: always
users_removed:
  description: Names of users that were removed.
  type: list
  returned: always
"""

import base64
import hashlib
import hmac
import os
import tempfile

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.common.text.converters import to_bytes

SALT_LEN = 12


def make_hash(password, iterations):
    salt = os.urandom(SALT_LEN)
    digest = hashlib.pbkdf2_hmac("sha512", to_bytes(password), salt, iterations)
    return "$7$%d$%s$%s" % (
        iterations,
        base64.b64encode(salt).decode("ascii"),
        base64.b64encode(digest).decode("ascii"),
    )


def verify(stored, password):
    """Return True when the stored Mosquitto hash matches password."""
    parts = stored.split("$")
    try:
        if len(parts) == 5 and parts[1] == "7":
            iterations = int(parts[2])
            salt = base64.b64decode(parts[3])
            want = base64.b64decode(parts[4])
            got = hashlib.pbkdf2_hmac("sha512", to_bytes(password), salt, iterations, len(want))
            return hmac.compare_digest(got, want)
        if len(parts) == 4 and parts[1] == "6":
            salt = base64.b64decode(parts[2])
            want = base64.b64decode(parts[3])
            got = hashlib.sha512(to_bytes(password) + salt).digest()
            return hmac.compare_digest(got, want)
    except (ValueError, TypeError):
        return False
    return False


def read_entries(path):
    entries = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                line = line.rstrip("\r\n")
                if not line or ":" not in line:
                    continue
                name, stored = line.split(":", 1)
                entries.append((name, stored))
    return entries


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", required=True),
            users=dict(
                type="list",
                elements="dict",
                required=True,
                no_log=True,
            ),
            exclusive=dict(type="bool", default=True),
            iterations=dict(type="int", default=101),
        ),
        add_file_common_args=True,
        supports_check_mode=True,
    )
    path = module.params["path"]
    iterations = module.params["iterations"]
    wanted = {}
    order = []
    for user in module.params["users"]:
        name = user.get("name")
        if not isinstance(user.get("password"), str) or not user["password"]:
            module.fail_json(msg="user %r has no password" % name)
        if not isinstance(name, str) or not name or ":" in name or "\n" in name:
            module.fail_json(msg="invalid user name %r (empty, or contains ':' or a newline)" % name)
        if name in wanted:
            module.fail_json(msg="user %r is listed twice" % name)
        wanted[name] = user["password"]
        order.append(name)

    existing = read_entries(path)
    seen = set()
    lines = []
    added, updated, removed = [], [], []
    for name, stored in existing:
        if name in seen:
            removed.append(name)
            continue
        if name in wanted:
            seen.add(name)
            if verify(stored, wanted[name]):
                lines.append("%s:%s" % (name, stored))
            else:
                lines.append("%s:%s" % (name, make_hash(wanted[name], iterations)))
                updated.append(name)
        elif module.params["exclusive"]:
            removed.append(name)
        else:
            seen.add(name)
            lines.append("%s:%s" % (name, stored))
    for name in order:
        if name not in seen:
            lines.append("%s:%s" % (name, make_hash(wanted[name], iterations)))
            added.append(name)
            seen.add(name)

    content = "".join(line + "\n" for line in lines)
    changed = not os.path.exists(path) or bool(added or updated or removed)
    if changed and not module.check_mode:
        directory = os.path.dirname(path) or "."
        fd, tmp = tempfile.mkstemp(prefix=".passwd.", dir=directory)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(content)
            module.atomic_move(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    file_args = module.load_file_common_arguments(module.params)
    if os.path.exists(path):
        changed = module.set_fs_attributes_if_different(file_args, changed)
    module.exit_json(
        changed=changed,
        path=path,
        users_added=added,
        users_updated=updated,
        users_removed=removed,
    )


if __name__ == "__main__":
    main()
