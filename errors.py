"""The one exception type that means "the user asked for something we cannot do".

Entry points catch it, print its message as one line on stderr and exit with status 2.
Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input or a missing prerequisite, explained in one line."""


def first_line(exc, limit=None):
    """An exception's message cut to its first line (and `limit` characters), for one-line errors."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]


def offline():
    """SUITE_OFFLINE=1 forbids any download attempt (pretrained weights, datasets): on a
    firewalled machine a download can hang instead of failing."""
    import os
    return os.environ.get("SUITE_OFFLINE", "") not in ("", "0")


EXIT_BAD_INPUT = 2
EXIT_NON_FINITE = 3
EXIT_WRITE_FAILED = 4
EXIT_OUT_OF_MEMORY = 5


def run_main(main, argv=None):
    """Run an entry point's main(argv): bad input -> one stderr line and exit status 2; a run
    stopped by SIGINT/SIGTERM (checkpoint saved) -> 130/143; non-finite training -> 3; a file
    that could not be written or read (full disk, no permission) -> 4, and out of memory (a batch or
    model too large for the GPU) -> 5, one line each."""
    import errno
    import sys
    from files import WriteError
    from training.loop import NonFiniteError, StopRequested
    try:
        return main(argv) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NON_FINITE
    except WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_WRITE_FAILED
    except OSError as e:  # the machine's, not the code's: a full disk, a folder without permission
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM,
                           errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
        print(f"error: {e.strerror}: {e.filename}", file=sys.stderr)
        return EXIT_WRITE_FAILED
    except (MemoryError, RuntimeError) as e:
        import torch
        # torch's GPU allocator raises OutOfMemoryError, its CPU allocator a plain RuntimeError
        if isinstance(e, RuntimeError) and not (isinstance(e, torch.OutOfMemoryError)
                                                or "can't allocate memory" in str(e)):
            raise
        print(f"error: out of memory ({first_line(e, 160)}): a smaller --batch_size, image size or model fits; checkpoints "
              f"already saved are intact", file=sys.stderr)
        return EXIT_OUT_OF_MEMORY
    except StopRequested as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 143 if str(e).startswith("SIGTERM") else 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
