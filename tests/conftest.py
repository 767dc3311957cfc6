"""Shared test set-up. Each area keeps its own fixtures in tests/<area>/conftest.py."""

import os

# Tests never reach a model hub: everything is built from configs or loaded from the repository.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
