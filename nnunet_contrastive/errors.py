"""The one exception type for bad user input.

Every check of something a user provides (images, metadata.csv, split files, plans overrides, checkpoints, text
files, command-line values) raises a `UserInputError`, or one of its subclasses that name the kind of input
(`MetadataError`, `ConversionError`, `LabeledSubsetError`, ...). Its message says what is wrong, where (file,
line, case, key) and how to fix it. `nnunet-contrastive` prints it as one `error:` message and exits with code 1,
without a traceback; any other exception is a bug and keeps its traceback. Inside nnU-Net's own commands
(`nnUNetv2_train`), our trainers raise the same errors at start-up.
"""
from __future__ import annotations


class UserInputError(ValueError):
    """Bad input from the user. `str(error)` is the whole message: `where: what fix`.

    Subclasses keep the one-argument form (`raise MetadataError("metadata.csv, line 3: ...")`); `where` and `fix`
    are optional parts for new code.
    """

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(format_message(what, where, fix))


def format_message(what: str, where: str | None = None, fix: str | None = None) -> str:
    """`where: what fix`, leaving out the parts that are None."""
    text = f"{where}: {what}" if where else what
    return f"{text} {fix}" if fix else text
