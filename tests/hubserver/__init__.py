"""A small Hugging Face Hub-compatible HTTP server for tests, bound to loopback only.

``huggingface_hub`` and ``transformers`` talk to it for real (uploads through preupload + NDJSON commit, downloads
through ``/resolve``), so tests exercise the genuine client code paths without any network access.

* :mod:`tests.hubserver.storage` -- content-addressed, on-disk repositories (immutable commits, branches, tags);
* :mod:`tests.hubserver.app` -- the Starlette application speaking the Hub's HTTP API;
* :mod:`tests.hubserver.__main__` -- ``python -m tests.hubserver``, which prints ``HUB_URL=...`` once listening;
* :mod:`tests.hubserver.fixture` -- the ``hub_server`` / ``hub`` pytest fixtures.

This package is deliberately light to import: the server modules need ``starlette`` and ``uvicorn``, the fixture
module only the standard library and pytest (plus ``huggingface_hub``, imported when the ``hub`` fixture runs).
"""
