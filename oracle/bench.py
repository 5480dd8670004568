"""``bp-oracle bench``: speed and memory of manual_bp, torch, a full oracle check and gradcheck, side by side.

Everything is measured in one process (memory in fresh subprocesses), contenders interleaved
(A B A B ...) so that a noisy neighbour slows both alike; every figure is a median over repeats
after a warm-up, and every target is a ratio of two numbers from the same run.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SIZES = [((3, 4, 4, 1), 1), ((16, 32, 32, 4), 32), ((256, 512, 512, 10), 256), ((1024, 2048, 2048, 1000), 512)]


def mlp_spec(widths):
    import manual_bp as bp

    layers = [{"type": "dense", "units": w, "activation": "tanh"} for w in widths[1:-1]]
    layers.append({"type": "dense", "units": widths[-1], "activation": "identity"})
    name = "-".join(map(str, widths))
    return bp.Spec.from_dict({"format_version": 1, "name": name, "input_size": widths[0], "layers": layers, "loss": "mse"})


#: the CNN row: two conv-relu-pool blocks and a dense head on 3×32×32 images, batch 64
CNN = {"format_version": 2, "name": "cnn-3x32x32", "input": {"shape": [3, 32, 32]}, "loss": "cross_entropy", "layers": [
    {"type": "conv2d", "out_channels": 16, "kernel_size": 3, "padding": 1, "activation": "relu"},
    {"type": "max_pool2d", "kernel_size": 2},
    {"type": "conv2d", "out_channels": 32, "kernel_size": 3, "padding": 1, "activation": "relu"},
    {"type": "max_pool2d", "kernel_size": 2},
    {"type": "flatten"},
    {"type": "dense", "units": 10, "activation": "identity"}]}
CNN_BATCH = 64


def _conv(c, act="identity", bias=True):
    return {"type": "conv2d", "out_channels": c, "kernel_size": 3, "padding": 1, "activation": act, "bias": bias}


#: the batch-norm row: the CNN with a batch norm (training mode) between each conv and its relu
CNN_BN = {**CNN, "name": "cnn-bn-3x32x32", "layers": [
    _conv(16, bias=False), {"type": "batch_norm", "activation": "relu"}, {"type": "max_pool2d", "kernel_size": 2},
    _conv(32, bias=False), {"type": "batch_norm", "activation": "relu"}, {"type": "max_pool2d", "kernel_size": 2},
    {"type": "flatten"}, {"type": "dense", "units": 10, "activation": "identity"}]}

#: the residual row: a ResNet basic block (conv-bn-relu-conv-bn, identity skip, relu) between the CNN's pools
RESNET = {**CNN, "name": "resnet-3x32x32", "layers": [
    _conv(16, "relu"), {"type": "max_pool2d", "kernel_size": 2},
    {"type": "residual", "activation": "relu", "body": [
        _conv(16, bias=False), {"type": "batch_norm", "activation": "relu"}, _conv(16, bias=False), {"type": "batch_norm"}]},
    {"type": "max_pool2d", "kernel_size": 2}, {"type": "flatten"}, {"type": "dense", "units": 10, "activation": "identity"}]}


def cnn_rows(repeats: int, progress=print) -> list:
    """manual_bp vs torch (forward + backward, every δ kept) on the CNN, its batch-norm version and a residual
    block, float64 and float32."""
    import manual_bp as bp

    rows = []
    for net in (CNN, CNN_BN, RESNET):
        spec = bp.Spec.from_dict(net)
        for dtype in ("float64", "float32"):
            params, x, y = bp.random_case(spec, 0, batch=CNN_BATCH, dtype=dtype)
            t = interleaved({"manual_bp": lambda: bp.gradients(spec, params, x, y),
                             "torch": _torch_step(spec, params, x, y)}, repeats)
            rows.append({"net": net["name"], "size": spec.describe().split(",")[0], "batch": CNN_BATCH, "dtype": dtype,
                         "manual_s": t["manual_bp"], "torch_s": t["torch"], "time_ratio": t["manual_bp"] / t["torch"]})
            progress(f"  {net['name']} b{CNN_BATCH} {dtype}: manual/torch time {rows[-1]['time_ratio']:.2f}")
    return rows


#: the sequence rows (issue 12): an LSTM returning its whole sequence, and multi-head self-attention
#: (no causal mask), each under a per-step dense head (8 outputs per step, mse over every step)
LSTM_NET = {"format_version": 2, "name": "lstm-32x128", "input": {"shape": [32, 128]}, "loss": "mse", "layers": [
    {"type": "lstm", "hidden_size": 128},
    {"type": "temporal_dense", "units": 8, "activation": "identity"}]}
ATTENTION_NET = {"format_version": 2, "name": "attention-64x128", "input": {"shape": [64, 128]}, "loss": "mse", "layers": [
    {"type": "attention", "num_heads": 4},
    {"type": "temporal_dense", "units": 8, "activation": "identity"}]}
#: (spec, batch, label) of each sequence row
SEQUENCE_NETS = [(LSTM_NET, 32, "LSTM (T = 32, hidden 128)"), (ATTENTION_NET, 16, "attention (T = 64, d = 128, 4 heads)")]
SEQUENCE_TARGET = 3.0


def sequence_rows(repeats: int, progress=print) -> list:
    """manual_bp vs torch (forward + backward, every δ kept) on an LSTM and on multi-head self-attention, each with
    a per-step dense head, float64 and float32. torch runs the Twin: nn.LSTM / nn.MultiheadAttention(batch_first)
    then nn.Linear on every step, the loss on m·T rows, as ``oracle.twin.TWIN_MODULES`` builds them."""
    import manual_bp as bp

    rows = []
    for net, batch, label in SEQUENCE_NETS:
        spec = bp.Spec.from_dict(net)
        for dtype in ("float64", "float32"):
            params, x, y = bp.random_case(spec, 0, batch=batch, dtype=dtype)
            t = interleaved({"manual_bp": lambda: bp.gradients(spec, params, x, y),
                             "torch": _torch_step(spec, params, x, y)}, repeats)
            rows.append({"net": net["name"], "label": label, "size": spec.describe().split(",")[0], "batch": batch,
                         "dtype": dtype, "manual_s": t["manual_bp"], "torch_s": t["torch"],
                         "time_ratio": t["manual_bp"] / t["torch"], "target": SEQUENCE_TARGET})
            progress(f"  {net['name']} b{batch} {dtype}: manual/torch time {rows[-1]['time_ratio']:.2f}")
    return rows


def _case(widths, batch, dtype, seed=0):
    import manual_bp as bp

    spec = mlp_spec(widths)
    return (spec, *bp.random_case(spec, seed, batch=batch, dtype=dtype))


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Median seconds per call of each function, calling them in turn (A B C A B C ...)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _torch_step(spec, params, x, y):
    """A torch forward+backward on the twin (an nn.Module built once) computing what manual_bp returns."""
    import torch

    from .twin import Twin, loss_fn

    tdt = torch.float64 if x.dtype == np.float64 else torch.float32
    model = Twin(spec, tdt)
    with torch.no_grad():
        for name, t in model.named_parameters():
            t.copy_(torch.from_numpy(params[name]))
    xt, yt = torch.from_numpy(x).requires_grad_(True), torch.from_numpy(y)
    loss = loss_fn(spec.loss)

    def step():  # the same outputs as manual_bp.gradients: ∂C/∂θ, ∂C/∂b, ∂C/∂x and every δ
        model.zero_grad(set_to_none=True)
        xt.grad = None
        out, zs, _ = model.forward_all(xt)
        for z in zs:
            z.retain_grad()
        loss(out, yt).backward()
    return step


def backward_flops(widths, batch) -> float:
    """δᵀa and δθ per layer: 2 matmuls of 2·m·out·in flops each."""
    return sum(4.0 * batch * a * b for a, b in zip(widths[:-1], widths[1:]))


def matmul_gflops(widths, batch, dtype, repeats) -> float:
    """NumPy throughput on exactly the backward's matmuls (δᵀa and δθ per layer), alone, in this run."""
    rng = np.random.default_rng(1)
    per_layer = [(rng.standard_normal((batch, b)).astype(dtype),   # δ_i   (m, out)
                  rng.standard_normal((batch, a)).astype(dtype),   # a_i   (m, in)
                  rng.standard_normal((b, a)).astype(dtype))       # θ_i   (out, in)
                 for a, b in zip(widths[:-1], widths[1:])]
    t = interleaved({"mm": lambda: [(d.T @ a, d @ w) for d, a, w in per_layer]}, repeats)["mm"]
    return backward_flops(widths, batch) / t / 1e9


_MEM_CODE = r"""
import sys, json, numpy as np
sys.path.insert(0, {root!r})
from oracle.bench import _case, _torch_step
import manual_bp as bp, torch
widths, batch, dtype, who = {widths!r}, {batch!r}, {dtype!r}, {who!r}
def make(widths, batch):
    spec, params, x, y = _case(widths, batch, dtype)
    return (lambda: bp.gradients(spec, params, x, y)) if who == "manual_bp" else _torch_step(spec, params, x, y)
make((3, 4, 4, 1), 1)()  # warm-up on a tiny net: thread pools and the autograd engine are not the step's memory
step = make(widths, batch)
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
import gc; gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak resident size (VmHWM) to the current one
before = status("VmRSS")
step()
print(json.dumps(status("VmHWM") - before))
"""


def peak_memory(widths, batch, dtype, who) -> int:
    """Bytes one forward+backward adds to the peak resident memory of a fresh process, after a warm-up
    on a tiny net (Linux: VmHWM reset through /proc/self/clear_refs just before the step)."""
    root = str(Path(__file__).resolve().parent.parent)
    code = _MEM_CODE.format(root=root, widths=tuple(widths), batch=batch, dtype=dtype, who=who)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(json.loads(out.stdout.strip().splitlines()[-1]))


def machine_facts() -> dict:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    blas = "unknown"
    try:
        from threadpoolctl import threadpool_info

        blas = "; ".join(f"{i.get('internal_api')} {i.get('version')} ({i.get('num_threads')} threads)" for i in threadpool_info())
    except Exception:
        cfg = np.show_config(mode="dicts") if hasattr(np, "show_config") else {}
        try:
            blas = cfg["Build Dependencies"]["blas"]["name"]
        except Exception:
            pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
        "numpy": np.__version__, "numpy_blas": blas, "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "torch_blas": torch.__config__.show().split("BLAS_INFO=")[-1].split(",")[0],
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "OPENBLAS_NUM_THREADS",
                                               "OPENBLAS_THREAD_TIMEOUT", "OPENBLAS_CORETYPE", "MKL_NUM_THREADS")},
    }


def run(quick: bool = False, progress=print) -> dict:
    import torch

    import manual_bp as bp

    from .checker import check

    repeats = 3 if quick else 7
    sizes = SIZES[:3] if quick else SIZES
    rows = []
    for widths, batch in sizes:
        for dtype in ("float64", "float32"):
            spec, params, x, y = _case(widths, batch, dtype)
            reps = repeats if widths[1] < 2048 else max(3, repeats // 2)
            step = _torch_step(spec, params, x, y)
            t = interleaved({"manual_bp": lambda: bp.gradients(spec, params, x, y), "torch": step,
                             "torch_sized": _sized(spec, batch, step)}, reps)
            flops = backward_flops(widths, batch)
            mm = matmul_gflops(widths, batch, dtype, reps)
            # backward alone: forward once, then time backward from the cache
            cache = bp.forward(spec, params, x)
            tb = interleaved({"bwd": lambda: bp.backward(cache, y)}, reps)["bwd"]
            row = {"size": "-".join(map(str, widths)), "batch": batch, "dtype": dtype,
                   "manual_s": t["manual_bp"], "torch_s": t["torch"], "time_ratio": t["manual_bp"] / t["torch"],
                   "torch_sized_s": t["torch_sized"], "sized_ratio": t["manual_bp"] / t["torch_sized"],
                   "torch_sized_threads": _threads_used(spec, batch),
                   "backward_gflops": flops / tb / 1e9, "matmul_gflops": mm,
                   "backward_vs_matmul": flops / tb / 1e9 / mm}
            if not quick or widths[1] >= 512:
                mem_m, mem_t = peak_memory(widths, batch, dtype, "manual_bp"), peak_memory(widths, batch, dtype, "torch")
                row.update({"manual_peak_bytes": mem_m, "torch_peak_bytes": mem_t,
                            "memory_ratio": mem_m / mem_t if mem_t > 0 else None})
            rows.append(row)
            progress(f"  {row['size']:>22s} b{batch:<4d} {dtype}: manual/torch time {row['time_ratio']:.2f}, "
                     f"backward {row['backward_gflops']:.1f} GFLOP/s = {100 * row['backward_vs_matmul']:.0f}% of matmul")

    cnn = cnn_rows(repeats, progress)
    # a step takes tens of ms: a few more repeats than --quick's 3 cost seconds and steady the median
    sequence = sequence_rows(max(repeats, 11), progress)

    # a full check vs its halves alone, and vs gradcheck
    checks = []
    for widths, batch in SIZES[:3] if not quick else SIZES[:2]:
        spec, params, x, y = _case(widths, batch, "float64")
        halves = _sized(spec, batch, _torch_step(spec, params, x, y))  # torch as the check runs it
        t = interleaved({"check": lambda: check(spec, params, x, y),
                         "manual_bp": lambda: bp.gradients(spec, params, x, y),
                         "torch": halves}, repeats)
        row = {"size": "-".join(map(str, widths)), "batch": batch, "check_s": t["check"],
               "halves_s": t["manual_bp"] + t["torch"], "overhead_ratio": t["check"] / (t["manual_bp"] + t["torch"])}
        row.update(_gradcheck(spec, params, x, y, quick))
        checks.append(row)
        progress(f"  check {row['size']}: {row['overhead_ratio']:.2f}× its halves; gradcheck {row['gradcheck_ratio']:.0f}× "
                 f"(fast_mode {row['gradcheck_fast_ratio']:.0f}×) a full check{' (extrapolated)' if row['extrapolated'] else ''}")

    hypo = _hypothesis_rate(100 if quick else 400)
    progress(f"  Hypothesis: {hypo:.0f} examples/s on small random nets")
    campaign = _campaign_rates(2048 if quick else 16384)
    progress(f"  campaign: {campaign['cases_per_s']:.0f} cases/s with {campaign['workers']} workers, "
             f"{campaign['one_worker_cases_per_s']:.0f} with one")
    command = _command_times()
    progress(f"  check --example seed-simple: {command['check_with_report_s']:.2f} s with its report "
             f"(import torch alone: {command['import_torch_s']:.2f} s)")
    suite = None if quick else _suite_time()
    return {"schema": "bp-oracle/bench", "schema_version": 1, "quick": quick, "machine": machine_facts(),
            "mlp": rows, "cnn": cnn, "sequence": sequence, "check": checks, "hypothesis_examples_per_s": hypo,
            "campaign": campaign, "command": command,
            "test_suite_s": suite, "torch_threads": torch.get_num_threads()}


def _sized(spec, batch, fn):
    """``fn`` run with torch on the threads a check gives this network (``twin.threads_for``: one for a small one)."""
    from .twin import threads_for

    def run():
        with threads_for(spec, batch):
            return fn()
    return run


def _threads_used(spec, batch) -> int:
    import torch

    from .twin import threads_for

    with threads_for(spec, batch):
        return torch.get_num_threads()


def _campaign_rates(examples: int) -> dict:
    """Cases per second of ``campaign --nets dense`` (manual_bp, both dtypes, every regime), on every core and on one;
    the single-worker run is a quarter as long."""
    from .campaign import default_workers, run_campaign

    workers = max(2, default_workers(10**6))
    res = {}
    for label, n, w in (("many", examples, workers), ("one", max(512, examples // 4), 1)):
        with open(os.devnull, "w") as quiet:
            rep = run_campaign(examples=n, seed=1, nets="dense", dtype="both", workers=w, report_dir=None,
                               progress=False, out=quiet)
        res[label] = rep["timing"]["cases_per_second"]
    return {"examples": examples, "workers": workers, "cases_per_s": res["many"], "one_worker_cases_per_s": res["one"],
            "per_net": 16}


def _command_times() -> dict:
    """Wall seconds of ``bp-oracle check --example seed-simple`` with its report (into a temporary folder) and
    without, and of ``python -c 'import torch'`` (the floor under both), each the best of three fresh processes."""
    import tempfile

    def best(argv):
        times = []
        for _ in range(3):
            t = time.perf_counter()
            subprocess.run(argv, capture_output=True, check=False)
            times.append(time.perf_counter() - t)
        return min(times)

    cli = [sys.executable, "-c", "import sys; from oracle.cli import main; sys.exit(main(sys.argv[1:]))",
           "check", "--example", "seed-simple"]
    with tempfile.TemporaryDirectory() as tmp:
        return {"check_with_report_s": best(cli + ["--report", tmp]), "check_no_report_s": best(cli + ["--no-report"]),
                "import_torch_s": best([sys.executable, "-c", "import torch"])}


def _gradcheck(spec, params, x, y, quick) -> dict:
    """torch.autograd.gradcheck (default and fast_mode) on the same model and loss, against one full check."""
    import torch

    from .checker import check
    from .twin import Twin, loss_fn

    model = Twin(spec, torch.float64)
    names = [n for n, _ in model.named_parameters()]
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    lf = loss_fn(spec.loss)

    def loss_of(*flat):
        out = torch.func.functional_call(model, dict(zip(names, flat)), (xt,))
        return lf(out, yt)

    inputs = tuple(torch.tensor(params[n], requires_grad=True) for n in names)
    n_params = sum(p.numel() for p in inputs)
    t_check = interleaved({"c": lambda: check(spec, params, x, y)}, 3)["c"]
    full_limit, budget = 5_000, (200 if quick else 500)
    extrapolated = n_params > full_limit
    if extrapolated:  # gradcheck over the first `budget` weights of layer 0 only, scaled by the parameter count
        full = inputs[0].detach()
        sub = full.reshape(-1)[:budget].clone().requires_grad_(True)
        rest = [p.detach() for p in inputs[1:]]

        def loss_sub(w):
            w0 = torch.cat([w, full.reshape(-1)[budget:]]).reshape(full.shape)
            return loss_of(w0, *rest)
        args, fn, scale = (sub,), loss_sub, n_params / budget
    else:
        args, fn, scale = inputs, loss_of, 1.0
    t0 = time.perf_counter()
    torch.autograd.gradcheck(fn, args)
    t_default = (time.perf_counter() - t0) * scale
    t0 = time.perf_counter()
    torch.autograd.gradcheck(fn, args, fast_mode=True)
    t_fast = time.perf_counter() - t0  # fast_mode costs O(1) passes per input, not O(parameters)
    return {"gradcheck_s": t_default, "gradcheck_fast_s": t_fast, "params": n_params, "extrapolated": extrapolated,
            "gradcheck_ratio": t_default / t_check, "gradcheck_fast_ratio": t_fast / t_check}


def _hypothesis_rate(n: int) -> float:
    from hypothesis import HealthCheck, Phase, given, settings

    from .checker import check
    from .strategies import cases, specs

    small = specs(max_depth=3, max_width=8, max_input=8)

    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(cases(specs_strategy=small, dtypes=("float64",), max_batch=4))
    def prop(case):
        assert check(case.spec, case.params, case.x, case.y).passed

    t = time.perf_counter()
    prop()
    return n / (time.perf_counter() - t)


def _suite_time() -> float:
    root = Path(__file__).resolve().parent.parent
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-x"], cwd=root, capture_output=True, check=False)
    return time.perf_counter() - t


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = ["## bp-oracle benchmark" + (" (--quick)" if res["quick"] else ""), "",
             f"Machine: {m['cpu']}, {m['cores']} cores; NumPy {m['numpy']} ({m['numpy_blas']}); torch {m['torch']} "
             f"({m['torch_threads']} threads, BLAS {m['torch_blas']}); Python {m['python']}.", "",
             "### manual_bp vs torch, forward + backward (medians, interleaved)", "",
             "Both compute the same outputs: every ∂C/∂θ and ∂C/∂b, ∂C/∂x, and every layer's δ "
             "(torch through `retain_grad` on each pre-activation).", "",
             "Two thread settings for torch, both measured: as configured (all its threads), and as a check runs it "
             "(`twin.threads_for`: one thread for a small network, where waking idle OpenMP workers costs more than the "
             "op). NumPy keeps its BLAS threads in both.", "",
             "| MLP | batch | dtype | manual_bp | torch (all threads) | ratio | torch (per size) | ratio | peak mem ratio "
             "| backward GFLOP/s | of matmul |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["mlp"]:
        mem = f"{r['memory_ratio']:.2f}" if r.get("memory_ratio") else "—"
        sized = (f"{1e3 * r['torch_sized_s']:.3f} ms ({r['torch_sized_threads']} thr.) | **{r['sized_ratio']:.2f}**"
                 if "torch_sized_s" in r else "— | —")
        lines.append(f"| {r['size']} | {r['batch']} | {r['dtype']} | {1e3 * r['manual_s']:.3f} ms | {1e3 * r['torch_s']:.3f} ms | "
                     f"**{r['time_ratio']:.2f}** | {sized} | {mem} | {r['backward_gflops']:.2f} | "
                     f"{100 * r['backward_vs_matmul']:.0f}% |")
    lines += ["", f"### Conv nets: 3×32×32 images, batch {CNN_BATCH}: plain, with batch norm, with a residual block "
              "(target: manual/torch ≤ 2)", "",
              "| net | batch | dtype | manual_bp | torch | manual/torch |", "|---|---|---|---|---|---|"]
    for r in res.get("cnn", []):
        lines.append(f"| {r['size']} | {r['batch']} | {r['dtype']} | {1e3 * r['manual_s']:.1f} ms | {1e3 * r['torch_s']:.1f} ms | "
                     f"**{r['time_ratio']:.2f}** |")
    if res.get("sequence"):
        lines += ["", f"### Sequence models: a per-step dense head (8 outputs, mse) on each "
                  f"(target: manual/torch ≤ {SEQUENCE_TARGET:g})", "",
                  "torch: `nn.LSTM` / `nn.MultiheadAttention` (batch first) and `nn.Linear` on every step.", "",
                  "| net | layers | batch | dtype | manual_bp | torch | manual/torch |", "|---|---|---|---|---|---|---|"]
        for r in res["sequence"]:
            lines.append(f"| {r['label']} | {r['size']} | {r['batch']} | {r['dtype']} | {1e3 * r['manual_s']:.1f} ms | "
                         f"{1e3 * r['torch_s']:.1f} ms | **{r['time_ratio']:.2f}** |")
    lines += ["", "### A full oracle check vs its halves and vs gradcheck (float64; target ≤ 1.2× the halves)", "",
              "The halves: manual_bp, and the torch step on the threads the check gives it.", "",
              "| MLP | batch | check | halves alone | overhead | gradcheck | gradcheck fast_mode |", "|---|---|---|---|---|---|---|"]
    for r in res["check"]:
        ext = " (extrapolated from one layer)" if r["extrapolated"] else ""
        lines.append(f"| {r['size']} | {r['batch']} | {1e3 * r['check_s']:.2f} ms | {1e3 * r['halves_s']:.2f} ms | "
                     f"**{r['overhead_ratio']:.2f}×** | {r['gradcheck_s']:.2f} s = {r['gradcheck_ratio']:.0f}×{ext} | "
                     f"{r['gradcheck_fast_s']:.3f} s = {r['gradcheck_fast_ratio']:.1f}× |")
    lines += ["", f"Hypothesis throughput on small random nets (depth ≤ 3, width ≤ 8, one full check each; target ≥ 500): "
              f"**{res['hypothesis_examples_per_s']:.0f} examples/s**."]
    if res.get("campaign"):
        c = res["campaign"]
        lines += ["", f"Campaign throughput (`campaign --nets dense --dtype both`, manual_bp, {c['per_net']} cases per "
                  f"network, {c['examples']} cases; target ≥ 2,000 on 2 cores): **{c['cases_per_s']:.0f} cases/s** with "
                  f"{c['workers']} workers, {c['one_worker_cases_per_s']:.0f} with one."]
    if res.get("command"):
        c = res["command"]
        lines += ["", f"`bp-oracle check --example seed-simple` end to end (best of 3; target ≤ 2 s): "
                  f"**{c['check_with_report_s']:.2f} s** with its report, {c['check_no_report_s']:.2f} s without; "
                  f"`import torch` alone takes {c['import_torch_s']:.2f} s."]
    if res["test_suite_s"] is not None:
        lines.append(f"Default test suite (`python -m pytest`): {res['test_suite_s']:.0f} s wall.")
    return "\n".join(lines) + "\n"
