"""litellm for the tests that need it: imported without network access, skipped where it is not installed.

It lives in its own venv (.ci/run makes `.venv-litellm`); REQUIRE_LITELLM=1 turns the skip into a failure
there, so that CI cannot pass by silently skipping."""

from __future__ import annotations

import os
import warnings
from types import ModuleType

import pytest

# LiteLLM's bundled cost map (it would fetch one at import) and no .env read into the environment.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_MODE", "PRODUCTION")


def import_litellm() -> ModuleType:
    try:
        with warnings.catch_warnings():  # pydantic's notes on LiteLLM's own types, at import
            warnings.filterwarnings("ignore", message=".*ReadOnly. qualifier", category=UserWarning)
            import litellm
    except ImportError:
        reason = "litellm is not installed (its tests run in a venv of their own: pip install '.[litellm,test,litellm-test]')"
        if os.environ.get("REQUIRE_LITELLM") == "1":
            pytest.fail(f"REQUIRE_LITELLM=1 but {reason}", pytrace=False)
        pytest.skip(reason, allow_module_level=True)
    return litellm
