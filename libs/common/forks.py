"""Keep forked children from stopping their parent service.

A service's event loop turns SIGINT/SIGTERM into a clean stop: asyncio (and uvloop, for every loop in the
main thread) installs a C-level handler that writes the signal number to a wakeup socket the loop reads.
A child made by `fork` (a multiprocessing pool of cleanlab, scikit-learn or joblib) inherits that handler
and that socket, so the SIGTERM with which a pool ends its workers reached the parent's loop as if the
service itself had been told to stop: the feedback+trainer process exited at the first label check.
`protect_from_forks` gives every forked child default signal handling and its own (no) wakeup socket.
"""

from __future__ import annotations

import os
import signal

_installed = False


def _in_child() -> None:
    signal.set_wakeup_fd(-1)  # the parent's wakeup socket is no business of the child's
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own: KeyboardInterrupt


def protect_from_forks() -> None:
    """Reset signal handling in every child this process forks from now on (idempotent)."""
    global _installed
    if not _installed:
        os.register_at_fork(after_in_child=_in_child)
        _installed = True
