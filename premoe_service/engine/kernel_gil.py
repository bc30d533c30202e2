"""Inductor's CPU kernels run without Python's GIL, so that the server's other threads run while the engine computes.

In its default (Python wrapper) mode, inductor calls each generated C++ kernel of a compiled graph through a small
Python binding that keeps the GIL for the whole call; aten's own operators release it while they compute. The
engine's compiled step spends much of its time in such kernels (the attention and experts loops of each layer), so
the embedder's, the router signal's and the doors' Python waited for them: in a routed 16-client round the engine's
thread held the GIL 42% of the time (`py-spy --gil`), a fifth of it in these kernels. `release_gil_in_kernels`
makes the binding read its arguments with the GIL held, as before, and release it around the kernel only. The
kernels touch only the tensors they are given, which the graph's frame keeps alive; no Python object is read while
the GIL is away (inductor's own C++ wrapper mode releases the GIL around a whole graph the same way).

The binding is part of the source inductor compiles and hashes, so kernels built before (its disk cache) are not
mixed with these. Where the template is not the one this was written for (another torch), nothing changes.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)

# The call inductor 2.13's binding makes: the kernel with its arguments parsed in place, under the GIL.
HOLDING = "kernel({}); Py_RETURN_NONE;"

# The arguments are still parsed under the GIL (a lambda's arguments are evaluated before its body); the kernel runs
# with the GIL released, given back when the call ends even if the kernel throws (a guard object's destructor).
RELEASING = (
    "{{ struct premoe_unlocked {{ PyThreadState* state; premoe_unlocked() : state(PyEval_SaveThread()) {{}} "
    "~premoe_unlocked() {{ PyEval_RestoreThread(state); }} }}; "
    "auto premoe_call = [&](auto... premoe_args) {{ premoe_unlocked premoe_guard; kernel(premoe_args...); }}; "
    "premoe_call({}); }} Py_RETURN_NONE;"
)

_lock = threading.Lock()


def release_gil_in_kernels() -> bool:
    """Have inductor's CPU kernel bindings compiled from now on release the GIL while the kernel runs. Idempotent;
    returns whether they do."""
    try:
        from torch._inductor.codecache import CppPythonBindingsCodeCache
    except ImportError:  # pragma: no cover - torch without inductor
        return False
    with _lock:
        current = CppPythonBindingsCodeCache.call_entry_function
        if current == RELEASING:
            return True
        if current != HOLDING:
            log.info("inductor's kernel binding is not the one known here: its kernels keep the GIL")
            return False
        CppPythonBindingsCodeCache.call_entry_function = RELEASING
        return True
