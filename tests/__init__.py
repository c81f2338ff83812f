"""The test suite, a package so that test modules import shared code as ``tests.support``.

    .venv/bin/pytest -q                     # from the repository root (pyproject: testpaths = ["tests"])
    .venv/bin/pytest -q -m "not slow"       # skip the multi-epoch runs

Shared fixtures are in tests/conftest.py; shared functions and classes in tests/support/.
"""
