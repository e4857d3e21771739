"""A minimal Django project on greenpool, for the tests and the benchmark.

``DATABASES`` is read as JSON from ``GREENPOOL_DJANGO_DATABASES``, so a test (or the
benchmark) points it at its throwaway servers and picks the ENGINE.
"""

import json
import os

SECRET_KEY = "greenpool-tests-only"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
TIME_ZONE = "UTC"
ROOT_URLCONF = "djproject.urls"
WSGI_APPLICATION = "djproject.wsgi.application"
INSTALLED_APPS = ["django.contrib.contenttypes", "notes"]
MIDDLEWARE = ["notes.middleware.DatabaseErrorsAs503"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DATABASES = json.loads(os.environ.get("GREENPOOL_DJANGO_DATABASES", "{}"))
if os.environ.get("GREENPOOL_DJANGO_ROUTER", "1") == "1" and "replica" in DATABASES:
    DATABASE_ROUTERS = ["greenpool.django.router.PrimaryReplicaRouter"]
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"greenpool": {"handlers": ["console"], "level": "WARNING"}},
}
