from django.urls import path
from notes import views

urlpatterns = [
    path("health", views.health),
    path("notes/", views.notes),
    path("notes/<int:note_id>", views.note),
    path("hold/", views.hold),
    path("spawn/", views.spawn),
    path("stats/", views.stats),
    path("stream/", views.stream),
    path("boom/", views.boom),
]
