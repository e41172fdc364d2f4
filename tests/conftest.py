"""Loaded first in every test session, before any test runs."""

# hypothesis's pytest plugin imports hypothesis in its end-of-session summary, through pytest's
# assertion rewriting. On Debian 12's Python 3.11.2 compiling a module that late, in a long
# session with threads, can fail with "SystemError: AST constructor recursion depth mismatch"
# (CPython gh-106905, fixed in later 3.11 releases) and crash the whole run. Importing it here,
# while the session is young, leaves nothing for the summary to compile.
import hypothesis  # noqa: F401
