"""Test-wide settings: never touch the network or the user's Hugging Face cache.

Every test runs with ``HF_HUB_OFFLINE=1`` and a private ``HF_HOME``; tests that need a Hub use the
``hub`` fixture, which points huggingface_hub at the local server on 127.0.0.1 instead.
"""

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="delta-format-tests-hf-home-"))
os.environ.pop("HF_TOKEN", None)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["tests.hubserver.fixture"]
