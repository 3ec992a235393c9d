"""One exception type for every user-facing failure.

Raise ``HarnessError`` with a message that names the file, line or key at fault and what to
do about it; the CLI prints it as one line and exits 2, the pytest plugin reports it as a
collection error or a failed item, never as a traceback.
"""


class HarnessError(Exception):
    """A problem with the user's input (file, flag, spec, checkpoint) rather than a bug."""


def load_failure(path: object, err: BaseException, what: str) -> str:
    """One whole sentence for a file that ``torch.load``/safetensors could not read.

    A pickle that needs code to load (torch names the refused global) is named as such, and
    never with torch's advice to load it unsafely; anything else says what the file should be.
    """
    import re

    text = str(err)
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused:
        return (f"{path} contains Python objects ({refused.group(1)}) that safe loading refuses; the harness "
                f"never runs pickled code: re-save the {what} as tensors and plain values")
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    if len(first) > 160:
        first = first[:first.rfind(" ", 0, 160)] + " ..."
    return f"{path} is not a readable {what} ({type(err).__name__}: {first})"
