"""Explanation maps: where in an image a CLIP model finds a text or another image
(``explain``), by dense patch similarity, attention relevance or Grad-CAM, fitted to the image's
edges (``refine``); overlays and panels (``render``)."""

from clipforge.explanations.core import DEFAULT_METHOD, METHODS, explain, methods_for
from clipforge.explanations.refine import REFINES

__all__ = ["explain", "methods_for", "METHODS", "DEFAULT_METHOD", "REFINES"]
