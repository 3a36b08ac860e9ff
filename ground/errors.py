"""Errors that end a task with one clear line."""

import errno

# a write that failed for want of room: disk full, quota, file size limit
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class NflabError(Exception):
    """A user-facing failure: the message says what was wrong and what to do."""

    exit_code = 1

    def __init__(self, message, *, hint=None, detail=None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.detail = detail

    def __str__(self):
        text = self.message
        if self.hint:
            text += f" ({self.hint})"
        return text


class SpecError(NflabError):
    """An extension definition or a command-line value is invalid."""

    exit_code = 2


class KernelError(NflabError):
    """A kernel cannot be resolved, fetched or used."""


class BuildError(NflabError):
    """Kbuild or the plugin compiler failed."""


class VMError(NflabError):
    """The lab VM failed: did not boot, crashed, or stopped answering."""

    exit_code = 3


class ArchiveError(NflabError):
    """The Debian archive cannot be used: a mirror is unreachable, a signature,
    checksum or size does not match, a suite is unknown, a .deb is unsafe."""


def write_failed(path, exc: OSError) -> ArchiveError:
    """An OSError writing *path* (a download, an unpacked package) as one line."""
    if exc.errno in _NO_ROOM:
        hint = f"free space on the disk of {path} (NFLAB_CACHE), or set NFLAB_CACHE to a larger one"
    else:
        hint = f"check that {path} can be written (NFLAB_CACHE)"
    return ArchiveError(f"cannot write {path}: {exc.strerror or exc}", hint=hint)
