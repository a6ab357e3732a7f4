"""What writing outputs shares across quadapt: the process's umask, and the mode it gives a new file.

Not every writer follows the umask (safetensors' `save_file` makes 0600 whatever it is), and a
checkpoint or adapter written owner-only cannot be read by a server running as another user. So
quadapt's writers give what they wrote the mode the umask gives a new file. This file writes
nothing itself.
"""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process's file mode creation mask.

    POSIX offers no call that only reads it: `os.umask` sets a new mask and returns the old one,
    so this sets one and puts the old back at once. The mask is process-wide, so a file another
    thread creates in between gets the transient mask; 0o077 (owner only) is used rather than 0,
    so such a file is at worst too private, never world-writable.

    Returns:
        The umask, e.g. 0o022.
    """
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> None:
    """Give the file at `path` the mode the umask gives a new file (`0o666 & ~umask`)."""
    path.chmod(0o666 & ~current_umask())
