r"""Recurrent layers ``rnn``, ``lstm`` and ``gru`` over a sequence (T, n), as ``torch.nn.RNN``, ``nn.LSTM`` and
``nn.GRU`` with ``num_layers=1, batch_first=True``; backward is backpropagation through time, written by hand.

Each step t = 1..T reads :math:`x_t` (n,) and the previous hidden state :math:`h_{t-1}` (H,). The weights are
torch's, G gate blocks of H rows stacked: :math:`W_{ih}` (G·H, n), :math:`W_{hh}` (G·H, H), biases
:math:`b_{ih}, b_{hh}` (G·H,) (``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``, ``bias_hh_l0``). Write
:math:`a^x_t = x_t W_{ih}^T + b_{ih}` and :math:`a^h_t = h_{t-1} W_{hh}^T + b_{hh}`, split in blocks of H.

* rnn (G = 1): :math:`h_t = φ(a^x_t + a^h_t)`, φ = tanh or relu;
* lstm (G = 4, blocks i, f, g, o): :math:`i, f, o = σ(a^x + a^h)` and :math:`g = \tanh(a^x + a^h)` blockwise,
  :math:`c_t = f ⊙ c_{t-1} + i ⊙ g`, :math:`h_t = o ⊙ \tanh c_t`;
* gru (G = 3, blocks r, z, n): :math:`r = σ(a^x_r + a^h_r)`, :math:`z = σ(a^x_z + a^h_z)`,
  :math:`n = \tanh(a^x_n + r ⊙ a^h_n)` (r multiplies :math:`h W_{hn}^T + b_{hn}`, bias included, as torch),
  :math:`h_t = (1 - z) ⊙ n + z ⊙ h_{t-1}`.

The layer's output z is the whole sequence :math:`h_1 … h_T` (T, H) when ``return_sequences``, else
:math:`h_T` (H,). The initial state :math:`h_0` (and :math:`c_0`) is zero, or ``learned``: one parameter
``h0`` (H,) (and ``c0``) shared by every example.

Backward, given :math:`δ = ∂C/∂z`, runs t = T … 1 carrying :math:`∂C/∂h_t` back through the recurrence:

.. math::  dh_t = δ_t + \frac{∂C}{∂h_t}\Big|_{\text{through step } t+1}

(δ_t is zero but at t = T when only :math:`h_T` is returned). Each step turns :math:`dh_t` (and for lstm
:math:`dc_t`) into the gradients of its pre-activations, :math:`d^x_t = ∂C/∂a^x_t` and
:math:`d^h_t = ∂C/∂a^h_t` (equal but for gru's n block, where :math:`d^h_n = d^x_n ⊙ r`):

* rnn: :math:`d_t = dh_t ⊙ φ'`, :math:`φ' = 1 - h_t^2` (tanh) or :math:`1[h_t > 0]` (relu);
* lstm: :math:`dc = dc_t + dh_t ⊙ o ⊙ (1 - \tanh^2 c_t)`, then :math:`d_i = dc ⊙ g ⊙ i(1-i)`,
  :math:`d_f = dc ⊙ c_{t-1} ⊙ f(1-f)`, :math:`d_g = dc ⊙ i ⊙ (1-g^2)`,
  :math:`d_o = dh_t ⊙ \tanh c_t ⊙ o(1-o)`, and :math:`dc_{t-1} = dc ⊙ f`;
* gru: :math:`d_n = dh_t ⊙ (1-z) ⊙ (1-n^2)`, :math:`d_z = dh_t ⊙ (h_{t-1} - n) ⊙ z(1-z)`,
  :math:`d_r = d_n ⊙ a^h_n ⊙ r(1-r)`; and :math:`h_{t-1}` also reaches :math:`h_t` directly, :math:`dh_t ⊙ z`.

Then, with every weight shared by every step (so its gradient is summed through time, the classic bug being a
sum of the last step only):

.. math::

    ∂C/∂W_{ih} = \sum_t (d^x_t)^T x_t,\quad ∂C/∂b_{ih} = \sum_t d^x_t,\quad
    ∂C/∂W_{hh} = \sum_t (d^h_t)^T h_{t-1},\quad ∂C/∂b_{hh} = \sum_t d^h_t,

    ∂C/∂x_t = d^x_t W_{ih},\qquad ∂C/∂h_{t-1} \mathrel{+}= d^h_t W_{hh}

summed over the batch as well; a learned :math:`h_0` gets :math:`∂C/∂h_0` summed over the batch (and c0 likewise).

The step functions (``rnn_step_forward`` / ``rnn_step_backward``, and lstm's and gru's) are one step for a
batch, cs231n's form: backward returns that step's gradients of every weight. The layer's own backward loops
over the steps with the same per-step δ (``*_step_deltas``) but forms the weight gradients and ∂C/∂x in one
matmul over all steps at the end, as torch does; given ``step_backward`` it calls that per step instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, NamedTuple

import numpy as np

from ..activations import Activation, make_activation, stable_sigmoid
from ..errors import SpecError
from ..named import show
from .base import at, optional_activation, parse_bool, positive_int, reject_unknown, shape_text

NONLINEARITIES = ("tanh", "relu")
INITIAL_STATES = ("zero", "learned")
#: the weights that a sum of the last step only (``sum_over_time=False``) models
HIDDEN_TO_HIDDEN = ("weight_hh_l0", "bias_hh_l0")


# -- the pieces every step shares ------------------------------------------------------------------------
def _input_part(p: dict, x: np.ndarray) -> np.ndarray:
    """a^x = x W_ihᵀ + b_ih, for one step (m, n) or every step at once (m, T, n)."""
    ax = x @ p["weight_ih_l0"].T
    if "bias_ih_l0" in p:
        ax += p["bias_ih_l0"]
    return ax


def _hidden_part(p: dict, h_prev: np.ndarray) -> np.ndarray:
    """a^h = h_{t-1} W_hhᵀ + b_hh."""
    ah = h_prev @ p["weight_hh_l0"].T
    if "bias_hh_l0" in p:
        ah += p["bias_hh_l0"]
    return ah


def weight_grads(p: dict, x: np.ndarray, h_prev: np.ndarray, d_x: np.ndarray, d_h: np.ndarray):
    """One step's (grads, dx) from its pre-activation δ: dW_ih = d^xᵀ x, dW_hh = d^hᵀ h_{t-1}, the biases Σ d,
    dx = d^x W_ih (rows are the batch)."""
    grads = {"weight_ih_l0": d_x.T @ x, "weight_hh_l0": d_h.T @ h_prev}
    if "bias_ih_l0" in p:
        grads["bias_ih_l0"] = d_x.sum(axis=0)
        grads["bias_hh_l0"] = d_h.sum(axis=0)
    return grads, d_x @ p["weight_ih_l0"]


# -- rnn ---------------------------------------------------------------------------------------------------
class RNNCache(NamedTuple):
    x: np.ndarray           # x_t (m, n)
    h_prev: np.ndarray      # h_{t-1} (m, H)
    pre: np.ndarray         # a^x + a^h, before φ
    h: np.ndarray           # h_t = φ(pre)
    nonlinearity: str


def rnn_step_forward(p: dict, x_t: np.ndarray, h_prev: np.ndarray, nonlinearity: str = "tanh", *, ax=None):
    """h_t = φ(x_t W_ihᵀ + b_ih + h_{t-1} W_hhᵀ + b_hh) → (h, cache). ``ax``: x_t W_ihᵀ + b_ih when already known."""
    pre = (_input_part(p, x_t) if ax is None else ax) + _hidden_part(p, h_prev)
    h = np.tanh(pre) if nonlinearity == "tanh" else np.maximum(pre, 0)
    return h, RNNCache(x_t, h_prev, pre, h, nonlinearity)


def rnn_step_deltas(p: dict, cache: RNNCache, dh: np.ndarray):
    """(d, dh_prev): d = dh ⊙ φ'(pre) (φ' = 1 − h² or 1[h > 0]), dh_prev = d W_hh."""
    d = dh * (1 - cache.h * cache.h) if cache.nonlinearity == "tanh" else dh * (cache.h > 0)
    return d, d @ p["weight_hh_l0"]


def rnn_step_backward(p: dict, cache: RNNCache, dh: np.ndarray):
    """One step back from ∂C/∂h_t: (grads_t, dx, dh_prev), grads_t by the weights' names."""
    d, dh_prev = rnn_step_deltas(p, cache, dh)
    grads, dx = weight_grads(p, cache.x, cache.h_prev, d, d)
    return grads, dx, dh_prev


# -- lstm --------------------------------------------------------------------------------------------------
class LSTMCache(NamedTuple):
    x: np.ndarray
    h_prev: np.ndarray
    c_prev: np.ndarray
    i: np.ndarray           # input gate σ
    f: np.ndarray           # forget gate σ
    g: np.ndarray           # candidate tanh
    o: np.ndarray           # output gate σ
    c: np.ndarray           # c_t = f ⊙ c_{t-1} + i ⊙ g
    tanh_c: np.ndarray      # tanh(c_t); h_t = o ⊙ tanh_c


def lstm_step_forward(p: dict, x_t: np.ndarray, h_prev: np.ndarray, c_prev: np.ndarray, *, ax=None):
    """[i f g o] = a^x + a^h; c = f ⊙ c_prev + i ⊙ g; h = o ⊙ tanh(c) → (h, c, cache)."""
    a = (_input_part(p, x_t) if ax is None else ax) + _hidden_part(p, h_prev)
    H = h_prev.shape[-1]
    s = stable_sigmoid(a)                     # σ of every block; g's is not used
    i, f, o = s[:, :H], s[:, H:2 * H], s[:, 3 * H:]
    g = np.tanh(a[:, 2 * H:3 * H])
    c = f * c_prev + i * g
    tanh_c = np.tanh(c)
    h = o * tanh_c
    return h, c, LSTMCache(x_t, h_prev, c_prev, i, f, g, o, c, tanh_c)


def lstm_step_deltas(p: dict, cache: LSTMCache, dh: np.ndarray, dc: np.ndarray):
    """(d, dh_prev, dc_prev): d = [d_i d_f d_g d_o] (m, 4H), the δ of a^x + a^h; dh_prev = d W_hh; dc_prev = dc ⊙ f
    with dc the total ∂C/∂c_t (the carried dc plus dh's path through h = o ⊙ tanh c)."""
    i, f, g, o, tanh_c = cache.i, cache.f, cache.g, cache.o, cache.tanh_c
    dc = dc + dh * o * (1 - tanh_c * tanh_c)
    d = np.concatenate((dc * g * i * (1 - i),
                        dc * cache.c_prev * f * (1 - f),
                        dc * i * (1 - g * g),
                        dh * tanh_c * o * (1 - o)), axis=1)
    return d, d @ p["weight_hh_l0"], dc * f


def lstm_step_backward(p: dict, cache: LSTMCache, dh: np.ndarray, dc: np.ndarray):
    """One step back from ∂C/∂h_t and the carried ∂C/∂c_t: (grads_t, dx, dh_prev, dc_prev)."""
    d, dh_prev, dc_prev = lstm_step_deltas(p, cache, dh, dc)
    grads, dx = weight_grads(p, cache.x, cache.h_prev, d, d)
    return grads, dx, dh_prev, dc_prev


# -- gru ---------------------------------------------------------------------------------------------------
class GRUCache(NamedTuple):
    x: np.ndarray
    h_prev: np.ndarray
    r: np.ndarray           # reset gate σ
    z: np.ndarray           # update gate σ
    n: np.ndarray           # candidate tanh(a^x_n + r ⊙ hn)
    hn: np.ndarray          # a^h_n = h_{t-1} W_hnᵀ + b_hn, what r multiplies


def gru_step_forward(p: dict, x_t: np.ndarray, h_prev: np.ndarray, *, ax=None):
    """r, z = σ(a^x + a^h) blockwise; n = tanh(a^x_n + r ⊙ a^h_n); h = (1 − z) ⊙ n + z ⊙ h_prev → (h, cache)."""
    ax = _input_part(p, x_t) if ax is None else ax
    ah = _hidden_part(p, h_prev)
    H = h_prev.shape[-1]
    rz = stable_sigmoid(ax[:, :2 * H] + ah[:, :2 * H])
    r, z = rz[:, :H], rz[:, H:]
    hn = ah[:, 2 * H:]
    n = np.tanh(ax[:, 2 * H:] + r * hn)
    h = n + z * (h_prev - n)                  # (1 − z) ⊙ n + z ⊙ h_prev
    return h, GRUCache(x_t, h_prev, r, z, n, hn)


def gru_step_deltas(p: dict, cache: GRUCache, dh: np.ndarray):
    """(d_x, d_h, dh_prev): the δ of a^x = [r z n] and of a^h (n's block times r there), and
    dh_prev = d_h W_hh + dh ⊙ z (the direct path h_{t-1} → h_t)."""
    r, z, n = cache.r, cache.z, cache.n
    d_n = dh * (1 - z) * (1 - n * n)
    d_z = dh * (cache.h_prev - n) * z * (1 - z)
    d_r = d_n * cache.hn * r * (1 - r)
    d_x = np.concatenate((d_r, d_z, d_n), axis=1)
    d_h = np.concatenate((d_r, d_z, d_n * r), axis=1)
    return d_x, d_h, d_h @ p["weight_hh_l0"] + dh * z


def gru_step_backward(p: dict, cache: GRUCache, dh: np.ndarray):
    """One step back from ∂C/∂h_t: (grads_t, dx, dh_prev)."""
    d_x, d_h, dh_prev = gru_step_deltas(p, cache, dh)
    grads, dx = weight_grads(p, cache.x, cache.h_prev, d_x, d_h)
    return grads, dx, dh_prev


# -- the layers --------------------------------------------------------------------------------------------
class Trace(NamedTuple):
    """What a forward keeps for backward: each step's cache, and every hidden state h_0 … h_T as (m, T+1, H)."""

    steps: tuple
    h: np.ndarray


@dataclass(frozen=True)
class _Recurrent:
    """What rnn, lstm and gru share: the fields, the shapes, and the loop through time both ways.

    Fields: ``hidden_size`` H, ``bias`` (true: ``bias_ih_l0`` and ``bias_hh_l0``), ``return_sequences`` (true:
    the output is h_1 … h_T, (T, H); false: h_T, (H,)), ``initial_state`` ("zero", or "learned": ``h0`` (H,),
    and ``c0`` for lstm, shared by the batch), ``activation`` (identity), applied by the network after it.
    """

    hidden_size: int
    bias: bool = True
    return_sequences: bool = True
    initial_state: str = "zero"
    activation: Activation = field(default_factory=lambda: make_activation("identity"))
    type: ClassVar[str] = ""
    gates: ClassVar[int] = 1                  # G: blocks of H rows in W_ih and W_hh
    has_cell: ClassVar[bool] = False          # lstm carries c beside h
    split_deltas: ClassVar[bool] = False      # gru: d^h differs from d^x (n's block is times r)
    fields: ClassVar[tuple[str, ...]] = ("type", "hidden_size", "bias", "return_sequences", "initial_state", "activation")

    # -- spec ------------------------------------------------------------------------------------------------
    @classmethod
    def _common(cls, obj: dict[str, Any], where: str) -> dict[str, Any]:
        reject_unknown(obj, cls.fields, where)
        if "hidden_size" not in obj:
            raise SpecError(at(where, "hidden_size"), "missing",
                            f"every {cls.type} layer needs hidden_size (H, the state's size)")
        state = obj.get("initial_state", "zero")
        if not isinstance(state, str) or state not in INITIAL_STATES:
            raise SpecError(at(where, "initial_state"), f"{show(state)} is not an initial state",
                            'write "zero" (h0 = 0) or "learned" (a parameter h0 shared by the batch)')
        return dict(hidden_size=positive_int(obj["hidden_size"], at(where, "hidden_size")),
                    bias=parse_bool(obj.get("bias", True), at(where, "bias")),
                    return_sequences=parse_bool(obj.get("return_sequences", True), at(where, "return_sequences")),
                    initial_state=state, activation=optional_activation(obj, where))

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str):
        return cls(**cls._common(obj, where))

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "hidden_size": self.hidden_size, "bias": self.bias,
                "return_sequences": self.return_sequences, "initial_state": self.initial_state,
                "activation": self.activation.to_json()}

    def describe(self) -> str:
        """For ``Spec.describe``: ``lstm 16``, ``rnn[relu] 8 (last step, learned h0, no bias)``."""
        notes = [note for note, on in (("last step", not self.return_sequences),
                                       ("learned h0", self.initial_state == "learned"), ("no bias", not self.bias)) if on]
        return f"{self.type} {self.hidden_size}" + (f" ({', '.join(notes)})" if notes else "")

    # -- shapes ----------------------------------------------------------------------------------------------
    def out_shape(self, in_shape, where: str = "") -> tuple[int, ...]:
        """(T, H) from a sequence (T, n), or (H,) when only the last step is returned."""
        shape = tuple(int(d) for d in in_shape)
        if len(shape) != 2:
            raise SpecError(where, f"{self.type} needs (T, n) input, got {shape_text(shape)}",
                            'give a sequence input, "shape": [T, n] (or put an embedding first)')
        return (shape[0], self.hidden_size) if self.return_sequences else (self.hidden_size,)

    def param_shapes(self, in_shape, where: str = "") -> dict[str, tuple[int, ...]]:
        """torch's names and order: weight_ih_l0 (G·H, n), weight_hh_l0 (G·H, H), bias_ih_l0, bias_hh_l0 (G·H,),
        then h0 (and c0) (H,) when learned."""
        self.out_shape(in_shape, where)
        GH, H = self.gates * self.hidden_size, self.hidden_size
        shapes = {"weight_ih_l0": (GH, int(tuple(in_shape)[1])), "weight_hh_l0": (GH, H)}
        if self.bias:
            shapes.update(bias_ih_l0=(GH,), bias_hh_l0=(GH,))
        if self.initial_state == "learned":
            shapes["h0"] = (H,)
            if self.has_cell:
                shapes["c0"] = (H,)
        return shapes

    # -- one step, in the form the loops share (c is None but for lstm) ---------------------------------------
    def _step_forward(self, p, x_t, ax_t, h, c):
        """(h_t, c_t, cache)."""
        raise NotImplementedError

    def _step_deltas(self, p, cache, dh, dc):
        """(d_x, d_h, dh_prev, dc_prev)."""
        raise NotImplementedError

    def _step_backward(self, step_backward, p, cache, dh, dc):
        """(grads_t, dx, dh_prev, dc_prev) from ``step_backward`` (the type's own when None)."""
        raise NotImplementedError

    def _initial(self, p: dict, name: str, m: int, dtype) -> np.ndarray:
        if self.initial_state == "learned":
            return np.broadcast_to(p[name], (m, self.hidden_size))
        return np.zeros((m, self.hidden_size), dtype=dtype)

    # -- the contract ----------------------------------------------------------------------------------------
    def forward(self, p: dict, a: np.ndarray) -> np.ndarray:
        """h_1 … h_T (m, T, H), or h_T (m, H)."""
        return self.forward_saved(p, a)[0]

    def forward_saved(self, p: dict, a: np.ndarray):
        """(z, Trace): the output and every step's cache. a^x for all steps is one matmul."""
        m, T, _ = a.shape
        ax = _input_part(p, a)                                     # (m, T, G·H)
        hs = np.empty((m, T + 1, self.hidden_size), dtype=ax.dtype)
        hs[:, 0] = h = self._initial(p, "h0", m, ax.dtype)
        c = self._initial(p, "c0", m, ax.dtype) if self.has_cell else None
        steps = []
        for t in range(T):
            h, c, cache = self._step_forward(p, a[:, t], ax[:, t], h, c)
            hs[:, t + 1] = h
            steps.append(cache)
        z = hs[:, 1:].copy() if self.return_sequences else hs[:, -1].copy()
        return z, Trace(tuple(steps), hs)

    def backward(self, p: dict, a: np.ndarray, delta: np.ndarray, saved: Trace | None = None, *,
                 step_backward: Callable | None = None, sum_over_time: bool = True):
        """Backpropagation through time (the module docstring): (grads by the params' names, ∂C/∂a (m, T, n)).
        ``saved``: the Trace of ``forward_saved`` (the forward is rerun when not given).

        The keywords only let a mutant model a real bug: ``step_backward`` in place of the type's step backward
        (``rnn_step_backward``'s signature, or lstm's / gru's), and ``sum_over_time=False`` keeps the
        hidden-to-hidden gradients (weight_hh_l0, bias_hh_l0) of the last step only."""
        grads, grad_a, _ = self.bptt(p, a, delta, saved, step_backward=step_backward, sum_over_time=sum_over_time)
        return grads, grad_a

    def backward_hidden(self, p: dict, a: np.ndarray, delta: np.ndarray, saved: Trace | None = None, *,
                        step_backward: Callable | None = None) -> np.ndarray:
        """∂C/∂h_t for every step, (m, T, H): the output's δ_t plus what flows back from step t+1."""
        return self.bptt(p, a, delta, saved, step_backward=step_backward)[2]

    def bptt(self, p: dict, a: np.ndarray, delta: np.ndarray, saved: Trace | None = None, *,
             step_backward: Callable | None = None, sum_over_time: bool = True):
        """(grads, ∂C/∂a, dh) with dh (m, T, H) the total ∂C/∂h_t of each step; see ``backward``."""
        if saved is None:
            saved = self.forward_saved(p, a)[1]
        steps, hs = saved
        m, T, n = a.shape
        H, GH = self.hidden_size, self.gates * self.hidden_size
        if self.return_sequences:
            delta_at = delta
        else:                                              # only h_T reached the output
            delta_at = np.zeros((m, T, H), dtype=delta.dtype)
            delta_at[:, -1] = delta
        dh_all = np.empty((m, T, H), dtype=delta.dtype)
        dh_next = np.zeros((m, H), dtype=delta.dtype)
        dc_next = np.zeros((m, H), dtype=delta.dtype) if self.has_cell else None
        if step_backward is None:
            # per step only the δ of the pre-activations and the matmul by W_hh; the rest at once after
            D_x = np.empty((m, T, GH), dtype=delta.dtype)
            D_h = np.empty((m, T, GH), dtype=delta.dtype) if self.split_deltas else D_x
            for t in reversed(range(T)):
                dh_all[:, t] = dh = delta_at[:, t] + dh_next
                d_x, d_h, dh_next, dc_next = self._step_deltas(p, steps[t], dh, dc_next)
                D_x[:, t] = d_x
                if self.split_deltas:
                    D_h[:, t] = d_h
            hh_steps = slice(None) if sum_over_time else slice(T - 1, None)
            rows_h = D_h[:, hh_steps].reshape(-1, GH)
            rows_x = D_x.reshape(-1, GH)
            grads = {"weight_ih_l0": rows_x.T @ a.reshape(-1, n),
                     "weight_hh_l0": rows_h.T @ hs[:, :-1][:, hh_steps].reshape(-1, H)}
            if self.bias:
                grads["bias_ih_l0"] = rows_x.sum(axis=0)
                grads["bias_hh_l0"] = rows_h.sum(axis=0)
            grad_a = D_x @ p["weight_ih_l0"]
        else:
            grads, grad_a = {}, np.empty_like(a, dtype=delta.dtype)
            for t in reversed(range(T)):
                dh_all[:, t] = dh = delta_at[:, t] + dh_next
                grads_t, grad_a[:, t], dh_next, dc_next = self._step_backward(step_backward, p, steps[t], dh, dc_next)
                for name, g in grads_t.items():
                    if name not in grads:                  # t = T − 1, the first step back
                        grads[name] = g
                    elif sum_over_time or name not in HIDDEN_TO_HIDDEN:
                        grads[name] = grads[name] + g
        if self.initial_state == "learned":              # the one h0 (c0) every example started from
            grads["h0"] = dh_next.sum(axis=0)
            if self.has_cell:
                grads["c0"] = dc_next.sum(axis=0)
        return grads, grad_a, dh_all


@dataclass(frozen=True)
class RNN(_Recurrent):
    """``torch.nn.RNN(n, H, nonlinearity=..., bias=..., batch_first=True)``: h_t = φ(a^x_t + a^h_t).

    Fields: ``_Recurrent``'s, and ``nonlinearity`` φ, "tanh" (default) or "relu"."""

    nonlinearity: str = "tanh"
    type: ClassVar[str] = "rnn"
    gates: ClassVar[int] = 1
    fields: ClassVar[tuple[str, ...]] = ("type", "hidden_size", "nonlinearity", "bias", "return_sequences",
                                         "initial_state", "activation")

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str) -> "RNN":
        common = cls._common(obj, where)
        phi = obj.get("nonlinearity", "tanh")
        if not isinstance(phi, str) or phi not in NONLINEARITIES:
            raise SpecError(at(where, "nonlinearity"), f"{show(phi)} is not an rnn nonlinearity",
                            'write "tanh" or "relu" (as torch.nn.RNN); a further activation goes in "activation"')
        return cls(nonlinearity=phi, **common)

    def to_json(self) -> dict[str, Any]:
        head, rest = {"type": self.type, "hidden_size": self.hidden_size, "nonlinearity": self.nonlinearity}, super().to_json()
        return {**head, **rest}

    def describe(self) -> str:
        text = super().describe()
        return text if self.nonlinearity == "tanh" else text.replace("rnn", "rnn[relu]", 1)

    def _step_forward(self, p, x_t, ax_t, h, c):
        h, cache = rnn_step_forward(p, x_t, h, self.nonlinearity, ax=ax_t)
        return h, None, cache

    def _step_deltas(self, p, cache, dh, dc):
        d, dh_prev = rnn_step_deltas(p, cache, dh)
        return d, d, dh_prev, None

    def _step_backward(self, step_backward, p, cache, dh, dc):
        return (*(step_backward or rnn_step_backward)(p, cache, dh), None)


@dataclass(frozen=True)
class LSTM(_Recurrent):
    """``torch.nn.LSTM(n, H, bias=..., batch_first=True)``: gates i, f, g, o, a cell state c beside h."""

    type: ClassVar[str] = "lstm"
    gates: ClassVar[int] = 4
    has_cell: ClassVar[bool] = True

    def _step_forward(self, p, x_t, ax_t, h, c):
        return lstm_step_forward(p, x_t, h, c, ax=ax_t)

    def _step_deltas(self, p, cache, dh, dc):
        d, dh_prev, dc_prev = lstm_step_deltas(p, cache, dh, dc)
        return d, d, dh_prev, dc_prev

    def _step_backward(self, step_backward, p, cache, dh, dc):
        return (step_backward or lstm_step_backward)(p, cache, dh, dc)


@dataclass(frozen=True)
class GRU(_Recurrent):
    """``torch.nn.GRU(n, H, bias=..., batch_first=True)``: gates r, z and the candidate n."""

    type: ClassVar[str] = "gru"
    gates: ClassVar[int] = 3
    split_deltas: ClassVar[bool] = True

    def _step_forward(self, p, x_t, ax_t, h, c):
        h, cache = gru_step_forward(p, x_t, h, ax=ax_t)
        return h, None, cache

    def _step_deltas(self, p, cache, dh, dc):
        return (*gru_step_deltas(p, cache, dh), None)

    def _step_backward(self, step_backward, p, cache, dh, dc):
        return (*(step_backward or gru_step_backward)(p, cache, dh), None)
