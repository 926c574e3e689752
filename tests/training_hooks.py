"""How a test attaches its hooks to a training it starts as a process of its own (tests/hooks/sitecustomize.py)."""

from __future__ import annotations

import os
from pathlib import Path

HOOKS = Path(__file__).resolve().parent / "hooks"


def with_hooks(env: dict, **hooks: str) -> dict:
    """``env`` with tests/hooks on PYTHONPATH and ``hooks`` set, e.g. ``SEGPIPE_TEST_HOLD_S="120"``."""
    return {**env, **hooks, "PYTHONPATH": os.pathsep.join(filter(None, [str(HOOKS), env.get("PYTHONPATH")]))}
