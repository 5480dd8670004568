r"""Layer types, one module per family: what a layer's spec holds, its parameters, and its forward
and backward equations. ``base`` states the contract every layer class keeps and where the four
parts of a new layer type go (this package, ``oracle/twin.py``, ``oracle/strategies.py``,
``oracle/mutants.py``).

* ``dense``: :class:`Dense` (``torch.nn.Linear``);
* ``conv``: :class:`Conv1d`, :class:`Conv2d`;
* ``pool``: :class:`MaxPool1d`, :class:`MaxPool2d`, :class:`AvgPool1d`, :class:`AvgPool2d`;
* ``reshape``: :class:`Flatten`;
* ``norm``: :class:`BatchNorm`, :class:`LayerNorm`, :class:`GroupNorm`;
* ``dropout``: :class:`Dropout` (its mask: :func:`keep_mask`);
* ``embedding``: :class:`Embedding` (integer token input);
* ``temporal``: :class:`TemporalDense` (dense at every step of a sequence (T, n));
* ``recurrent``: :class:`RNN`, :class:`LSTM`, :class:`GRU` (over a sequence (T, n), backprop through time);
* ``residual``: :class:`Residual`, a block body(x) + x (or + P(x)) whose body holds any layers;
* ``windows``: the padding / sliding-window index maps conv and pooling share.

Each layer type registers itself in ``LAYER_TYPES`` under its spec ``"type"``; old specs keep working.
"""

from .base import MAX_SIZE, parse_named, positive_int, reject_unknown
from .conv import Conv1d, Conv2d
from .dense import Dense
from .pool import AvgPool1d, AvgPool2d, MaxPool1d, MaxPool2d
from .reshape import Flatten
from .norm import BatchNorm, GroupNorm, LayerNorm
from .dropout import Dropout, keep_mask
from .embedding import Embedding
from .residual import Residual
from .temporal import TemporalDense
from .recurrent import GRU, LSTM, RNN
from .attention import Attention

#: spec "type" -> layer class. Format version 1 specs hold dense layers only (a vector input);
#: version 2 gives the input's shape, so any of these can follow it.
LAYER_TYPES: dict[str, type] = {cls.type: cls for cls in (Dense, Conv1d, Conv2d, MaxPool1d, MaxPool2d,
                                                          AvgPool1d, AvgPool2d, Flatten, BatchNorm, LayerNorm,
                                                          GroupNorm, Dropout, Embedding, Residual, TemporalDense,
                                                          RNN, LSTM, GRU)}
LAYER_TYPES[Attention.type] = Attention

__all__ = [
    "MAX_SIZE", "parse_named", "positive_int", "reject_unknown", "LAYER_TYPES",
    "Dense", "Conv1d", "Conv2d", "MaxPool1d", "MaxPool2d", "AvgPool1d", "AvgPool2d", "Flatten",
    "BatchNorm", "LayerNorm", "GroupNorm", "Dropout", "keep_mask", "Embedding", "Residual", "TemporalDense",
    "RNN", "LSTM", "GRU",
    "Attention",
]
