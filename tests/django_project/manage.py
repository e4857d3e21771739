#!/usr/bin/env python
"""The test project's manage.py (DATABASES come from GREENPOOL_DJANGO_DATABASES: see settings)."""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djproject.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
