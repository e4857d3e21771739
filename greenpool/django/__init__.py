"""Django on greenpool: ``'ENGINE': 'greenpool.django'`` in ``DATABASES``.

Each ``DATABASES`` alias is one greenpool group (``default`` -> the writes, a replica
alias -> the reads; :class:`greenpool.django.router.PrimaryReplicaRouter` routes between
them). Django's connection of an alias becomes a *loan* of that group: taken on the first
query of a request (or task), given back when Django closes it — at the end of every request
whatever ``CONN_MAX_AGE`` says, and at the latest when the greenlet or thread that took it
ends. See docs/django.md.

Django's own postgresql backend picks psycopg 3 when it is importable; greenpool's
connections are psycopg2's, so :mod:`greenpool.django.flavour` makes Django load that backend
on psycopg2 (see there).
"""
