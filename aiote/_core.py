"""The native module and the mapping from its return codes to exceptions."""

from __future__ import annotations

import errno as _errno
import os as _os

from . import errors

# libfabric pulls in libinfinipath (Debian's build links its psm provider), whose
# load-time constructor replaces the handlers of SIGSEGV, SIGBUS, SIGILL, SIGABRT,
# SIGINT and SIGTERM with one that prints a backtrace and calls exit(1): a crash
# then leaves no core and no faulthandler dump and reads as "exit code 1", SIGTERM
# exits 1 instead of dying of the signal, and Ctrl-C no longer raises
# KeyboardInterrupt.  This variable, read by that constructor, keeps the process's
# own handlers (docs/reliability.md, "Signals").
_os.environ.setdefault("IPATH_NO_BACKTRACE", "1")

from ._native import ffi, lib  # noqa: E402

__all__ = ["ffi", "lib", "check", "error_for", "last_error"]

# errnos that mean "the other side is gone or can't be reached"
_PEER_ERRNOS = {
    _errno.ECONNRESET,
    _errno.ENOTCONN,
    _errno.ECONNREFUSED,
    _errno.ECONNABORTED,
    _errno.EHOSTUNREACH,
    _errno.ENETUNREACH,
    _errno.EPIPE,
    _errno.ETIMEDOUT,
    _errno.EHOSTDOWN,
    _errno.ENETDOWN,
}


def last_error() -> str:
    return ffi.string(lib.aiote_last_error()).decode(errors="replace")


def fi_strerror(fi_errno: int) -> str:
    return ffi.string(lib.aiote_fi_strerror(fi_errno)).decode(errors="replace")


def error_for(code: int, message: str, *, fi_errno: int = 0, prov_errno: int = 0,
              index: int | None = None, nic: int | None = None) -> errors.AioteError:
    """Build the exception for a negative AIOTE_E_* code."""
    code = -code
    if code == lib.AIOTE_E_PROVIDER:
        if fi_errno:
            message = f"{message}: {fi_strerror(fi_errno)} (fi_errno {fi_errno})" if message else (
                f"{fi_strerror(fi_errno)} (fi_errno {fi_errno})")
        cls = errors.PeerUnreachable if fi_errno in _PEER_ERRNOS else errors.ProviderError
        return cls(message, fi_errno=fi_errno, prov_errno=prov_errno, index=index, nic=nic)
    if code == lib.AIOTE_E_BOUNDS:
        return errors.OutOfBounds(message, index=index)
    if code == lib.AIOTE_E_NO_MR:
        return errors.RegionClosed(message)
    if code == lib.AIOTE_E_BUSY:
        return errors.RegionInUse(message)
    if code == lib.AIOTE_E_CLOSED:
        return errors.EngineClosed(message or "engine is closed")
    if code == lib.AIOTE_E_PEER:
        return errors.PeerUnreachable(message, index=index)
    if code == lib.AIOTE_E_TOO_BIG:
        return errors.MessageTooLarge(message)
    if code == lib.AIOTE_E_INVAL:
        return errors.InvalidArgument(message)
    if code == lib.AIOTE_E_CUDA:
        from .cuda import CudaError

        if prov_errno:
            message = f"{message}: CUDA error {prov_errno}"
        return CudaError(message, prov_errno)
    return errors.AioteError(f"{message} (code {code})")


def check(rc: int, what: str = "", index: int | None = None) -> int:
    """Raise the typed error for a negative return code; return rc otherwise."""
    if rc >= 0:
        return rc
    msg = last_error() or what
    if what and what not in msg:
        msg = f"{what}: {msg}"
    raise error_for(rc, msg, index=index)
