"""User-facing errors: one clear line and exit code 2 from the CLI, never a traceback."""


class UserError(Exception):
    """A mistake in the user's input (config, data, paths); the message names the thing and the fix."""

    exit_code = 2
