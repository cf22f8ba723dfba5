"""Errors that cross module and process boundaries, each naming what is wrong and where."""


class DatasetInvalid(ValueError):
    """The upload breaks a rule; the message names the object, its version and the rule.

    A step that raises it is `rejected` (core/steps.py): no retry can fix the upload.
    """


class PipelineError(ValueError):
    """A pipeline file with a mistake; the message names the file and the field."""
