"""Suite-wide setup."""

from __future__ import annotations

import importlib.util


def pytest_configure(config) -> None:
    # transformers' logger makes its stderr handler on first use and keeps it: made inside a test that
    # captures with capsys, it would write to that test's stream after it is closed ("--- Logging error ---"
    # on a later test's stderr). Making it now binds it to the session's stderr.
    if importlib.util.find_spec("transformers") is not None:
        from transformers.utils import logging

        logging.get_verbosity()
