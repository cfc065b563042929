"""Errors a user can act on. The `tinytrain` command prints them as one line,
`tinytrain <command>: error: ...`, and exits non-zero; anything else is a bug and keeps its
traceback (set TINYTRAIN_DEBUG=1 to see the traceback of these too)."""


class TinyTrainError(Exception):
    """Bad input or a state a user can fix; the message names the file, key or value."""


class ConfigError(TinyTrainError, ValueError):
    """A recipe or command-line value outside what it may be."""


class UnsupportedError(TinyTrainError, RuntimeError):
    """A setting this machine or installation cannot honour (a CUDA-only kernel on CPU, a missing package)."""


class CheckpointError(TinyTrainError, ValueError):
    """A checkpoint that is missing, damaged or not what the run expects."""


class TrainingError(TinyTrainError, RuntimeError):
    """Training cannot go on as configured (loss spikes with nothing to roll back to, a rollback to re-run)."""


def argument_parser(**kwargs):
    """An argparse parser whose errors are one line, `<prog>: error: ...` (exit code 2), without the
    usage block argparse prints first (`--help` still shows it)."""
    import argparse

    class OneLineErrors(argparse.ArgumentParser):
        def error(self, message: str):
            self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    return OneLineErrors(**kwargs)
