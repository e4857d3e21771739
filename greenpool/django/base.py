"""``DatabaseWrapper`` for ``'ENGINE': 'greenpool.django'``: Django's postgresql backend
(on psycopg2) whose connections are greenpool loans.

What changes against Django's backend, and why:

* ``get_new_connection`` borrows from the alias's group (fair, bounded wait: ``timeout``,
  then ``PoolTimeout``, which Django raises as ``django.db.utils.OperationalError``) instead
  of connecting. ``_close`` gives the loan back instead of closing the connection.
* ``close_if_unusable_or_obsolete`` (Django's end-of-request hook) always gives the loan
  back: a loan never outlives its request, whatever ``CONN_MAX_AGE`` says. Keeping
  connections open between requests is the pool's job (``max_idle``, ``max_lifetime``), and
  under gevent each request is a new greenlet, so a connection kept "for the thread" would
  only be leaked.
* ``pool`` is always None: Django's own psycopg 3 pool never sits on top of greenpool's.
* ``set_autocommit`` without a connection (``atomic()`` ends so after a lost connection)
  records the wish for the next loan instead of borrowing one just to flip the flag.
* The no-database alias Django uses to create and drop test databases connects directly,
  outside the pool, and first closes this process's pools: no pooled session may block the
  ``DROP DATABASE``.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db.backends.base.base import NO_DB_ALIAS

from .. import pooler
from .flavour import postgresql_base
from .loans import Loan
from .pools import DJANGO_KEYS, ENDPOINT_KEYS, GROUP_KEYS, POOL_KEYS, close_all, group_for

_postgresql = postgresql_base()
#: OPTIONS keys that are greenpool's, not libpq's (``sslmode`` is both)
_OURS = (GROUP_KEYS | ENDPOINT_KEYS | POOL_KEYS | {
    "greenpool", "servers", "MAX_CONNS", "REUSE_CONNS",
}) - {"sslmode", "options"} - DJANGO_KEYS


class _GivenBack:
    """Stands in for the connection after it went back to the pool inside an atomic block
    (Django keeps ``connection`` set until the block ends): any use fails loudly instead of
    reaching a connection another greenlet may hold by now."""

    closed = 1
    autocommit = True

    def __getattr__(self, name: str) -> Any:
        raise _postgresql.Database.InterfaceError(
            "connection already given back to greenpool (closed inside an atomic block)"
        )


_DjangoWrapper: Any = _postgresql.DatabaseWrapper


class DatabaseWrapper(_DjangoWrapper):
    display_name = "PostgreSQL (greenpool)"
    autocommit: bool  # Django's, set in its __init__

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._loan: Loan | None = None
        #: autocommit asked for while there was no connection: applied by the next loan
        self._wanted_autocommit: bool | None = None
        #: set by the router when this task wrote here: its reads come here too until the
        #: loan ends (see router.py)
        self.greenpool_wrote = False

    @property
    def pool(self) -> None:
        return None

    def _pooled(self) -> bool:
        return self.alias != NO_DB_ALIAS and self.settings_dict.get("NAME") is not None

    def get_connection_params(self) -> dict[str, Any]:
        """Django's parameters without greenpool's OPTIONS (used only by the direct
        connection of the no-database alias; a pooled loan is configured by the pool)."""
        options = self.settings_dict.get("OPTIONS") or {}
        if "pool" in options:
            raise ImproperlyConfigured(
                f"DATABASES[{self.alias!r}]['OPTIONS']['pool']: that is Django's own psycopg 3 "
                f"pool; with ENGINE 'greenpool.django' greenpool is the pool. Remove 'pool'"
            )
        params: dict[str, Any] = super().get_connection_params()
        for key in _OURS:
            params.pop(key, None)
        return params

    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        if not self._pooled():
            # Django connects without a database only to create or drop one (test runs,
            # management commands): no pooled session may stand in the way of a DROP
            # DATABASE, and the test runner leaves mirror aliases naming the dropped test
            # database. The pools are made again on next use.
            close_all()
            return super().get_new_connection(conn_params)
        level = (self.settings_dict.get("OPTIONS") or {}).get("isolation_level")
        read_committed = _postgresql.IsolationLevel.READ_COMMITTED
        if level is not None and _postgresql.IsolationLevel(level) != read_committed:
            raise ImproperlyConfigured(
                f"DATABASES[{self.alias!r}]['OPTIONS']['isolation_level']: greenpool.django "
                f"lends connections at the server's default isolation; set "
                f"default_transaction_isolation with ALTER ROLE or ALTER DATABASE instead, or "
                f"use transaction-level SET TRANSACTION ISOLATION LEVEL"
            )
        self.isolation_level = read_committed
        group = group_for(self.alias, self.settings_dict, self.timezone_name)
        loan = self._loan = Loan(group, None)
        raw = loan.raw
        if (self.settings_dict.get("OPTIONS") or {}).get("assume_role") and self._shared_server():
            self._loan = None
            loan.give_back()
            raise ImproperlyConfigured(
                f"DATABASES[{self.alias!r}]['OPTIONS']['assume_role']: refused behind a "
                f"pooler in transaction mode (or of unknown mode): its SET ROLE would stay on "
                f"a server connection that other clients' transactions get, so they would run "
                f"as that role. Log in as the role instead (USER), or give the pooler its own "
                f"database entry for it")
        if not getattr(raw, "_greenpool_django_jsonb", False):
            # as Django's backend does: JSONField decodes the text itself (once per
            # connection: the typecaster stays registered across loans)
            _postgresql.psycopg2.extras.register_default_jsonb(
                conn_or_curs=raw, loads=lambda x: x
            )
            raw._greenpool_django_jsonb = True
        return raw

    def connect(self) -> None:
        super().connect()  # sets the alias's AUTOCOMMIT setting
        wanted, self._wanted_autocommit = self._wanted_autocommit, None
        if wanted is not None and wanted != self.autocommit:
            self.set_autocommit(wanted)

    def set_autocommit(
        self, autocommit: bool, force_begin_transaction_with_broken_autocommit: bool = False
    ) -> None:
        """Without a connection, only record the wish for the next loan. Django calls this
        at the end of ``atomic()`` after a lost connection was closed: borrowing a loan
        just to flip the flag would wait for a healthy server (up to the acquire timeout)
        and then replace the error in flight with the pool's."""
        if self.connection is not None or not self._pooled():
            super().set_autocommit(autocommit, force_begin_transaction_with_broken_autocommit)
            return
        self.validate_no_atomic_block()
        self._wanted_autocommit = self.autocommit = autocommit
        if autocommit and self.run_commit_hooks_on_set_autocommit_on:  # as Django does
            self.run_and_clear_commit_hooks()
            self.run_commit_hooks_on_set_autocommit_on = False

    def close(self) -> None:
        self._wanted_autocommit = None  # a new connection starts from the AUTOCOMMIT setting
        super().close()

    def _shared_server(self) -> bool:
        """Whether this loan's session state would stay on a server connection other
        clients' transactions get: a pooler in transaction mode, or of unknown mode."""
        loan = self._loan
        pc = loan.pc if loan is not None else None
        return pc is not None and pooler.mode_of(pc.endpoint.config) == pooler.TRANSACTION

    def create_cursor(self, name: str | None = None) -> Any:
        if name and self.connection is not None and self.connection.autocommit and (
                self._shared_server()):
            # a server-side cursor in autocommit is WITH HOLD: an unfinished iterator would
            # leave it open on a server connection the pooler gives others, and its next
            # fetch may reach another server connection. The rows come in one go instead
            # (Django's DISABLE_SERVER_SIDE_CURSORS, decided per loan)
            return super().create_cursor(None)
        return super().create_cursor(name)  # (a WITH HOLD one marks the loan dirty)

    def _commit(self) -> None:
        loan = self._loan
        if loan is not None and loan.bound is not None and self.connection is not None:
            with self.wrap_database_errors, loan.deadline():  # as every statement's
                return self.connection.commit()
        return super()._commit()

    def _rollback(self) -> None:
        loan = self._loan
        if loan is not None and loan.bound is not None and self.connection is not None:
            with self.wrap_database_errors, loan.deadline():
                return self.connection.rollback()
        return super()._rollback()

    def _close(self) -> None:
        loan = self._loan
        if loan is None:
            return super()._close()
        self._loan = None
        self.greenpool_wrote = False
        try:
            with self.wrap_database_errors:
                loan.give_back()
        finally:
            if self.in_atomic_block:
                self.connection = _GivenBack()

    def close_if_unusable_or_obsolete(self) -> None:
        if self._loan is not None:
            self.close()  # the end of a request ends its loan, whatever CONN_MAX_AGE says
        else:
            super().close_if_unusable_or_obsolete()
