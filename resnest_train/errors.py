"""User errors: every exception a CLI reports as one `error: ...` line with exit code 2."""


class UserError(Exception):
    """A mistake in what the user gave us (config, paths, data, checkpoints), not a bug of ours."""
