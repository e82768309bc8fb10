"""SRPU: a self-improving segmentation platform for SEM micrographs."""

import os

# albumentations looks up new releases online at import; this machine has no internet.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
