"""The one error type users see: a single line, exit status 2 from the CLI."""


class OmnimatteError(Exception):
    """Bad input or an impossible request; the message is one line that names
    the file or value at fault and what is wrong with it."""


def article(word: str) -> str:
    """``word`` with its indefinite article, for messages: "an expert", "a vae"."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"
