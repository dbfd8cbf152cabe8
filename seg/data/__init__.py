"""Cityscapes data: the label table, the dataset and its loaders, transforms, a synthetic set.

Import from the submodules (``seg.data.cityscapes``, ``seg.data.labels``, ...); this
package runs nothing on import.
"""
