"""Shared fixtures: a fixed seed per test (printed on failure), numpy mode, tiny models."""
from __future__ import annotations

import os
import random

import numpy as onp
import pytest

# Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning threads
# made MXNet steps tens of times slower.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import mxnet as mx  # noqa: E402

SEED = int(os.environ.get('GLUON_BERT_TEST_SEED', '0'))


@pytest.fixture(autouse=True)
def seed_everything(request):
    """Seed every generator; a failure prints how to rerun with the same seed."""
    random.seed(SEED)
    onp.random.seed(SEED)
    mx.random.seed(SEED)
    yield
    rep = getattr(request.node, 'rep_call', None)
    if rep is not None and rep.failed:
        print(f'\nreproduce with: GLUON_BERT_TEST_SEED={SEED} pytest "{request.node.nodeid}"')


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, 'rep_' + rep.when, rep)


@pytest.fixture
def np_mode():
    """The book's mode: `npx.set_np()` for the duration of one test."""
    from mxnet import npx
    npx.set_np()
    yield
    npx.reset_np()


@pytest.fixture(params=[False, True], ids=['imperative', 'hybridized'])
def hybridize(request):
    return request.param


@pytest.fixture
def server():
    """A local HTTP server on 127.0.0.1 (data_fixtures.local_server) for download tests."""
    from data_fixtures import local_server
    with local_server() as srv:
        yield srv
