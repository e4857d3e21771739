"""What reading SQL with PostgreSQL's parser costs, against the hand-written scanner it replaced.

``python -m benchmarks.classifier [--baseline REV] [--out FILE]``

The parser runs once per distinct statement text (a clean loan's later statements are a set
lookup, the same code as before), so what matters is the cost per *distinct* text: on ORM
statements (Django's and SQLAlchemy's own texts) and on bulk ``INSERT`` texts of growing size
(linear or not). The old scanner (``greenpool/sessionstate.py`` at ``REV``, read from git) is
timed on the same texts in the same process. Also timed: the pooler's reading of a bulk text
(``greenpool.sql.statements``), which parses whatever the length.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from greenpool import sql

#: the last commit with the hand-written scanners
BASELINE = "28bab1f"

ORM_TEXTS = {
    "django get": 'SELECT "auth_user"."id", "auth_user"."password", "auth_user"."last_login", '
                  '"auth_user"."is_superuser", "auth_user"."username", "auth_user"."email" FROM '
                  '"auth_user" WHERE "auth_user"."id" = %s LIMIT 21',
    "django insert": 'INSERT INTO "app_note" ("owner_id", "text", "created") VALUES (%s, %s, %s) '
                     'RETURNING "app_note"."id"',
    "django join": 'SELECT "app_note"."id", "app_note"."text", "auth_user"."username" FROM '
                   '"app_note" INNER JOIN "auth_user" ON ("app_note"."owner_id" = '
                   '"auth_user"."id") WHERE ("auth_user"."is_active" AND "app_note"."created" >= '
                   '%s) ORDER BY "app_note"."created" DESC LIMIT 50',
    "sqlalchemy select": "SELECT users.id, users.name, users.fullname \nFROM users \nWHERE "
                         "users.name = %(name_1)s",
    "sqlalchemy update": "UPDATE users SET fullname=%(fullname)s WHERE users.id = %(users_id)s",
    "sqlalchemy in": "SELECT addresses.id, addresses.email_address, addresses.user_id \nFROM "
                     "addresses \nWHERE addresses.user_id IN (%(primary_keys_1)s, "
                     "%(primary_keys_2)s, %(primary_keys_3)s)",
}


def _bulk(rows: int) -> str:
    return "INSERT INTO t (a, b) VALUES " + ", ".join(f"({i}, 'x')" for i in range(rows))


def _old_classifier(rev: str) -> Callable[[str], bool]:
    source = subprocess.run(["git", "show", f"{rev}:greenpool/sessionstate.py"], check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType("old_sessionstate")
    exec(compile(source, "old_sessionstate.py", "exec"), module.__dict__)
    return module._text_changes_session  # type: ignore[no-any-return]


def _per_call_us(func: Callable[[str], Any], text: str, budget: float = 0.2,
                 least: int = 5) -> float:
    """Median µs of one call on a text never seen before (the cache defeated)."""
    times: list[float] = []
    deadline = time.perf_counter() + budget
    i = 0
    while time.perf_counter() < deadline or len(times) < least:
        fresh = f"{text} -- {i}"
        started = time.perf_counter()
        func(fresh)
        times.append((time.perf_counter() - started) * 1e6)
        i += 1
    return statistics.median(times)


def measure(baseline: str) -> dict[str, Any]:
    old = _old_classifier(baseline)
    result: dict[str, Any] = {"orm": {}, "bulk": {}}
    for name, text in ORM_TEXTS.items():
        result["orm"][name] = {"old_us": _per_call_us(old, text),
                               "new_us": _per_call_us(sql.changes_session, text)}
    for rows in (600, 6_000, 60_000):
        text = _bulk(rows)
        result["bulk"][f"{len(text) // 1000} KB"] = {
            "old_us": _per_call_us(old, text, 0.5),
            "new_session_us": _per_call_us(sql.changes_session, text, 0.5),
            "new_pooler_us": _per_call_us(sql.statements, text, 0.5),
        }
    value = "INSERT INTO t VALUES ('" + ";/*" * 20_000 + "')"  # the old scanner's worst case
    result["semicolon_comment_60KB"] = {"old_us": _per_call_us(old, value, 0, least=1),
                                        "new_pooler_us": _per_call_us(sql.statements, value)}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the old scanner")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    result = measure(args.baseline)
    for name, row in result["orm"].items():
        print(f"{name:20} old {row['old_us']:8.1f} µs   new {row['new_us']:8.1f} µs")
    for size, row in result["bulk"].items():
        print(f"bulk INSERT {size:>7} old {row['old_us']:10.0f} µs   new (session check) "
              f"{row['new_session_us']:8.0f} µs   new (pooler) {row['new_pooler_us']:8.0f} µs")
    row = result["semicolon_comment_60KB"]
    print(f"60 KB of ';/*' in a literal: old {row['old_us']:.0f} µs, "
          f"new (pooler) {row['new_pooler_us']:.0f} µs")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
