#!/usr/bin/python3
"""flash-linear-attention's Gated DeltaNet kernels timed the way `kla bench --backend
vulkan` times its resident rows, for the table of docs/benchmarks.md (fla's figures
beside ours, same machine, same day).

    python3 tools/bench_fla.py [--T 32768] [--H 16] [--K 128] [--V 128] [--N 256]
                               [--reps 20] [--json FILE]
    python3 tools/bench_fla.py --selftest       # the harness on the CPU (see below)

Problem as in `kla bench`: B = 1, q/k/v uniform in [-1, 1], g uniform in [-0.1, 0],
l2-normalised q and k in the kernel (use_qk_l2norm_in_kernel), chunk kernels with the
final state. KLA's step is a Gated DeltaNet step with beta = eta / (||k||^2 + eps): fla
has no KLA kernel, so beta is given (computed once, outside the timed calls), which is
how fla runs KLA and what the issue's figures time. Rows:
  - forward, chunk_gated_delta_rule: float32 inputs, and bf16 q k v (g, beta float32);
  - forward+backward: the same, then o.backward(do) with the final state's gradient
    (fla refuses its chunk backward on Hopper with Triton 3.6, fla issue 640: the row then
    says so, with the error);
  - decode of N sequences: fused_recurrent_gated_delta_rule on one token of N sequences
    from an initial state, returning the final state (float32).
Tensors stay on the GPU; each row is reps calls back to back after 3 warm-up calls, each
call timed by CUDA events (GPU ms) and by the wall clock around the call and a
synchronize (call ms, as a blocking kla call is timed): median and minimum.

--selftest runs the same harness on the CPU with kla.torch's functions of the same
signatures (our float64 reference through autograd) in place of fla's, at a tiny size,
and checks the report's rows (TAP; skipped without PyTorch): it tests the script, not fla.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def timer_cuda(torch):
    def timed(fn):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        return s.elapsed_time(e), (time.perf_counter() - t0) * 1e3
    return timed


def timer_cpu():
    def timed(fn):
        t0 = time.perf_counter()
        fn()
        dt = (time.perf_counter() - t0) * 1e3
        return dt, dt
    return timed


def measure(timed, fn, reps, warmup=0.0):
    # untimed calls (at least 3) for `warmup` seconds first, as kla bench --warmup: the GPU
    # raises its clock only under sustained load
    t0, n = time.perf_counter(), 0
    while n < 3 or time.perf_counter() - t0 < warmup:
        timed(fn)
        n += 1
    gpu, wall = [], []
    for _ in range(reps):
        g, w = timed(fn)
        gpu.append(g)
        wall.append(w)
    return {"gpu_ms_median": statistics.median(gpu), "gpu_ms_min": min(gpu),
            "call_ms_median": statistics.median(wall), "n": reps}


def run(a, torch, chunk, fused, device, timed, report):
    rows = []
    gen = torch.Generator(device="cpu").manual_seed(1234)

    def u(shape, lo, hi, dtype):
        x = torch.rand(shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo
        return x.to(dtype).to(device)

    B, T, H, K, V, N = 1, a.T, a.H, a.K, a.V, a.N
    f32 = torch.float32
    q, k, v = u((B, T, H, K), -1, 1, f32), u((B, T, H, K), -1, 1, f32), u((B, T, H, V), -1, 1, f32)
    g = u((B, T, H), -0.1, 0, f32)
    eta = u((B, T, H), 0.2, 1, f32)
    kh = torch.nn.functional.normalize(k, dim=-1)
    beta = eta / (kh.square().sum(-1) + 1e-6)  # the Kaczmarz step, formed outside the kernel
    do, dht = u((B, T, H, V), -1, 1, f32), u((B, H, K, V), -1, 1, f32)

    def row_of(name, fn, reps):
        row = {"op": name}
        try:
            row.update(measure(timed, fn, reps, a.warmup))
        except Exception as e:  # noqa: BLE001  (reported, the next row still runs)
            row["error"] = "%s: %s" % (type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        rows.append(row)
        report(row)

    # forward rows and decode first, the backward last: its first call compiles and autotunes
    # for minutes, so a time limit cuts it rather than the rest
    ins = {"float32": (q, k, v), "bf16": (q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16))}
    for dt_name in ins:
        qq, kk, vv = ins[dt_name]
        row_of("forward chunk, %s inputs" % dt_name,
               lambda: chunk(qq, kk, vv, g=g, beta=beta, output_final_state=True, use_qk_l2norm_in_kernel=True),
               a.reps)
    qd, kd, vd = u((N, 1, H, K), -1, 1, f32), u((N, 1, H, K), -1, 1, f32), u((N, 1, H, V), -1, 1, f32)
    gd, bd = u((N, 1, H), -0.1, 0, f32), u((N, 1, H), 0.2, 1, f32)
    s0 = u((N, H, K, V), -0.01, 0.01, f32)
    row_of("decode, %d sequences" % N,
           lambda: fused(qd, kd, vd, g=gd, beta=bd, initial_state=s0, output_final_state=True,
                         use_qk_l2norm_in_kernel=True), a.reps * 4)
    for dt_name in ins:
        leaves = [x.detach().clone().requires_grad_(True) for x in (*ins[dt_name], g, beta)]

        def fwdbwd():
            o, ht = chunk(*leaves[:3], g=leaves[3], beta=leaves[4], output_final_state=True,
                          use_qk_l2norm_in_kernel=True)
            torch.autograd.backward([o, ht], [do.to(o.dtype), dht.to(ht.dtype)])
            for x in leaves:
                x.grad = None

        row_of("forward+backward chunk, %s inputs%s" % (
            dt_name, " (fla's Hopper guard bypassed: time only)" if getattr(a, "bypassed", False) else ""),
            fwdbwd, max(3, a.reps // 2))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", type=int, default=32768)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--K", type=int, default=128)
    ap.add_argument("--V", type=int, default=128)
    ap.add_argument("--N", type=int, default=256)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of untimed calls before each row")
    ap.add_argument("--bypass-hopper-guard", action="store_true",
                    help="time fla's backward although fla refuses it on Hopper with Triton < 3.7.1 "
                         "(its gated chunk_bwd_dqkwg gives wrong results there, fla #640): a time, "
                         "not a checked result; the rows say so")
    ap.add_argument("--json")
    ap.add_argument("--selftest", action="store_true")
    a = ap.parse_args(argv)
    if min(a.T, a.H, a.K, a.V, a.N, a.reps) < 1:
        ap.error("sizes and --reps must be >= 1")
    if not 0 <= a.warmup <= 600:
        ap.error("--warmup: seconds, 0 to 600")
    try:
        import torch
    except ImportError:
        if a.selftest:  # TAP: skipped
            print("1..0 # SKIP bench_fla --selftest needs PyTorch")
            return 0
        print("bench_fla: needs PyTorch", file=sys.stderr)
        return 1
    if a.selftest:
        sys.path.insert(0, os.path.join(HERE, "..", "python"))
        import kla.torch as kt
        a.T, a.H, a.K, a.V, a.N, a.reps, a.warmup = 40, 2, 8, 8, 3, 2, 0.0
        chunk, fused, device, timed, what = kt.chunk_gated_delta_rule, kt.fused_recurrent_gated_delta_rule, \
            "cpu", timer_cpu(), "selftest: kla.torch in place of fla, CPU"
    else:
        if not torch.cuda.is_available():
            print("bench_fla: needs a CUDA GPU (--selftest runs the harness on the CPU)", file=sys.stderr)
            return 1
        try:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule as chunk
            from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fused
            import fla
            if a.bypass_hopper_guard:
                import fla.ops.common.chunk_o as fco
                if not getattr(fco, "TRITON_ABOVE_3_7_1", True):
                    fco.TRITON_ABOVE_3_7_1 = True
                    a.bypassed = True
        except ImportError as e:
            print("bench_fla: cannot import fla (%s): put flash-linear-attention on PYTHONPATH" % e, file=sys.stderr)
            return 1
        device, timed = "cuda", timer_cuda(torch)
        what = "fla %s, torch %s, %s" % (getattr(fla, "__version__", "?"), torch.__version__,
                                         torch.cuda.get_device_name())
    print("bench_fla: %s; B=1 T=%d H=%d K=%d V=%d, decode N=%d" % (what, a.T, a.H, a.K, a.V, a.N))
    print("  %-40s %9s %9s %9s" % ("operation", "GPU ms", "(min)", "call ms"))

    def report(r):
        if "error" in r:
            print("  %-40s %s" % (r["op"], r["error"]))
        else:
            print("  %-40s %9.3f %9.3f %9.3f" % (r["op"], r["gpu_ms_median"], r["gpu_ms_min"], r["call_ms_median"]))
        sys.stdout.flush()

    rows = run(a, torch, chunk, fused, device, timed, report)
    out = {"what": what, "B": 1, "T": a.T, "H": a.H, "K": a.K, "V": a.V, "N": a.N, "rows": rows}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    if a.selftest:  # every row measured, finite, in order
        ops = [r["op"] for r in rows]
        want = ["forward chunk, float32 inputs", "forward chunk, bf16 inputs", "decode, 3 sequences",
                "forward+backward chunk, float32 inputs", "forward+backward chunk, bf16 inputs"]
        bad = [r for r in rows if "error" in r or not all(math.isfinite(r[x]) and r[x] > 0
                                                           for x in ("gpu_ms_median", "gpu_ms_min", "call_ms_median"))]
        # TAP, for the test suite
        print("%s 1 - bench_fla harness: every row measured, finite, in order (rows %s%s)"
              % ("not ok" if ops != want or bad else "ok", ops, ", bad %s" % bad if bad else ""))
        print("1..1")
        if ops != want or bad:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
