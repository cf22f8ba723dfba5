"""Errors shared by the steps: a rejected dataset names the object, its version and the broken rule."""


class DatasetInvalid(ValueError):
    """The upload breaks a rule; the message names the object, its version and the rule."""
