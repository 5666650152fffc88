"""SIGTERM (what schedulers and ``kill`` send) closes every open cockpit cleanly, then the process does
what it would have done without the cockpit.

While at least one cockpit is open, one handler is installed for SIGTERM (from the main thread only:
Python allows signal handlers nowhere else). On SIGTERM it closes the open cockpits (instruments'
final records, every sink flushed and closed; an error there never stops what follows) and then
hands the signal on to the handler that was installed before:

- ``SIG_DFL``: that handler is restored and the signal raised again with ``os.kill``, so the process
  dies of SIGTERM with the same exit status (-15 as seen by ``subprocess``; 143 in a shell);
- a Python callable (a framework's own handler): it is called with the same arguments.

Nothing is installed where SIGTERM is ignored (``SIG_IGN``: the run must go on) or handled outside
Python (``signal.getsignal`` returns None: it could not be handed on). A cockpit attached after
someone installed another handler over this one puts this one first again (that handler is then the
one handed on to). The handler is removed when the last open cockpit closes (a cockpit dropped
without closing no longer counts once it is garbage collected), unless another handler was installed
over it meanwhile. A handler that chains back into this one gets the default action, not a loop.
"""

from __future__ import annotations

import os
import signal
import threading
import weakref
from collections.abc import Callable
from typing import Any

_lock = threading.RLock()  # re-entrant: the handler runs in the main thread, which may hold it
_closers: dict[int, weakref.WeakMethod | Callable[[], None]] = {}
_next_token = 0
_previous: Any = None  # the handler before ours, while ours is installed
_installed = False
_handling = False
_pid = os.getpid()  # the process that installed the handler (a forked DataLoader worker inherits it)


def _on_sigterm(signum: int, frame: Any) -> None:
    global _handling
    if _handling:  # a handler installed over ours chained back to it: no loop, the default action
        _hand_on(signal.SIG_DFL, signum, frame)
        return
    previous = _previous if _installed else signal.SIG_DFL
    _handling = True
    try:
        if os.getpid() == _pid:  # a forked child holds copies of the cockpits: they are the parent's to close
            for token in sorted(_closers, reverse=True):  # the latest cockpit first, like nested ``with``
                ref = _closers.pop(token, None)
                close = ref() if isinstance(ref, weakref.WeakMethod) else ref
                if close is None:
                    continue
                try:
                    close()
                except BaseException:  # noqa: BLE001 - the signal must be handed on whatever closing does
                    pass
    finally:
        _handling = False
    _hand_on(previous, signum, frame)


def _hand_on(previous: Any, signum: int, frame: Any) -> None:
    """Do what the process would have done without the cockpit."""
    global _installed
    if callable(previous):
        if signal.getsignal(signum) is _on_sigterm:
            signal.signal(signum, previous)
            _installed = False
        previous(signum, frame)
    else:  # SIG_DFL (SIG_IGN and None are never chained: nothing is installed over them)
        signal.signal(signum, signal.SIG_DFL)
        _installed = False
        os.kill(os.getpid(), signum)


def on_sigterm(close: Callable[[], None]) -> int | None:
    """Call ``close`` (held weakly when it is a bound method) on SIGTERM before handing the signal on.

    Returns a token for :func:`release`, or None when nothing was installed (not the main thread,
    SIGTERM ignored or handled outside Python, or a platform without SIGTERM)."""
    global _next_token, _previous, _installed, _pid
    if not hasattr(signal, "SIGTERM") or threading.current_thread() is not threading.main_thread():
        return None
    with _lock:
        if _pid != os.getpid():  # a forked child: the cockpits inherited are the parent's
            _closers.clear()
            _pid = os.getpid()
        current = signal.getsignal(signal.SIGTERM)
        if current is signal.SIG_IGN or current is None:
            return None
        if current is not _on_sigterm:  # first, or someone installed a handler over ours: ours goes first
            signal.signal(signal.SIGTERM, _on_sigterm)
            _previous, _installed = current, True
        _next_token += 1
        token = _next_token
        if hasattr(close, "__self__"):  # a bound method (Cockpit.close): a cockpit never closed is not kept
            _closers[token] = weakref.WeakMethod(close, lambda _: _closers.pop(token, None))
        else:
            _closers[token] = close
        return token


def release(token: int | None) -> None:
    """Forget the closer of ``token``; the last one removes the handler (if it is still installed)."""
    global _installed, _previous
    if token is None:
        return
    with _lock:
        _closers.pop(token, None)
        if _closers or not _installed:
            return
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is _on_sigterm:
            signal.signal(signal.SIGTERM, _previous)
            _previous, _installed = None, False
