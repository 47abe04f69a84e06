"""Browser tests of the JupyterLab experience (a package, so that its conftest.py does not shadow
tests/conftest.py, which other test files import as `conftest`)."""
