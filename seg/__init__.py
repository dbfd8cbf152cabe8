"""Fully convolutional networks on Cityscapes: data, models, training, metrics.

The core is pure PyTorch; tuning and tracking live in ``seg.tuning`` and are
imported only by the scripts that need them.
"""

__version__ = "0.1.0"
