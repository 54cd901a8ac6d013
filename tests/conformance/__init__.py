"""The conformance matrix: every job shape on every engine, one result frame.

A package (not a folder of loose modules) so its ``conftest`` does not take
the place of ``tests/conftest.py`` as the module ``conftest`` the other test
files import their helpers from.
"""
