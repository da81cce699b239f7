"""Datasets behind one small interface (:class:`ImageSource`) so that real ones plug in."""

from common.data.base import ClientData, EvalSet, ImageSource, LabeledDataset, SplitSources

__all__ = ["ClientData", "EvalSet", "ImageSource", "LabeledDataset", "SplitSources"]
