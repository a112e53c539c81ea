#!/usr/bin/python3
"""`kla bench --op train` against the same model and training step in PyTorch on the CPU,
timed alternately in one run.

    /usr/bin/python3 tools/bench_train_torch.py [--kla build/kla] [--backend B]
        [--threads N] [--rounds 3] [--reps 5] [--B 32 --T 256 --H 4 --K 48 --V 96
        --d-model 256 --n-layer 2 --d-ff 1024 --vocab 8192 --mixer kla|gdn]
        [--chunk 64] [--no-all-rows] [--no-memory] [--json FILE]
    /usr/bin/python3 tools/bench_train_torch.py --check [--json FILE]

The PyTorch side is the model of kla-spec.md section 8 written for speed the way a
PyTorch user would write it (float32, autograd for the backward):
  - nn.Linear projections (bias only on b_proj), depthwise nn.Conv1d with 3 zeros of left
    padding + SiLU, the decay gate -exp(A_log) softplus(x Wa + dt_bias), eta sigmoid;
  - the KLA operator in its chunked matrix form (the WY/UT form of flash-linear-attention's
    `chunk_gated_delta_rule` reference, chunk 64): batched matmuls over (batch, head,
    chunk) for everything inside a chunk (the unit lower-triangular system by
    torch.linalg.solve_triangular), and a Python loop over the chunks for the state;
    mode kla: q l2-normalised, k raw, beta = eta / (||k||^2 + 1e-6), scale dk^-1/2
    (mixer gdn: q and k l2-normalised, beta = eta);
  - per-head RMSNorm of o times silu(x Wg^T), output projection, pre-norm residual blocks
    with a SwiGLU MLP, final RMSNorm, tied head, F.cross_entropy(ignore_index=-100);
  - torch.nn.utils.clip_grad_norm_(1.0), torch.optim.AdamW(lr 1e-3, betas (0.9, 0.95),
    eps 1e-8, weight_decay 0.1, foreach=True: the multi-tensor form, a little faster than
    1.13's default), one optimizer kept across steps (as kla's model keeps its moments).
Two variants of the head: `labelled` gathers the labelled rows before the final RMSNorm
and the head (the optimisation kla's fast path makes: same loss and gradients), `all_rows`
computes the logits of every row as a plain PyTorch model does. The headline ratio is
torch labelled / kla, so that both sides do the same work.

The benchmark: for each of --rounds rounds, `kla bench --op train --json --reps R`
(a subprocess: its own 2 warm-up steps, the median of R) and then R torch steps of each
variant (in this process, after 2 warm-up steps at the start), each side on --threads
threads (default all cores: torch.set_num_threads, OPENBLAS_NUM_THREADS and OMP_NUM_THREADS
set before torch is loaded; `kla bench --threads`). Both sides see the same batches: kla's
generator (an LCG from seed 42: random ids, 32 random labelled positions a row labelled
with the next token, the rest -100) is reproduced here. Reported: each side's step time
(the median over rounds of each round's median), tokens/s, the ratio torch / kla, peak
memory (the torch step's ru_maxrss measured in a fresh child process per variant, beside
kla's peak_rss_bytes and model_bytes), threads, versions, the machine and the command.

--check: the chunked float64 form against tests/torch_model.py (the token-loop float64
reference, same parameter names) on tiny configurations: loss, every gradient (before
clipping) and every parameter after one AdamW step agree to 1e-10, for both head variants
and both mixers (1 thread unless --threads says otherwise). Exit status 0 when all agree.

Notes. kla and the memory probes are started through /bin/sh: a child forked straight
from this process would report this process's resident size (the torch models) as the
start of its own ru_maxrss. Both sides use OpenMP thread pools that spin: on a machine
that other work keeps busy, runs with as many threads as cores are slow and noisy on
both sides; compare such runs at --threads 1 too, and say so.
"""

import argparse
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

torch = nn = F = None  # loaded by load_torch() after the thread count is known

LAB = 32          # labelled positions a sequence (kla bench_train.c: MQAR's queries)
SEED = 42         # kla bench_train.c's batch seed


def load_torch(threads):
    """Import torch with `threads` threads for ATen (OpenMP) and OpenBLAS (Debian's torch
    calls the system BLAS, whose pthread build does not follow torch.set_num_threads)."""
    global torch, nn, F
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        os.environ["OPENBLAS_NUM_THREADS"] = str(threads)
    import torch as _t
    import torch.nn as _nn
    import torch.nn.functional as _F
    torch, nn, F = _t, _nn, _F
    if threads:
        torch.set_num_threads(threads)
    return torch


# ------------------------------------------------------------------------ the model

def rmsnorm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def l2norm(x, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def chunk_kla(q, k, v, g, b, mode="kla", scale=None, chunk=64, eps=1e-6):
    """The operator of kla-spec.md section 1 in its chunked (WY/UT) matrix form.
    q, k [B, T, H, K]; v [B, T, H, V]; g, b [B, T, H] (b is eta in mode kla, beta in
    mode gdn). Returns o [B, T, H, V].

    In a chunk with cumulative log decay c_t = g_1 + ... + g_t and state S0 at its start,
    S_t = e^{c_t} S0 + sum_{s<=t} e^{c_t - c_s} k_s u_s^T, where the pseudo-values u solve
    the unit lower-triangular system (I + A) U = diag(beta) V - diag(beta e^c) K S0 with
    A_ts = beta_t e^{c_t - c_s} k_t.k_s (s < t). So U = U0 - W S0 with U0, W from one
    batched triangular solve, o_t = e^{c_t} S0^T q_t' + sum_{s<=t} e^{c_t-c_s} (q_t'.k_s) u_s
    (q' = scale q) and the next state is e^{c_C} S0 + sum_s e^{c_C - c_s} k_s u_s^T."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    if mode == "kla":
        beta = b / (k.pow(2).sum(-1) + eps)
    else:
        beta = b
    C = chunk
    pad = (-T) % C
    if pad:  # zeros at the end: k = 0, beta = 0, g = 0 leave the earlier outputs alone
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
        g, beta = (F.pad(t, (0, 0, 0, pad)) for t in (g, beta))
    N = (T + pad) // C
    # [B, H, N, C, *]
    q, k, v = (t.reshape(B, N, C, H, t.shape[-1]).permute(0, 3, 1, 2, 4) for t in (q, k, v))
    g, beta = (t.reshape(B, N, C, H).permute(0, 3, 1, 2) for t in (g, beta))
    c = g.cumsum(-1)                                                   # [B, H, N, C]
    incl = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    gam = (c.unsqueeze(-1) - c.unsqueeze(-2)).masked_fill(~incl, -math.inf).exp()  # e^{c_t-c_s}, s<=t
    A = (k @ k.transpose(-1, -2)) * gam * beta.unsqueeze(-1)
    A = A.tril(-1)
    ec = c.exp()
    rhs = torch.cat([v * beta.unsqueeze(-1), k * (beta * ec).unsqueeze(-1)], -1)
    X = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
    U0, W = X.split([V, K], -1)
    qs = q * scale
    Aqk = (qs @ k.transpose(-1, -2)) * gam                             # [B, H, N, C, C]
    qg = qs * ec.unsqueeze(-1)                                         # reads S0
    kd = k * (c[..., -1:] - c).exp().unsqueeze(-1)                     # writes to the chunk end
    dec = c[..., -1].exp()                                             # [B, H, N]
    S = q.new_zeros(B, H, K, V)
    us, oi = [], []
    # unbind, not indexing: one backward node for all chunks, not a zero-filled copy each
    for n, (u0, w, qn, kn, dn) in enumerate(zip(U0.unbind(2), W.unbind(2), qg.unbind(2),
                                                kd.transpose(-1, -2).unbind(2), dec.unbind(2))):
        u = u0 - w @ S
        oi.append(qn @ S)
        us.append(u)
        if n + 1 < N:
            S = S * dn[:, :, None, None] + kn @ u
    u = torch.stack(us, 2)
    o = torch.stack(oi, 2) + Aqk @ u                                   # [B, H, N, C, V]
    return o.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, V)[:, :T]


def _modules():
    class RMSNorm(nn.Module):
        def __init__(self, n, eps=1e-5):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(n))
            self.eps = eps

        def forward(self, x):
            return rmsnorm(x, self.weight, self.eps)

    class Mixer(nn.Module):
        def __init__(self, d, H, dk, dv, norm_eps=1e-5, mixer="kla", chunk=64):
            super().__init__()
            self.H, self.dk, self.dv, self.mixer, self.chunk = H, dk, dv, mixer, chunk
            self.q_proj = nn.Linear(d, H * dk, bias=False)
            self.k_proj = nn.Linear(d, H * dk, bias=False)
            self.v_proj = nn.Linear(d, H * dv, bias=False)
            self.a_proj = nn.Linear(d, H, bias=False)
            self.b_proj = nn.Linear(d, H, bias=True)
            self.g_proj = nn.Linear(d, H * dv, bias=False)
            self.o_proj = nn.Linear(H * dv, d, bias=False)
            self.q_conv1d = nn.Conv1d(H * dk, H * dk, 4, groups=H * dk, bias=False)
            self.k_conv1d = nn.Conv1d(H * dk, H * dk, 4, groups=H * dk, bias=False)
            self.v_conv1d = nn.Conv1d(H * dv, H * dv, 4, groups=H * dv, bias=False)
            self.A_log = nn.Parameter(torch.zeros(H))
            self.dt_bias = nn.Parameter(torch.zeros(H))
            self.o_norm = RMSNorm(dv, norm_eps)

        @staticmethod
        def conv_silu(y, conv):  # [B, T, C] -> causal depthwise conv (left padding 3), SiLU
            return F.silu(conv(F.pad(y.transpose(1, 2), (3, 0)))).transpose(1, 2)

        def forward(self, x):
            B, T, _ = x.shape
            H, dk, dv = self.H, self.dk, self.dv
            q = self.conv_silu(self.q_proj(x), self.q_conv1d).reshape(B, T, H, dk)
            k = self.conv_silu(self.k_proj(x), self.k_conv1d).reshape(B, T, H, dk)
            v = self.conv_silu(self.v_proj(x), self.v_conv1d).reshape(B, T, H, dv)
            g = -self.A_log.exp() * F.softplus(self.a_proj(x) + self.dt_bias)
            eta = torch.sigmoid(self.b_proj(x))
            q = l2norm(q)
            if self.mixer == "gdn":
                k = l2norm(k)
            o = chunk_kla(q, k, v, g, eta, self.mixer, dk ** -0.5, self.chunk)
            o = self.o_norm(o) * F.silu(self.g_proj(x).reshape(B, T, H, dv))
            return self.o_proj(o.reshape(B, T, H * dv))

    class SwiGLU(nn.Module):
        def __init__(self, d, d_ff):
            super().__init__()
            self.gate_proj = nn.Linear(d, d_ff, bias=False)
            self.up_proj = nn.Linear(d, d_ff, bias=False)
            self.down_proj = nn.Linear(d_ff, d, bias=False)

        def forward(self, n):
            return self.down_proj(F.silu(self.gate_proj(n)) * self.up_proj(n))

    class Block(nn.Module):
        def __init__(self, d, H, dk, dv, d_ff, norm_eps, mixer, chunk):
            super().__init__()
            self.attn_norm = RMSNorm(d, norm_eps)
            self.attn = Mixer(d, H, dk, dv, norm_eps, mixer, chunk)
            self.mlp_norm = RMSNorm(d, norm_eps)
            self.mlp = SwiGLU(d, d_ff)

        def forward(self, x):
            x = x + self.attn(self.attn_norm(x))
            return x + self.mlp(self.mlp_norm(x))

    class Model(nn.Module):
        """kla-spec.md 8.2; parameter names those of tests/torch_model.py's KLAModel."""

        def __init__(self, vocab, d, n_layer, H, dk, dv, d_ff, norm_eps=1e-5, mixer="kla", chunk=64):
            super().__init__()
            self.embeddings = nn.Embedding(vocab, d)
            self.layers = nn.ModuleList(Block(d, H, dk, dv, d_ff, norm_eps, mixer, chunk)
                                        for _ in range(n_layer))
            self.norm = RMSNorm(d, norm_eps)

        def forward(self, ids, labels, labelled_only=True):
            x = self.embeddings(ids)
            for blk in self.layers:
                x = blk(x)
            x = x.reshape(-1, x.shape[-1])
            lab = labels.reshape(-1)
            if labelled_only:  # the labelled rows first: the norm and the head only there
                idx = (lab != -100).nonzero().squeeze(1)
                x, lab = x.index_select(0, idx), lab.index_select(0, idx)
            logits = F.linear(self.norm(x), self.embeddings.weight)       # tied head
            return F.cross_entropy(logits, lab, ignore_index=-100)

    return Model


def new_model(cfg, dtype, seed=1):
    Model = _modules()
    m = Model(cfg["vocab"], cfg["d_model"], cfg["n_layer"], cfg["H"], cfg["K"], cfg["V"],
              cfg["d_ff"], 1e-5, cfg["mixer"], cfg["chunk"]).to(dtype)
    init_like_kla(m, seed, cfg["n_layer"])
    return m


def init_like_kla(m, seed, n_layer):
    """The distributions of kla_model_init (src/model.c), not its random stream."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            u = torch.rand(p.shape, generator=gen, dtype=torch.float64)
            if "embeddings" in name:
                x = torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.02
            elif "norm" in name:
                x = torch.ones(p.shape, dtype=torch.float64)
            elif "b_proj.bias" in name:
                x = torch.zeros(p.shape, dtype=torch.float64)
            elif "A_log" in name:
                x = torch.log(16 * u.clamp_min(1e-12))
            elif "dt_bias" in name:
                dt = torch.exp(math.log(1e-3) + u * (math.log(0.1) - math.log(1e-3))).clamp_min(1e-4)
                x = dt + torch.log(-torch.expm1(-dt))
            elif "conv1d" in name:
                x = (2 * u - 1) * 0.5
            else:
                x = (2 * u - 1) / math.sqrt(p.shape[1])
                if "down_proj" in name:
                    x = x / math.sqrt(2.0 * n_layer)
            p.copy_(x.to(p.dtype))


def adamw(params, **kw):
    return torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **kw)


def step(model, opt, params, ids, labels, labelled_only):
    """One training step: loss, backward, clip_grad_norm_(1.0), AdamW. Returns the loss."""
    opt.zero_grad(set_to_none=True)
    loss = model(ids, labels, labelled_only)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss.detach()


# ------------------------------------------------------------------------ data

def kla_batches(n, B, T, V, lab=LAB, seed=SEED):
    """kla bench_train.c's batch(): the same ids and labels, n batches in a row."""
    mask = (1 << 64) - 1
    s = seed
    out = []
    for _ in range(n):
        ids = [0] * (B * T)
        for i in range(B * T):
            s = (s * 6364136223846793005 + 1442695040888963407) & mask
            ids[i] = (s >> 33) % V
        labels = [-100] * (B * T)
        for b in range(B):
            for _j in range(lab):
                s = (s * 6364136223846793005 + 1442695040888963407) & mask
                t = (s >> 33) % T
                labels[b * T + t] = ids[b * T + (t + 1) % T]
        out.append((torch.tensor(ids, dtype=torch.long).reshape(B, T),
                    torch.tensor(labels, dtype=torch.long).reshape(B, T)))
    return out


# ------------------------------------------------------------------------ --check

def run_check(args):
    """The chunked form (float64) against tests/torch_model.py's token loop."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import torch_model as tm
    torch.manual_seed(0)
    cases = [  # name, config, B, T
        ("kla, chunk 64, T 150 (3 chunks, padded)",
         dict(vocab=61, d_model=24, n_layer=2, H=2, K=8, V=12, d_ff=40, mixer="kla", chunk=64), 2, 150),
        ("kla, chunk 16, T 45",
         dict(vocab=37, d_model=16, n_layer=2, H=3, K=6, V=5, d_ff=24, mixer="kla", chunk=16), 3, 45),
        ("gdn, chunk 16, T 40",
         dict(vocab=37, d_model=16, n_layer=2, H=2, K=8, V=6, d_ff=24, mixer="gdn", chunk=16), 2, 40),
    ]
    results, ok_all = [], True
    for name, cfg, B, T in cases:
        ref = tm.KLAModel(cfg["vocab"], cfg["d_model"], cfg["n_layer"], cfg["H"], cfg["K"], cfg["V"],
                          cfg["d_ff"], 1e-5, cfg["mixer"]).double()
        with torch.no_grad():  # away from special values: every path of the gradient counts
            for n, p in ref.named_parameters():
                if n.endswith("A_log"):
                    p.copy_(torch.empty_like(p).uniform_(-1.0, 1.5))
                elif n.endswith("dt_bias") or n.endswith("b_proj.bias"):
                    p.copy_(torch.randn_like(p) * 0.5)
                elif "norm" in n:
                    p.copy_(1 + 0.2 * torch.randn_like(p))
                elif n == "embeddings.weight":
                    p.copy_(torch.randn_like(p) * 0.5)
                else:
                    p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]) * 1.3)
        state = {n: p.detach().clone() for n, p in ref.named_parameters()}
        ids = torch.randint(0, cfg["vocab"], (B, T))
        labels = torch.where(torch.rand(B, T) < 0.3, torch.randint(0, cfg["vocab"], (B, T)),
                             torch.full((B, T), -100))
        labels[0, -1] = 3  # the last, padded chunk carries a label
        loss_r, grads_r, new_r = tm.train_step(ref, ids, labels)
        gnorm = math.sqrt(sum(float((g * g).sum()) for g in grads_r.values()))
        for variant, lab_only in (("labelled", True), ("all_rows", False)):
            Model = _modules()
            m = Model(cfg["vocab"], cfg["d_model"], cfg["n_layer"], cfg["H"], cfg["K"], cfg["V"],
                      cfg["d_ff"], 1e-5, cfg["mixer"], cfg["chunk"]).double()
            m.load_state_dict(state, strict=True)
            params = list(m.parameters())
            opt = adamw(params, foreach=True)  # the benchmark's; the reference's is foreach=False
            opt.zero_grad(set_to_none=True)
            loss = m(ids, labels, lab_only)
            loss.backward()
            grads = {n: p.grad.detach().clone() for n, p in m.named_parameters()}
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            new = {n: p.detach().clone() for n, p in m.named_parameters()}
            worst = {"loss": abs(float(loss) - float(loss_r))}
            worst_rel = {"loss": worst["loss"] / max(abs(float(loss_r)), 1e-300)}
            for kind, got, exp in (("grad", grads, grads_r), ("new", new, new_r)):
                a = b = 0.0
                for n in exp:
                    d = (got[n] - exp[n]).abs().max().item()
                    scale = max(exp[n].abs().max().item(), 1e-300)
                    a, b = max(a, d), max(b, d / scale)
                worst[kind], worst_rel[kind] = a, b
            ok = all(worst[k] <= 1e-10 and worst_rel[k] <= 1e-10 for k in worst)
            ok_all &= ok
            results.append({"case": name, "variant": variant, "ok": ok, "loss": float(loss),
                            "grad_norm": gnorm, "clipping_active": gnorm > 1.0,
                            "max_abs_err": worst, "max_rel_err": worst_rel})
            print(f"{'ok' if ok else 'FAIL'}: {name}, head {variant}: loss {float(loss):.12g}, "
                  f"max |err| loss {worst['loss']:.2e} grad {worst['grad']:.2e} new {worst['new']:.2e} "
                  f"(relative to each tensor's max: grad {worst_rel['grad']:.2e} new {worst_rel['new']:.2e}); "
                  f"grad norm {gnorm:.3g}{' (clipping active)' if gnorm > 1 else ''}")
            sys.stdout.flush()
    return ok_all, results


# ------------------------------------------------------------------------ the benchmark

def cfg_of(args):
    return dict(vocab=args.vocab, d_model=args.d_model, n_layer=args.n_layer, H=args.H, K=args.K,
                V=args.V, d_ff=args.d_ff, mixer=args.mixer, chunk=args.chunk)


def size_opts(args):
    return ["--B", str(args.B), "--T", str(args.T), "--H", str(args.H), "--K", str(args.K),
            "--V", str(args.V), "--d-model", str(args.d_model), "--n-layer", str(args.n_layer),
            "--d-ff", str(args.d_ff), "--vocab", str(args.vocab), "--mixer", args.mixer]


def kla_cmd(args):
    cmd = [args.kla, "bench", "--op", "train", "--json", "--reps", str(args.reps),
           "--threads", str(args.threads)]
    if args.backend:
        cmd += ["--backend", args.backend]
    return cmd + size_opts(args)


# A child's ru_maxrss starts from the resident size of the process it was forked from
# (Linux carries the forked copy's high-water mark across exec), so a child of this
# process, which holds the torch models, would report this process's size as its peak.
# sh forks the command from its own small image instead.
VIA_SH = ["/bin/sh", "-c", '"$@"; exit $?', "sh"]


def run_kla(args):
    cmd = kla_cmd(args)
    p = subprocess.run(VIA_SH + cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"bench_train_torch: {shlex.join(cmd)} failed ({p.returncode}):\n{p.stderr}{p.stdout}")
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1]
    return json.loads(line)


class TorchSide:
    def __init__(self, args, variant, batches):
        self.variant, self.lab_only = variant, variant == "labelled"
        self.model = new_model(cfg_of(args), torch.float32)
        self.params = list(self.model.parameters())
        self.opt = adamw(self.params, foreach=args.foreach)
        self.batches = batches
        self.rounds = []
        for ids, labels in batches[:2]:   # 2 warm-up steps, as kla's
            self.last_loss = float(step(self.model, self.opt, self.params, ids, labels, self.lab_only))

    def time_round(self, reps):
        ts = []
        for ids, labels in self.batches[2:2 + reps]:
            t0 = time.perf_counter()
            loss = step(self.model, self.opt, self.params, ids, labels, self.lab_only)
            ts.append(time.perf_counter() - t0)
            self.last_loss = float(loss)
            if not math.isfinite(self.last_loss):
                raise SystemExit(f"bench_train_torch: torch {self.variant} loss {self.last_loss}")
        self.rounds.append(ts)
        return statistics.median(ts)


def memory_probe(args, what):
    """Peak resident size (ru_maxrss) of a fresh process that builds the model and runs the
    torch step of variant `what` (2 warm-up steps and --reps steps), or that only imports
    torch (`what` = baseline)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_probe", what, "--threads", str(args.threads),
           "--reps", str(args.reps), "--chunk", str(args.chunk)] + size_opts(args)
    if not args.foreach:
        cmd += ["--no-foreach"]
    p = subprocess.run(VIA_SH + cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"bench_train_torch: memory probe failed:\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])["peak_rss_bytes"]


def probe(args):
    if args._probe != "baseline":
        batches = kla_batches(args.reps + 2, args.B, args.T, args.vocab)
        side = TorchSide(args, args._probe, batches)
        side.time_round(args.reps)
    print(json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name"):
                    return ln.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def kla_info(path):
    try:
        p = subprocess.run([path, "info"], capture_output=True, text=True, timeout=60)
        return p.stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"({e})"


def bench(args):
    n_cores = os.cpu_count()
    try:
        n_avail = len(os.sched_getaffinity(0))
    except AttributeError:
        n_avail = n_cores
    cfg = cfg_of(args)
    tokens = args.B * args.T
    variants = ["labelled"] + ([] if args.no_all_rows else ["all_rows"])
    info = kla_info(args.kla)
    load0 = os.getloadavg()
    print(f"bench_train_torch: {cpu_model()}, {n_avail} cores available ({n_cores} online), "
          f"load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    print(f"  model: vocab {args.vocab}, d {args.d_model}, {args.n_layer} blocks, {args.H} heads, dk {args.K}, "
          f"dv {args.V}, MLP {args.d_ff}, mixer {args.mixer}; B {args.B} x T {args.T}, {LAB} labelled a row; "
          f"torch chunk {args.chunk}")
    print(f"  threads {args.threads} (torch.get_num_threads() = {torch.get_num_threads()}); "
          f"torch {torch.__version__}; {info.splitlines()[0] if info else 'kla ?'}")
    print(f"  kla: {shlex.join(kla_cmd(args))}")
    sys.stdout.flush()
    batches = kla_batches(args.reps + 2, args.B, args.T, args.vocab)
    sides = {v: TorchSide(args, v, batches) for v in variants}
    kla_runs, tmed = [], {v: [] for v in variants}
    for r in range(args.rounds):
        k = run_kla(args)
        kla_runs.append(k)
        line = f"  round {r + 1}/{args.rounds}: kla {k['step_ms']:.1f} ms"
        for v in variants:
            ms = sides[v].time_round(args.reps) * 1e3
            tmed[v].append(ms)
            line += f", torch {v} {ms:.1f} ms"
        line += f"; ratio torch labelled / kla {tmed['labelled'][-1] / k['step_ms']:.2f}"
        print(line)
        sys.stdout.flush()
    load1 = os.getloadavg()
    kla_ms = statistics.median(k["step_ms"] for k in kla_runs)
    res = {
        "command": shlex.join([sys.executable] + sys.argv),
        "machine": {"cpu_model": cpu_model(), "cores_online": n_cores, "cores_available": n_avail,
                    "platform": platform.platform(), "loadavg_before": list(load0), "loadavg_after": list(load1)},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torch_config": torch.__config__.show().strip(),
                     "torch_parallel": torch.__config__.parallel_info().strip(),
                     "kla_info": info, "kla_describe": kla_runs[0].get("describe")},
        "config": dict(cfg, B=args.B, T=args.T, labelled_per_row=LAB,
                       labelled_rows=int(sum(int((lb != -100).sum()) for _, lb in batches[2:]) / args.reps)),
        "threads": args.threads, "torch_threads": torch.get_num_threads(),
        "rounds": args.rounds, "reps": args.reps,
        "kla": {"command": shlex.join(kla_cmd(args)), "step_ms": kla_ms, "tokens_per_s": tokens / kla_ms * 1e3,
                "rounds_step_ms": [k["step_ms"] for k in kla_runs],
                "peak_rss_bytes": max(k["peak_rss_bytes"] for k in kla_runs),
                "model_bytes": kla_runs[0]["model_bytes"], "runs": kla_runs},
    }
    for v in variants:
        ms = statistics.median(tmed[v])
        res["torch_" + v] = {"step_ms": ms, "tokens_per_s": tokens / ms * 1e3, "rounds_step_ms": tmed[v],
                             "steps_ms": [[t * 1e3 for t in ts] for ts in sides[v].rounds],
                             "last_loss": sides[v].last_loss}
    res["ratio"] = res["torch_labelled"]["step_ms"] / kla_ms
    res["ratio_rounds"] = [t / k["step_ms"] for t, k in zip(tmed["labelled"], kla_runs)]
    if "all_rows" in variants:
        res["ratio_all_rows"] = res["torch_all_rows"]["step_ms"] / kla_ms
    res["torch_process_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    del sides
    if not args.no_memory:
        base = memory_probe(args, "baseline")
        for v in variants:
            res["torch_" + v].update(peak_rss_bytes=memory_probe(args, v), import_torch_rss_bytes=base)

    print(f"kla:              {kla_ms:9.1f} ms a step  {tokens / kla_ms * 1e3:9.0f} tokens/s  "
          f"(rounds: {', '.join('%.1f' % k['step_ms'] for k in kla_runs)})")
    for v in variants:
        t = res["torch_" + v]
        print(f"torch {v:<11s} {t['step_ms']:9.1f} ms a step  {t['tokens_per_s']:9.0f} tokens/s  "
              f"(rounds: {', '.join(f'{x:.1f}' for x in t['rounds_step_ms'])})")
    print(f"ratio torch / kla: {res['ratio']:.2f} (labelled head, the same work; rounds "
          f"{', '.join(f'{x:.2f}' for x in res['ratio_rounds'])})"
          + (f"; {res['ratio_all_rows']:.2f} against torch's head on all rows" if "all_rows" in variants else ""))
    mb = 1e6
    print(f"memory: kla peak resident {res['kla']['peak_rss_bytes'] / mb:.1f} MB, model_bytes "
          f"{res['kla']['model_bytes'] / mb:.1f} MB", end="")
    for v in variants:
        t = res["torch_" + v]
        if "peak_rss_bytes" in t:
            print(f"; torch {v} peak resident {t['peak_rss_bytes'] / mb:.1f} MB (import torch alone "
                  f"{t['import_torch_rss_bytes'] / mb:.1f} MB)", end="")
    print(f"\nload average after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kla", default=os.path.join(ROOT, "build", "kla"))
    ap.add_argument("--backend", default=None, help="passed to kla bench")
    ap.add_argument("--threads", type=int, default=0,
                    help="both sides' threads (default all cores; 1 for --check)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5, help="timed steps a round, each side")
    ap.add_argument("--B", type=int, default=32)
    ap.add_argument("--T", type=int, default=256)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--K", type=int, default=48)
    ap.add_argument("--V", type=int, default=96)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--d-ff", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--mixer", choices=("kla", "gdn"), default="kla")
    ap.add_argument("--chunk", type=int, default=64, help="torch's chunk size")
    ap.add_argument("--no-foreach", dest="foreach", action="store_false", default=True,
                    help="AdamW(foreach=False), torch 1.13's default (default here: foreach=True)")
    ap.add_argument("--no-all-rows", action="store_true", help="time only the labelled-head variant")
    ap.add_argument("--no-memory", action="store_true", help="skip the torch memory probes")
    ap.add_argument("--check", action="store_true", help="the float64 check against tests/torch_model.py")
    ap.add_argument("--json", metavar="FILE", help="write the figures as JSON (- for stdout)")
    ap.add_argument("--_probe", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads <= 0 and args.check:
        args.threads = 1  # tiny sizes: more threads only add OpenMP overhead
    if args.threads <= 0:
        try:
            args.threads = len(os.sched_getaffinity(0))
        except AttributeError:
            args.threads = os.cpu_count() or 1
    load_torch(args.threads)
    if args._probe:
        probe(args)
        return 0
    if args.check:
        ok, results = run_check(args)
        res = {"check": results, "ok": ok, "torch": torch.__version__}
        rc = 0 if ok else 1
    else:
        res = bench(args)
        rc = 0
    if args.json:
        text = json.dumps(res, indent=1)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
