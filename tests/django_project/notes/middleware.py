"""A database error becomes a 503 naming the error (the pool's, when it was the pool's)."""

from django.db import Error
from django.http import JsonResponse


class DatabaseErrorsAs503:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exc):
        if not isinstance(exc, Error):
            return None
        cause = exc.__cause__ or exc
        return JsonResponse({"error": type(cause).__name__, "message": str(cause)[:500]},
                            status=503)
