"""Flask-SQLAlchemy on greenpool through its engine options alone.

A real Flask app with Flask-SQLAlchemy 3.x models: the default engine on greenpool's
``write`` group and a ``read`` bind, both configured only with ``engine_options`` (no ORM
code changes), served concurrently through Flask's test client.
"""

from __future__ import annotations

from typing import Any

import pytest
from modes import join_all, spawn

pytest.importorskip("sqlalchemy")
flask = pytest.importorskip("flask")
flask_sqlalchemy = pytest.importorskip("flask_sqlalchemy")

from sqlalchemy import String, select  # noqa: E402
from sqlalchemy.orm import Mapped, mapped_column  # noqa: E402

from greenpool.sqlalchemy import GreenpoolPool, engine_options  # noqa: E402


def test_flask_sqlalchemy_runs_on_greenpool_groups(make_pool, pg, server_conns):
    pg.execute("DROP TABLE IF EXISTS flask_notes")
    pool = make_pool({"write": {"connection_count": 2, "timeout": 20},
                      "read": {"connection_count": 2, "autocommit": True, "timeout": 20}},
                     application_name="sqla-flask")
    app = flask.Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI="postgresql+psycopg2://",
        SQLALCHEMY_ENGINE_OPTIONS=engine_options(pool, "write"),
        SQLALCHEMY_BINDS={"read": {"url": "postgresql+psycopg2://",
                                   **engine_options(pool, "read")}},
    )
    db = flask_sqlalchemy.SQLAlchemy(app)

    class Note(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "flask_notes"
        id: Mapped[int] = mapped_column(primary_key=True)
        body: Mapped[str] = mapped_column(String(100))

    @app.post("/notes/<body>")
    def add(body: str) -> Any:
        db.session.add(Note(body=body))
        db.session.commit()
        return {"ok": True}

    @app.get("/notes")
    def notes() -> Any:
        read = db.engines["read"]
        with read.connect() as conn:
            count = len(conn.execute(select(Note.id)).all())
        return {"count": count}

    with app.app_context():
        assert isinstance(db.engine.pool, GreenpoolPool)
        assert isinstance(db.engines["read"].pool, GreenpoolPool)
        db.create_all()
    client = app.test_client()
    statuses: list[int] = []

    def post(i: int) -> None:
        statuses.append(client.post(f"/notes/n{i}").status_code)

    join_all([spawn(post, i) for i in range(20)], 60)
    assert statuses == [200] * 20
    assert client.get("/notes").get_json() == {"count": 20}
    assert pg.execute("SELECT count(*) FROM flask_notes") == [(20,)]
    for name in ("write", "read"):
        stats = pool.stats()["groups"][name]
        assert stats["in_use"] == 0 and stats["size"] <= 2
    assert server_conns(application_name="sqla-flask") <= 4
    pg.execute("DROP TABLE flask_notes")
