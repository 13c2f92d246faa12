"""The one exception type for mistakes a user can fix (params, data files, servers)."""


class UserError(Exception):
    """A problem the user caused or can fix; the CLI prints its message and exits 2."""
