"""What the ports' tests share: which frameworks are installed, as pytest parameters."""
from __future__ import annotations

import importlib

import pytest


def installed(module):
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


# Skipped at collection, so that the MXNet fixtures are not built for nothing.
FRAMEWORKS = [pytest.param(fw, marks=pytest.mark.skipif(not installed(fw),
                                                        reason=f'{fw} is not installed'))
              for fw in ('torch', 'jax')]
