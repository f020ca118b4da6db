"""The end-to-end demo on the built-in data world (``clipforge demo``, ``make demo``)."""

from clipforge.demo.pipeline import DemoConfig, run_demo

__all__ = ["DemoConfig", "run_demo"]
