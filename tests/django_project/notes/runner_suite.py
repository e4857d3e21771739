"""Django's own test classes on greenpool.django (run by tests/test_django_processes.py as
``manage.py test notes.runner_suite --parallel N``; not found by the default ``test*.py``
pattern, so ``manage.py test notes`` runs only tests.py)."""

from django.db import connection, transaction
from django.test import TestCase, TransactionTestCase

from notes.models import Note


class InATestCase(TestCase):
    databases = frozenset({"default", "replica"})

    def test_writes_roll_back_between_tests(self):
        Note.objects.using("default").create(body="a")
        self.assertEqual(Note.objects.using("default").count(), 1)

    def test_on_commit_captured(self):
        ran = []
        with self.captureOnCommitCallbacks(execute=True), transaction.atomic():
            transaction.on_commit(lambda: ran.append(1))
        self.assertEqual(ran, [1])


class InATransactionTestCase(TransactionTestCase):
    databases = frozenset({"default", "replica"})

    def test_commits_and_survives_close(self):
        with transaction.atomic():
            Note.objects.using("default").create(body="b")
        connection.close()
        self.assertEqual(Note.objects.using("default").count(), 1)


class ThroughTheRouter(TestCase):
    databases = frozenset({"default", "replica"})

    def test_reads_its_write(self):
        Note.objects.create(body="c")
        self.assertEqual(Note.objects.count(), 1)
