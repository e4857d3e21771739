"""Views of the test project: reads through the router's replica alias, writes to default."""

import json

from django.db import connections, transaction
from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt

from notes.models import Note


def health(request):
    for alias in connections:
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT 1")
    return JsonResponse({"ok": True})


@csrf_exempt
def notes(request):
    if request.method == "POST":
        body = json.loads(request.body or b"{}").get("body", "")
        with transaction.atomic():
            note = Note.objects.create(body=body)
        return JsonResponse({"id": note.id, "db": note._state.db})
    return JsonResponse({"count": Note.objects.count()})


def note(request, note_id):
    found = Note.objects.filter(id=note_id).values_list("id", "body").first()
    if found is None:
        return JsonResponse({"error": "not found"}, status=404)
    return JsonResponse({"id": found[0], "body": found[1]})


def hold(request):
    """Keep a connection of ``alias`` busy for ``seconds``: load that fills the pool."""
    alias = request.GET.get("alias", "default")
    seconds = float(request.GET.get("seconds", "0.2"))
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT pg_sleep(%s)", [seconds])
    return JsonResponse({"held": seconds})


def spawn(request):
    """A greenlet spawned by hand runs a query and ends without closing its connection."""
    import gevent

    worker = gevent.spawn(lambda: Note.objects.using("default").count())
    worker.join(10)
    return JsonResponse({"count": worker.value})


def stats(request):
    """The worker's pools (touches no database): ``pid`` tells the workers apart."""
    import os

    from greenpool.django.pools import stats as pool_stats

    return JsonResponse({"pid": os.getpid(), **pool_stats()})


def stream(request):
    """Rows streamed after the view returned: the connection is used while the server
    iterates the response."""
    from django.http import StreamingHttpResponse

    rows = (f"{note.body}\n" for note in Note.objects.all().iterator(chunk_size=3))
    return StreamingHttpResponse(rows, content_type="text/plain")


def boom(request):
    """A view that raises inside an atomic block after a write."""
    with transaction.atomic(using="default"):
        Note.objects.using("default").create(body="boom")
        raise ValueError("the view failed")
