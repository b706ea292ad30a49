"""Exceptions raised for user mistakes; each message says what to do."""


class ConceptrolError(ValueError):
    """A user input or setup problem that Conceptrol cannot work around."""


class ConceptNotFoundError(ConceptrolError):
    """The concept's tokens do not occur (within the token limit) in the prompt."""
