"""Which TransformerLens cdist runs on, checked before it is imported.

cdist is built on ``HookedTransformer``, which TransformerLens 4.0 (September 2026) removed in
favour of its ``TransformerBridge``; ``pyproject.toml`` pins ``transformer_lens>=3.9,<4``. An
environment that has 4.x anyway (installed later, or cdist installed with ``--no-deps``) gets one
line saying so and how to fix it, instead of an ``ImportError`` from deep inside. Moving to the
bridge would touch ``cdist.models`` alone: it is the only package that imports TransformerLens
(``tests/code_shape.py`` holds that), and everything else reads heads through its hook names.
"""

from __future__ import annotations

import importlib.metadata
import re

from cdist.errors import CdistError

__all__ = ["SUPPORTED", "TransformerLensVersionError", "check_transformer_lens"]

SUPPORTED = ">=3.9,<4"


class TransformerLensVersionError(CdistError, ImportError):
    """TransformerLens is missing or of a version without ``HookedTransformer``."""


def check_transformer_lens(version: str | None = None) -> str:
    """The installed TransformerLens version (or ``version``), if cdist runs on it.

    Raises:
        TransformerLensVersionError: not installed, or not 3.9 or a later 3.x.
    """
    fix = f"pip install 'transformer_lens{SUPPORTED}'"
    if version is None:
        try:
            version = importlib.metadata.version("transformer_lens")
        except importlib.metadata.PackageNotFoundError:
            raise TransformerLensVersionError(f"TransformerLens is not installed; {fix}") from None
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None or not (int(m[1]) == 3 and int(m[2]) >= 9):
        raise TransformerLensVersionError(
            f"cdist needs TransformerLens 3.9 or a later 3.x (its HookedTransformer, which "
            f"TransformerLens 4 removed); this environment has {version}: {fix}")
    return version


# checked when cdist.models imports this module, before it imports TransformerLens
check_transformer_lens()
