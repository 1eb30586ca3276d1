"""User-facing errors: the CLI prints these as one line, with no traceback."""


class UserError(Exception):
    """A problem with the user's input (config, data, paths, model id): one clear line."""


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass


class ModelError(UserError):
    pass


class UpdateRejected(Exception):
    """An incoming client update failed validation; the round goes on without it."""
