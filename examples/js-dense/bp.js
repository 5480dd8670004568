#!/usr/bin/env node
// Backpropagation for dense networks, by hand, in plain JavaScript (Node, no packages).
//
//   node bp.js CASE_FOLDER
//
// reads CASE_FOLDER/case.json (the spec) and CASE_FOLDER/inputs.safetensors (x, y, the weights), runs the
// forward pass and the backward pass, and writes CASE_FOLDER/outputs.safetensors:
//   loss (0-d), grad.layers.{i}.weight, grad.layers.{i}.bias, input.grad, delta.layers.{i}, z.layers.{i},
//   a.layers.{i}.
// That is the exec protocol of `bp-oracle check --impl "exec:node examples/js-dense/bp.js"` (see README.md).
//
// Notation (the project's README, 0-based): layer i maps its input a_i (a_0 = x) to
//   z_i = a_i θ_iᵀ + b_i        rows are examples, θ_i is (out, in) like torch.nn.Linear
//   a_{i+1} = g_i(z_i)           the last a is the prediction ỹ
// and the error signal δ_i = ∂C/∂z_i obeys the four equations
//   1. δ_{L-1} = ∇_a C ⊙ g'(z_{L-1})           (softmax / log_softmax: their vector-Jacobian product)
//   2. δ_{i-1} = (δ_i θ_i) ⊙ g'(z_{i-1})       (per example θᵀδ: the transpose is in the index order)
//   3. ∂C/∂θ_i = δ_iᵀ a_i                       (summed over the batch)
//   4. ∂C/∂b_i = Σ_rows δ_i
// and ∂C/∂x = δ_0 θ_0.
//
// Supported: format_version 1 or 2 specs whose layers are all dense on a flat input; every activation and loss
// of bp-oracle (conventions at kinks as PyTorch). Anything else is refused: a message on stderr and exit status 3.
// Arithmetic: float64 always. A float32 case (F32 inputs) is computed in float64 from its float32 values and each
// output is rounded to float32 (Math.fround) when it is written, as F32 tensors.

"use strict";

const fs = require("fs");
const path = require("path");

class Unsupported extends Error {}

function refuse(message) {
  throw new Unsupported(message);
}

// -- safetensors: 8-byte little-endian header length N, N bytes of JSON, then the raw little-endian data ----------
const READERS = {
  F64: [8, (v, o) => v.getFloat64(o, true)],
  F32: [4, (v, o) => v.getFloat32(o, true)],
  I64: [8, (v, o) => Number(v.getBigInt64(o, true))],
  I32: [4, (v, o) => v.getInt32(o, true)],
};

function readSafetensors(file) {
  const buf = fs.readFileSync(file);
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const n = Number(view.getBigUint64(0, true));
  const header = JSON.parse(buf.toString("utf8", 8, 8 + n));
  const start = 8 + n;
  const tensors = {};
  for (const [name, info] of Object.entries(header)) {
    if (name === "__metadata__") continue;
    const reader = READERS[info.dtype];
    if (!reader) refuse(`${file}: tensor ${name} has dtype ${info.dtype}, not one of ${Object.keys(READERS)}`);
    const [size, get] = reader;
    const [begin, end] = info.data_offsets;
    const count = info.shape.reduce((p, d) => p * d, 1);
    if (end - begin !== count * size) throw new Error(`${file}: tensor ${name} has ${end - begin} bytes for ${count} elements`);
    const data = new Float64Array(count);
    for (let k = 0; k < count; k++) data[k] = get(view, start + begin + k * size);
    tensors[name] = { dtype: info.dtype, shape: info.shape, data };
  }
  return tensors;
}

// tensors: [[name, shape, Float64Array]]; written as F64 or F32 (rounded), the header padded to 8 bytes.
function writeSafetensors(file, tensors, dtype) {
  const size = dtype === "F32" ? 4 : 8;
  const header = {};
  let offset = 0;
  for (const [name, shape, data] of tensors) {
    header[name] = { dtype, shape, data_offsets: [offset, offset + data.length * size] };
    offset += data.length * size;
  }
  let json = JSON.stringify(header);
  json += " ".repeat((8 - (Buffer.byteLength(json) % 8)) % 8);
  const head = Buffer.from(json, "utf8");
  const out = Buffer.alloc(8 + head.length + offset);
  out.writeBigUInt64LE(BigInt(head.length), 0);
  head.copy(out, 8);
  let at = 8 + head.length;
  for (const [, , data] of tensors) {
    for (let k = 0; k < data.length; k++) {
      if (size === 4) out.writeFloatLE(data[k], at); // rounds to the nearest float32, as Math.fround
      else out.writeDoubleLE(data[k], at);
      at += size;
    }
  }
  const tmp = path.join(path.dirname(file), `.outputs.${process.pid}.tmp`);
  fs.writeFileSync(tmp, out);
  fs.renameSync(tmp, file); // never a half-written outputs file
}

// -- matrices: {rows, cols, data: Float64Array} in C order ----------------------------------------------------------
function matrix(rows, cols, data) {
  return { rows, cols, data: data || new Float64Array(rows * cols) };
}

function at(M, r, c) {
  return M.data[r * M.cols + c];
}

function map(M, f) {
  const out = matrix(M.rows, M.cols);
  for (let k = 0; k < M.data.length; k++) out.data[k] = f(M.data[k], k);
  return out;
}

// -- special functions -----------------------------------------------------------------------------------------------
// σ(z) = 1/(1 + e^{-z}), as e^{z}/(1 + e^{z}) for z < 0 (exp only of a non-positive number: no overflow)
function sigmoid(z) {
  const e = Math.exp(-Math.abs(z));
  return z >= 0 ? 1 / (1 + e) : e / (1 + e);
}

// log(1 + e^{t}) = max(t, 0) + log(1 + e^{-|t|})
function softplus(t) {
  return Math.max(t, 0) + Math.log1p(Math.exp(-Math.abs(t)));
}

// erf(x): for |x| < 3 the series erf(x) = 2/√π e^{-x²} Σ_n 2ⁿ x^{2n+1} / (1·3·…·(2n+1)) (all terms positive: no
// cancellation); beyond, erf(x) = 1 − erfc(x) with erfc's continued fraction
// erfc(x) = e^{-x²}/√π · 1/(x + (1/2)/(x + 1/(x + (3/2)/(x + 2/(x + …))))) (modified Lentz).
function erf(x) {
  if (Number.isNaN(x)) return x;
  const ax = Math.abs(x);
  const sign = x < 0 ? -1 : 1;
  if (ax < 3) {
    let term = ax;
    let sum = ax;
    for (let n = 1; n < 200; n++) {
      term *= (2 * ax * ax) / (2 * n + 1);
      sum += term;
      if (term < 1e-17 * sum) break;
    }
    return (sign * 2 * Math.exp(-ax * ax) * sum) / Math.sqrt(Math.PI);
  }
  if (ax > 6) return sign; // erfc(6) ≈ 2e-17: erf is ±1 in float64
  const tiny = 1e-300;
  let f = ax;
  let C = f;
  let D = 0;
  for (let n = 1; n < 300; n++) {
    const an = n / 2;
    D = ax + an * D;
    D = D === 0 ? tiny : D;
    C = ax + an / C;
    C = C === 0 ? tiny : C;
    D = 1 / D;
    const step = C * D;
    f *= step;
    if (Math.abs(step - 1) < 1e-16) break;
  }
  const erfc = Math.exp(-ax * ax) / Math.sqrt(Math.PI) / f;
  return sign * (1 - erfc);
}

// -- activations: value g(z), derivative g'(z) given a = g(z); PyTorch's conventions at kinks ------------------------
const SELU_ALPHA = 1.6732632423543772848170429916717;
const SELU_SCALE = 1.0507009873554804934193349852946;
const GELU_K = Math.sqrt(2 / Math.PI);
const GELU_C = 0.044715;

function makeActivation(spec, where) {
  const name = typeof spec === "string" ? spec : spec && spec.name;
  const p = typeof spec === "object" && spec !== null ? spec : {};
  const opt = (key, dflt) => (p[key] === undefined ? dflt : p[key]);
  switch (name) {
    case "identity": // g = z, g' = 1
      return { name, g: (z) => z, dg: () => 1 };
    case "sigmoid": // g' = σ(1 − σ), once
      return { name, g: sigmoid, dg: (z, a) => a * (1 - a) };
    case "tanh": // g' = 1 − tanh²
      return { name, g: Math.tanh, dg: (z, a) => 1 - a * a };
    case "relu": // relu'(0) = 0
      return { name, g: (z) => (z > 0 ? z : 0 * z), dg: (z) => (z > 0 ? 1 : 0) };
    case "leaky_relu": { // g = z (z > 0), s z otherwise; g'(0) = s
      const s = opt("negative_slope", 0.01);
      return { name, g: (z) => (z > 0 ? z : s * z), dg: (z) => (z > 0 ? 1 : s) };
    }
    case "elu": { // g = α(e^z − 1) for z ≤ 0, g' = α e^z there
      const al = opt("alpha", 1.0);
      return { name, g: (z) => (z > 0 ? z : al * Math.expm1(z)), dg: (z) => (z > 0 ? 1 : al * Math.exp(z)) };
    }
    case "selu": // λ elu_α with PyTorch's fixed α, λ
      return {
        name,
        g: (z) => SELU_SCALE * (z > 0 ? z : SELU_ALPHA * Math.expm1(z)),
        dg: (z) => SELU_SCALE * (z > 0 ? 1 : SELU_ALPHA * Math.exp(z)),
      };
    case "softplus": { // g = log(1 + e^{βz})/β, and z where βz > threshold; g' = σ(βz), 1 there
      const beta = opt("beta", 1.0);
      const th = opt("threshold", 20.0);
      return {
        name,
        g: (z) => (beta * z > th ? z : softplus(beta * z) / beta),
        dg: (z) => (beta * z > th ? 1 : sigmoid(beta * z)),
      };
    }
    case "gelu": { // g = z Φ(z), g' = Φ(z) + z φ(z), Φ(z) = ½(1 + erf(z/√2))
      const cdf = (z) => 0.5 * (1 + erf(z / Math.SQRT2));
      return { name, g: (z) => z * cdf(z), dg: (z) => cdf(z) + (z * Math.exp(-0.5 * z * z)) / Math.sqrt(2 * Math.PI) };
    }
    case "gelu_tanh": { // g = ½ z (1 + tanh u), u = √(2/π)(z + 0.044715 z³)
      const t = (z) => Math.tanh(GELU_K * (z + GELU_C * z * z * z));
      return {
        name,
        g: (z) => 0.5 * z * (1 + t(z)),
        dg: (z) => {
          const tz = t(z);
          return 0.5 * (1 + tz) + 0.5 * z * (1 - tz * tz) * GELU_K * (1 + 3 * GELU_C * z * z);
        },
      };
    }
    case "silu": // g = z σ(z), g' = σ(1 + z(1 − σ))
      return { name, g: (z) => z * sigmoid(z), dg: (z) => { const s = sigmoid(z); return s * (1 + z * (1 - s)); } };
    case "mish": // g = z tanh(sp(z)), g' = tanh(sp) + z σ(z)(1 − tanh²(sp))
      return {
        name,
        g: (z) => z * Math.tanh(softplus(z)),
        dg: (z) => { const t = Math.tanh(softplus(z)); return t + z * sigmoid(z) * (1 - t * t); },
      };
    case "softsign": // g = z/(1 + |z|), g' = 1/(1 + |z|)²
      return { name, g: (z) => z / (1 + Math.abs(z)), dg: (z) => { const d = 1 + Math.abs(z); return 1 / (d * d); } };
    case "hardtanh": { // clip to [lo, hi]; g' = 1 strictly inside, 0 at both ends
      const lo = opt("min_val", -1.0);
      const hi = opt("max_val", 1.0);
      return { name, g: (z) => Math.min(Math.max(z, lo), hi), dg: (z) => (z > lo && z < hi ? 1 : 0) };
    }
    case "softmax": // a_j = e^{z_j − m}/Σ_k e^{z_k − m}; δ = a ⊙ (∇_a C − ⟨∇_a C, a⟩)
      return { name, rowwise: true, G: softmaxRows, vjp: (Z, A, GA) => rowVjp(A, GA, (a, g, dot) => a * (g - dot), true) };
    case "log_softmax": // a_j = z_j − m − log Σ_k e^{z_k − m}; δ = ∇_a C − softmax(z) Σ_j (∇_a C)_j
      return { name, rowwise: true, G: logSoftmaxRows, vjp: (Z, A, GA) => rowVjp(A, GA, (a, g, sum) => g - Math.exp(a) * sum, false) };
    default:
      return refuse(`${where}: activation ${JSON.stringify(name)} is not supported by this port`);
  }
}

function softmaxRows(Z) {
  const A = matrix(Z.rows, Z.cols);
  for (let r = 0; r < Z.rows; r++) {
    let m = -Infinity;
    for (let c = 0; c < Z.cols; c++) m = Math.max(m, at(Z, r, c));
    let s = 0;
    for (let c = 0; c < Z.cols; c++) s += Math.exp(at(Z, r, c) - m);
    for (let c = 0; c < Z.cols; c++) A.data[r * Z.cols + c] = Math.exp(at(Z, r, c) - m) / s;
  }
  return A;
}

function logSoftmaxRows(Z) {
  const A = matrix(Z.rows, Z.cols);
  for (let r = 0; r < Z.rows; r++) {
    let m = -Infinity;
    for (let c = 0; c < Z.cols; c++) m = Math.max(m, at(Z, r, c));
    let s = 0;
    for (let c = 0; c < Z.cols; c++) s += Math.exp(at(Z, r, c) - m);
    const lse = Math.log(s);
    for (let c = 0; c < Z.cols; c++) A.data[r * Z.cols + c] = at(Z, r, c) - m - lse;
  }
  return A;
}

// per row: withDot ? Σ_j g_j a_j : Σ_j g_j, then f(a, g, that) elementwise
function rowVjp(A, GA, f, withDot) {
  const D = matrix(A.rows, A.cols);
  for (let r = 0; r < A.rows; r++) {
    let s = 0;
    for (let c = 0; c < A.cols; c++) s += withDot ? at(GA, r, c) * at(A, r, c) : at(GA, r, c);
    for (let c = 0; c < A.cols; c++) D.data[r * A.cols + c] = f(at(A, r, c), at(GA, r, c), s);
  }
  return D;
}

// -- losses: value C(ỹ, y) and ∇_ỹ C; N = number of elements of ỹ, m = number of examples ---------------------------
const IGNORE_INDEX = -100;
const BCE_GUARD = Math.fround(1e-12); // torch's guard against 0/0 in the BCE gradient, a float32 constant

// log p clamped at −100, and log 0 = −100 (torch's BCELoss)
function clampedLog(p) {
  return p > 0 ? Math.max(Math.log(p), -100) : -100;
}

function sign(r) {
  return r > 0 ? 1 : r < 0 ? -1 : 0;
}

function makeLoss(spec) {
  const name = typeof spec === "string" ? spec : spec && spec.name;
  const p = typeof spec === "object" && spec !== null ? spec : {};
  // elementwise losses: C = scale Σ ℓ(ỹ, y), ∂C/∂ỹ = scale ℓ'(ỹ, y), scale from N and m
  const elementwise = (scale, l, dl) => ({
    name,
    value: (A, Y) => { let s = 0; for (let k = 0; k < A.data.length; k++) s += l(A.data[k], Y.data[k]); return s * scale(A); },
    grad: (A, Y) => map(A, (a, k) => dl(a, Y.data[k]) * scale(A)),
  });
  const one = () => 1;
  const perElement = (A) => 1 / A.data.length;
  switch (name) {
    case "half_sse": // C = ½ Σ (ỹ − y)², ∇ = ỹ − y
      return elementwise(one, (a, y) => 0.5 * (a - y) * (a - y), (a, y) => a - y);
    case "sse": // C = Σ (y − ỹ)², ∇ = −2(y − ỹ)
      return elementwise(one, (a, y) => (y - a) * (y - a), (a, y) => -2 * (y - a));
    case "half_mse": // C = Σ (ỹ − y)²/(2m), ∇ = (ỹ − y)/m
      return elementwise((A) => 1 / A.rows, (a, y) => 0.5 * (a - y) * (a - y), (a, y) => a - y);
    case "mse": // C = Σ (ỹ − y)²/N, ∇ = 2(ỹ − y)/N
      return elementwise(perElement, (a, y) => (a - y) * (a - y), (a, y) => 2 * (a - y));
    case "l1": // C = Σ |ỹ − y|/N, ∇ = sign(ỹ − y)/N (0 where ỹ = y)
      return elementwise(perElement, (a, y) => Math.abs(a - y), (a, y) => sign(a - y));
    case "huber": { // ℓ = ½ r² (|r| < δ), δ(|r| − ½δ) else; ℓ' = clip(r, −δ, δ); mean
      const d = p.delta === undefined ? 1.0 : p.delta;
      return elementwise(perElement,
        (a, y) => { const r = Math.abs(a - y); return r < d ? 0.5 * r * r : d * (r - 0.5 * d); },
        (a, y) => Math.min(Math.max(a - y, -d), d));
    }
    case "smooth_l1": { // ℓ = ½ r²/β (|r| < β), |r| − ½β else; ℓ' = r/β or sign(r); mean
      const b = p.beta === undefined ? 1.0 : p.beta;
      return elementwise(perElement,
        (a, y) => { const r = Math.abs(a - y); return r < b ? (0.5 * r * r) / b : r - 0.5 * b; },
        (a, y) => { const r = a - y; return Math.abs(r) < b ? r / b : sign(r); });
    }
    case "bce": // C = −Σ [y log ỹ + (1 − y) log(1 − ỹ)]/N; ∇ = (ỹ − y)/max(ỹ(1 − ỹ), 1e-12)/N
      return elementwise(perElement,
        (a, y) => -(y * clampedLog(a) + (1 - y) * clampedLog(1 - a)),
        (a, y) => (a - y) / Math.max(a * (1 - a), BCE_GUARD));
    case "bce_with_logits": // C = Σ [max(x, 0) − x y + log(1 + e^{−|x|})]/N; ∇ = (σ(x) − y)/N
      return elementwise(perElement,
        (a, y) => Math.max(a, 0) - a * y + Math.log1p(Math.exp(-Math.abs(a))),
        (a, y) => sigmoid(a) - y);
    case "cross_entropy": // C = Σ_kept [lse(x_i) − x_{i,y_i}]/m_kept; ∇ = (softmax(x) − onehot(y))/m_kept, 0 if ignored
      return classLoss(name, softmaxRows, (P, Y, r, c, kept) => (at(P, r, c) - (c === Y[r] ? 1 : 0)) / kept,
        (Z, r, yr) => at(logSoftmaxRows(rowOf(Z, r)), 0, yr));
    case "nll": // C = −Σ_kept a_{i,y_i}/m_kept; ∇ = −onehot(y)/m_kept
      return classLoss(name, (A) => A, (A, Y, r, c, kept) => -(c === Y[r] ? 1 : 0) / kept, (A, r, yr) => at(A, r, yr));
    default:
      return refuse(`loss ${JSON.stringify(name)} is not supported by this port`);
  }
}

function rowOf(M, r) {
  return matrix(1, M.cols, M.data.slice(r * M.cols, (r + 1) * M.cols));
}

// class-index losses; a target of −100 ignores its row (its gradient is 0, m_kept counts the others)
function classLoss(name, prepare, gradAt, logProb) {
  return {
    name,
    classes: true,
    value: (A, Yt) => {
      const Y = Yt.data;
      let s = 0;
      let kept = 0;
      for (let r = 0; r < A.rows; r++) {
        if (Y[r] === IGNORE_INDEX) continue;
        s -= logProb(A, r, Y[r]);
        kept++;
      }
      return s / kept;
    },
    grad: (A, Yt) => {
      const Y = Yt.data;
      const kept = Math.max(Y.filter((v) => v !== IGNORE_INDEX).length, 1);
      const P = prepare(A);
      const G = matrix(A.rows, A.cols);
      for (let r = 0; r < A.rows; r++) {
        if (Y[r] === IGNORE_INDEX) continue;
        for (let c = 0; c < A.cols; c++) G.data[r * A.cols + c] = gradAt(P, Y, r, c, kept);
      }
      return G;
    },
  };
}

// -- the network -------------------------------------------------------------------------------------------------
function parseSpec(spec) {
  const layers = spec.layers.map((layer, i) => {
    if (layer.type !== "dense") refuse(`layers[${i}]: layer type ${JSON.stringify(layer.type)} is not supported by this port (dense only)`);
    const act = makeActivation(layer.activation, `layers[${i}]`);
    if (act.rowwise && i !== spec.layers.length - 1) refuse(`layers[${i}]: ${act.name} is only allowed on the output layer`);
    return { units: layer.units, act, bias: layer.bias !== false };
  });
  let inputSize;
  if (spec.format_version === 1) inputSize = spec.input_size;
  else if (spec.format_version === 2) {
    const shape = spec.input && spec.input.shape;
    if (!Array.isArray(shape) || shape.length !== 1) {
      refuse(`input.shape ${JSON.stringify(shape)} is not supported by this port (a flat input, one axis, only)`);
    }
    inputSize = shape[0];
  } else refuse(`format_version ${JSON.stringify(spec.format_version)} is not supported by this port`);
  return { inputSize, layers, loss: makeLoss(spec.loss) };
}

// z = a θᵀ + b: z[r][j] = Σ_k a[r][k] θ[j][k] + b[j]
function denseForward(A, W, b) {
  const Z = matrix(A.rows, W.rows);
  for (let r = 0; r < A.rows; r++) {
    for (let j = 0; j < W.rows; j++) {
      let s = 0;
      for (let k = 0; k < W.cols; k++) s += at(A, r, k) * at(W, j, k);
      Z.data[r * W.rows + j] = s + (b ? b[j] : 0);
    }
  }
  return Z;
}

// ∂C/∂a = δ θ: g[r][k] = Σ_j δ[r][j] θ[j][k]  (θᵀδ per example)
function backToInput(D, W) {
  const G = matrix(D.rows, W.cols);
  for (let r = 0; r < D.rows; r++) {
    for (let k = 0; k < W.cols; k++) {
      let s = 0;
      for (let j = 0; j < W.rows; j++) s += at(D, r, j) * at(W, j, k); // δ θ
      G.data[r * W.cols + k] = s;
    }
  }
  return G;
}

// ∂C/∂θ = δᵀ a: gW[j][k] = Σ_r δ[r][j] a[r][k];  ∂C/∂b = Σ_r δ[r]
function weightGrads(D, A) {
  const gW = matrix(D.cols, A.cols);
  const gb = new Float64Array(D.cols);
  for (let j = 0; j < D.cols; j++) {
    for (let k = 0; k < A.cols; k++) {
      let s = 0;
      for (let r = 0; r < D.rows; r++) s += at(D, r, j) * at(A, r, k);
      gW.data[j * A.cols + k] = s;
    }
    for (let r = 0; r < D.rows; r++) gb[j] += at(D, r, j);
  }
  return [gW, gb];
}

// δ = ∇_a C ⊙ g'(z), or the row-wise vector-Jacobian product of softmax / log_softmax
function activationBackward(act, Z, A, GA) {
  if (act.rowwise) return act.vjp(Z, A, GA);
  return map(GA, (g, k) => g * act.dg(Z.data[k], A.data[k]));
}

function run(net, tensors) {
  const get = (name) => {
    if (!tensors[name]) throw new Error(`inputs.safetensors has no tensor ${name}`);
    return tensors[name];
  };
  const X = get("x");
  const m = X.shape[0];
  const weights = net.layers.map((layer, i) => {
    const W = get(`layers.${i}.weight`);
    return {
      W: matrix(W.shape[0], W.shape[1], W.data),
      b: layer.bias ? get(`layers.${i}.bias`).data : null,
    };
  });

  // forward: keep every z_i and a_{i+1}
  const acts = [matrix(m, net.inputSize, X.data)];
  const zs = [];
  net.layers.forEach((layer, i) => {
    const Z = denseForward(acts[i], weights[i].W, weights[i].b);
    zs.push(Z);
    acts.push(layer.act.rowwise ? layer.act.G(Z) : map(Z, (z) => layer.act.g(z)));
  });
  const L = net.layers.length;
  const out = acts[L];
  const Yt = get("y");
  const Y = net.loss.classes ? { data: Array.from(Yt.data) } : matrix(out.rows, out.cols, Yt.data);
  const loss = net.loss.value(out, Y);

  // backward: equation 1 at the output, then 3 and 4 for each layer and 2 down to the layer below
  const deltas = new Array(L);
  const grads = new Array(L);
  let GA = net.loss.grad(out, Y); // ∇_ỹ C
  let inputGrad = null;
  for (let i = L - 1; i >= 0; i--) {
    const D = activationBackward(net.layers[i].act, zs[i], acts[i + 1], GA); // δ_i = ∂C/∂z_i
    deltas[i] = D;
    grads[i] = weightGrads(D, acts[i]); // equations 3 and 4
    GA = backToInput(D, weights[i].W); // ∂C/∂a_i = δ_i θ_i, g'(z_{i-1}) applied at the next step (equation 2)
    if (i === 0) inputGrad = GA;
  }
  return { loss, deltas, grads, inputGrad, zs, acts };
}

function main() {
  const folder = process.argv[2];
  if (!folder) {
    process.stderr.write("usage: node bp.js CASE_FOLDER\n");
    process.exit(2);
  }
  const meta = JSON.parse(fs.readFileSync(path.join(folder, "case.json"), "utf8"));
  const dtype = meta.dtype;
  if (dtype !== "float64" && dtype !== "float32") refuse(`dtype ${dtype} is not supported by this port`);
  const net = parseSpec(meta.spec);
  const tensors = readSafetensors(path.join(folder, "inputs.safetensors"));
  const r = run(net, tensors);

  const outputs = [["loss", [], new Float64Array([r.loss])]];
  net.layers.forEach((layer, i) => {
    const [gW, gb] = r.grads[i];
    outputs.push([`grad.layers.${i}.weight`, [gW.rows, gW.cols], gW.data]);
    if (layer.bias) outputs.push([`grad.layers.${i}.bias`, [gb.length], gb]);
    outputs.push([`delta.layers.${i}`, [r.deltas[i].rows, r.deltas[i].cols], r.deltas[i].data]);
    outputs.push([`z.layers.${i}`, [r.zs[i].rows, r.zs[i].cols], r.zs[i].data]);
    outputs.push([`a.layers.${i}`, [r.acts[i + 1].rows, r.acts[i + 1].cols], r.acts[i + 1].data]);
  });
  outputs.push(["input.grad", [r.inputGrad.rows, r.inputGrad.cols], r.inputGrad.data]);
  writeSafetensors(path.join(folder, "outputs.safetensors"), outputs, dtype === "float32" ? "F32" : "F64");
}

try {
  main();
} catch (err) {
  if (err instanceof Unsupported) {
    process.stderr.write(`bp.js: unsupported case: ${err.message}\n`);
    process.exit(3);
  }
  throw err; // a bug: Node prints the stack and exits 1
}
