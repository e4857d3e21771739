"""``greenpool.throwaway``, announced by the 0.1.0 previews, still imports: the same objects as
:mod:`greenpool.testing.postgres`, with a warning that names the new place."""

from __future__ import annotations

import importlib
import sys

import pytest

from greenpool.testing import postgres


def test_the_old_module_name_gives_the_same_objects_and_a_deprecation_warning() -> None:
    sys.modules.pop("greenpool.throwaway", None)
    with pytest.warns(DeprecationWarning, match="greenpool.testing.postgres"):
        old = importlib.import_module("greenpool.throwaway")
    assert old.Cluster is postgres.Cluster
    assert old.free_port is postgres.free_port
