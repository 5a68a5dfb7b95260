"""Deprecated location of :mod:`memwatch.apps.toymodels` (the toy models live with the demo).

Kept so that configs and code written for earlier releases (``memwatch.toymodels.DDPMModule``)
keep working; importing it warns.
"""

import warnings

from memwatch.apps.toymodels import *  # noqa: F403 - the whole public surface, unchanged
from memwatch.apps.toymodels import __all__  # noqa: F401

warnings.warn(
    "memwatch.toymodels moved to memwatch.apps.toymodels; import it from there",
    DeprecationWarning,
    stacklevel=2,
)
