"""`cirlab ARGS` run through `main()` in the test's own process: the same parsing, dispatch and error handling as
the installed command, without a new interpreter (and torch and transformers imported again) per call. Tests
start real subprocesses only where a process must be killed or must serve."""
from __future__ import annotations

import contextlib
import io
import os
import traceback
from types import SimpleNamespace


def run_cli(*args, cwd=None, env: dict | None = None) -> SimpleNamespace:
    """`returncode`, `stdout` and `stderr` as `subprocess.run(..., capture_output=True, text=True)` gives them:
    an exception that escapes `main()` is written to stderr as the interpreter would write it (a traceback, code
    1), and argparse's exit becomes its code."""
    from cirlab.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    old_cwd, old_env = os.getcwd(), dict(os.environ)
    try:
        if cwd is not None:
            os.chdir(cwd)
        os.environ.update(env or {})
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:  # noqa: BLE001 - shown the way an uncaught exception would be
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
