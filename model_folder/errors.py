"""Errors about a model folder. Each message names the file or the key that is wrong."""


class ModelFolderError(ValueError):
    """A model folder that cannot be served: missing file, unknown architecture, bad key or shape."""
