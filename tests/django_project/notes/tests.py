"""Run by ``manage.py test`` (tests/test_django.py): Django's own test runner on greenpool,
which creates and drops a test database through the backend."""

from django.db import connections
from django.test import TestCase

from notes.models import Note


class NotesTest(TestCase):
    databases = frozenset({"default", "replica"})

    def test_create_and_read(self):
        Note.objects.create(body="x")
        self.assertEqual(Note.objects.using("default").count(), 1)
        self.assertTrue(connections["default"].settings_dict["NAME"].startswith("test_"))
