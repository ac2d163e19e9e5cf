"""The ``kvcompress`` console script, a module outside the package so that it runs before the package imports.

Importing :mod:`kvcompress` takes seconds (torch, transformers). Ctrl-C in those seconds must end with
the same one line and exit code 2 as later in the command (:func:`kvcompress.cli.main`), but the
``KeyboardInterrupt`` does not always reach us: an import it interrupts can leave a library half-initialized
and fail later with another error (numpy, then transformers' ``ModuleNotFoundError``). So the SIGINT
handler remembers that Ctrl-C was pressed, and any error after it is reported as the interrupt.
SIGTERM kills the process as usual until :func:`kvcompress.cli.main` runs: nothing is written before.
"""

import os
import signal
import sys

_pressed = False  # Ctrl-C arrived


def _on_sigint(signum, frame):
    global _pressed
    _pressed = True
    raise KeyboardInterrupt  # as Python's own handler does


def main() -> int:
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where Ctrl-C is ignored (a background job)
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        from kvcompress.cli import main as run

        code = run()  # its own Ctrl-C: one line, 2
    except BaseException:
        if not _pressed:
            raise
        print("kvcompress: interrupted; run the command again to start over", file=sys.stderr)
        code = 2
    if _pressed:
        # After an interrupt inside code an extension ran through Python's C API (torch's import does),
        # Python itself would end the process with SIGINT, whatever the exit code: end it here.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
