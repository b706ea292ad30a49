"""Exceptions raised for user mistakes, and the warning category for advice; each message says what to do."""


class ConceptrolError(ValueError):
    """A user input or setup problem that Conceptrol cannot work around."""


class ConceptNotFoundError(ConceptrolError):
    """The concept's tokens do not occur (within the token limit) in the prompt."""


class ConceptrolWarning(UserWarning):
    """Advice about a call that still runs (e.g. prompt words cut off by the text encoder's token limit).

    The command line prints these as one `conceptrol: warning: ...` line each.
    """
