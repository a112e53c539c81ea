#!/usr/bin/python3
"""Self-tests of tests/kla_np.py over the whole delta-rule family (spec section 7).

    /usr/bin/python3 tests/test_family_np.py        (or: /usr/bin/python3 tests/kla_np.py)

Prints TAP. Checks, all in float64 and on kla_np alone (no C code involved):
  * finite differences (4th-order central) of every gradient, for every variant
    gate = head|channel x precond = none|atk x mode = kla|gdn, with grouped heads,
    cu_seqlens, h0, a0, l2norm, state_layout vk, dht and dat, and with the optional
    inputs absent (gradients at their defaults);
  * a second forward written differently (matrix form per sequence and head, the ATK
    state in closed form);
  * the worked examples of notes/delta-family.md to their printed digits: KDA 1.8,
    EX2, EX2K, EX3 (also with dA_T), EX4, EX5, EX6. EX3-EX6 normalise with fla's
    x / ||x||, reproduced with kla_np's test-only `l2norm_eps=0`; with the spec's
    x / sqrt(||x||^2 + 1e-6) they agree to about 1e-7, also checked;
  * properties: exact projection (mode kla, eta = 1, eps = 0) under gate = channel and
    precond = atk; equal channels = gate head; PDN = PGDN with g = 0; decode (token by
    token, state and ATK state carried) = forward; squash_x -> 1 = no preconditioner;
    grouped heads = the key heads repeated; the spec's section 6 example;
  * option defaults and errors of spec 7.3.
"""

import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import kla_np  # noqa: E402
from tap import Tap  # noqa: E402

ATK_IN = ("g_atk", "beta_atk", "log_atk_scale", "a0")
DIFF_INPUTS = ("q", "k", "v", "g", "eta", "beta", "h0") + ATK_IN


# --------------------------------------------------------------------------- cases

def make_case(rng, *, gate="head", precond="none", mode="kla", B=1, T=5, H=1, HV=2, K=3,
              V=2, cu=None, g=True, h0=False, a0=False, g_atk=True, las=True, layout="kv",
              dht=False, dat=False, eta_one=False):
    """Random float64 inputs (and do, dht, dat). cu = list of sequence lengths."""
    if cu is not None:
        B, T = 1, int(sum(cu))
    N = len(cu) if cu is not None else B
    logsig = lambda x: -np.logaddexp(0.0, -x)  # log(sigmoid(x)) <= 0
    inp = {"q": rng.standard_normal((B, T, H, K)),
           # keys away from zero per channel: the ATK state stays clear of 0
           "k": rng.choice([-1.0, 1.0], (B, T, H, K)) * rng.uniform(0.4, 1.2, (B, T, H, K)),
           "v": rng.standard_normal((B, T, HV, V))}
    if g:
        inp["g"] = logsig(rng.normal(2.0, 1.0, (B, T, HV) + ((K,) if gate == "channel"
                                                              else ())))
    if mode == "kla":
        inp["eta"] = np.ones((B, T, HV)) if eta_one else rng.uniform(0.1, 1.2, (B, T, HV))
    else:
        inp["beta"] = rng.uniform(0.1, 0.9, (B, T, HV))
    if h0:
        inp["h0"] = 0.5 * rng.standard_normal((N, HV, K, V) if layout == "kv"
                                              else (N, HV, V, K))
    if precond == "atk":
        inp["beta_atk"] = rng.uniform(0.2, 1.0, (B, T, H))
        if g_atk:
            inp["g_atk"] = logsig(rng.normal(1.0, 1.0, (B, T, H)))
        if las:
            inp["log_atk_scale"] = rng.uniform(-1.0, 0.4, H)
        if a0:
            inp["a0"] = rng.uniform(0.05, 0.6, (N, H, K))
        if dat:
            inp["dat"] = rng.standard_normal((N, H, K))
    inp["do"] = rng.standard_normal((B, T, HV, V))
    if dht:
        inp["dht"] = rng.standard_normal((N, HV, K, V) if layout == "kv" else (N, HV, V, K))
    if cu is not None:
        inp["cu_seqlens"] = np.concatenate([[0], np.cumsum(cu)]).astype(np.int32)
    return inp


def with_defaults(inp, opts):
    """The absent differentiable inputs made explicit at their spec defaults."""
    r = kla_np.resolve_opts(inp, opts)
    B, T, H, K = inp["q"].shape
    HV = inp["v"].shape[2]
    N = len(inp["cu_seqlens"]) - 1 if "cu_seqlens" in inp else B
    d = dict(inp)
    d.setdefault("g", np.zeros((B, T, HV, K) if r["gate"] == "channel" else (B, T, HV)))
    if r["precond"] == "atk":
        d.setdefault("g_atk", np.zeros((B, T, H)))
        d.setdefault("log_atk_scale", np.full(H, -0.2))
        d.setdefault("a0", np.zeros((N, H, K)))
    return d


def loss(inp, opts, **kw):
    out = kla_np.forward(inp, opts, **kw)
    L = np.sum(inp["do"] * out["o"])
    if "dht" in inp:
        L += np.sum(inp["dht"] * out["ht"])
    if "dat" in inp:
        L += np.sum(inp["dat"] * out["at"])
    return L


def fd_check(inp, opts, h=1e-4):
    """4th-order central differences of L for every element of every differentiable
    input (the absent ones at their defaults) against kla_np.backward. Returns
    (worst error relative to max(1, max|grad|), its gradient name, problems)."""
    grads = kla_np.backward(inp, opts)
    full = with_defaults(inp, opts)
    r = kla_np.resolve_opts(inp, opts)
    want = {"o", "ht", "dq", "dk", "dv", "dg", "deta" if r["mode"] == "kla" else "dbeta"}
    if "h0" in inp:
        want.add("dh0")
    if r["precond"] == "atk":
        want |= {"at", "dg_atk", "dbeta_atk", "dlog_atk_scale", "da0"}
    problems = []
    if set(grads) != want:
        problems.append(f"outputs {sorted(grads)}, want {sorted(want)}")
    fwd = kla_np.forward(inp, opts)
    for n in fwd:
        if not np.array_equal(fwd[n], grads.get(n)):
            problems.append(f"backward's {n} differs from forward's")
    worst, where = 0.0, ""
    for x in DIFF_INPUTS:
        if x not in full or "d" + x not in grads:
            continue
        an = grads["d" + x]
        base = full[x]
        if an.shape != base.shape:
            problems.append(f"d{x} shape {an.shape}, want {base.shape}")
            continue
        fd = np.zeros_like(an)
        for idx in np.ndindex(base.shape):
            f = {}
            for j in (-2, -1, 1, 2):
                a = base.copy()
                a[idx] += j * h
                f[j] = loss(dict(full, **{x: a}), opts)
            fd[idx] = (8 * (f[1] - f[-1]) - (f[2] - f[-2])) / (12 * h)
        err = np.max(np.abs(fd - an)) / max(1.0, np.max(np.abs(an)))
        if err > worst:
            worst, where = err, "d" + x
    return worst, where, problems


FD_CASES = [
    # name, make_case kwargs, options
    ("KLA gate=head", dict(H=2, HV=4, cu=[2, 3], h0=True, dht=True),
     {"l2norm_q": "true"}),
    ("GDN gate=head", dict(mode="gdn", B=2, T=4, H=1, HV=2, h0=True, layout="vk", dht=True),
     {"state_layout": "vk", "l2norm_k": "true"}),
    ("KLA-KDA gate=channel", dict(gate="channel", H=2, HV=4, cu=[3, 0, 2], h0=True, dht=True),
     {"eps": "0.01"}),
    ("KDA gate=channel gdn", dict(gate="channel", mode="gdn", T=5, H=1, HV=2, dht=True),
     {"l2norm_q": "true", "l2norm_k": "true", "scale": "0.8"}),
    ("KLA-PGDN head+atk", dict(precond="atk", H=2, HV=4, cu=[3, 2], h0=True, a0=True,
                               dht=True, dat=True), {"l2norm_q": "true", "l2norm_k": "true"}),
    ("PGDN head+atk gdn", dict(precond="atk", mode="gdn", B=2, T=4, H=1, HV=2, h0=True,
                               a0=True, layout="vk", dht=True, dat=True),
     {"state_layout": "vk", "squash_x": "2.5", "squash_eps": "1e-3"}),
    ("KLA-PKDA channel+atk", dict(gate="channel", precond="atk", H=2, HV=4, cu=[2, 3],
                                  h0=True, a0=True, dht=True, dat=True), {"eps": "1e-3"}),
    ("PKDA channel+atk gdn", dict(gate="channel", precond="atk", mode="gdn", T=5, H=2, HV=2,
                                  a0=True, dat=True),
     {"l2norm_q": "true", "l2norm_k": "true", "scale": "1.1", "squash_x": "1.3"}),
    ("KLA-PDN atk, all optional absent", dict(precond="atk", T=4, H=1, HV=2, g=False,
                                               g_atk=False, las=False), {}),
    ("PDN gdn atk, g absent", dict(precond="atk", mode="gdn", cu=[1, 3], H=1, HV=1, g=False,
                                   a0=True, dat=True), {"precond": "atk", "gate": "head"}),
    ("KLA channel, g absent (gate given)", dict(gate="channel", g=False, T=4, H=1, HV=2,
                                                 dht=True), {"gate": "channel"}),
    ("KLA-PKDA channel+atk K4 V3 l2norm_k vk", dict(gate="channel", precond="atk", T=4, H=1,
                                                    HV=3, K=4, V=3, h0=True, layout="vk",
                                                    dht=True, dat=True),
     {"l2norm_k": "true", "state_layout": "vk"}),
]


# --------------------------------------------------------------------------- second forward

def forward_matrix_form(inp, opts):
    """S_t = (I - beta kw k^T) D_t S_{t-1} + beta kw v^T per sequence and value head in
    plain loops, the ATK state in closed form a_t = e^{L_t} a0 + sum_j e^{L_t - L_j} U_j
    (L the in-sequence cumsum of g_atk, U_j = beta_atk k_j^2)."""
    r = kla_np.resolve_opts(inp, opts)
    q, k, v = (np.asarray(inp[n], np.float64) for n in "qkv")
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    G = HV // H
    nz = lambda x: x / np.sqrt(x @ x + 1e-6)
    cu = inp.get("cu_seqlens")
    seqs = ([(b, 0, T) for b in range(B)] if cu is None
            else [(0, int(cu[i]), int(cu[i + 1])) for i in range(len(cu) - 1)])
    d = with_defaults(inp, opts)
    lam = np.log(r["squash_x"])
    o = np.zeros((B, T, HV, V))
    ht = np.zeros((len(seqs), HV, K, V))
    at = np.zeros((len(seqs), H, K))
    for n, (b, t0, t1) in enumerate(seqs):
        for h in range(H):
            kk = [nz(k[b, t, h]) if r["l2norm_k"] else k[b, t, h] for t in range(t0, t1)]
            kw = list(kk)
            if r["precond"] == "atk":
                L = np.cumsum(d["g_atk"][b, t0:t1, h])
                for i in range(t1 - t0):
                    a = np.exp(L[i]) * d["a0"][n, h]
                    for j in range(i + 1):
                        a = a + np.exp(L[i] - L[j]) * d["beta_atk"][b, t0 + j, h] * kk[j] ** 2
                    rr = np.log(a + r["squash_eps"]) - d["log_atk_scale"][h]
                    kw[i] = kk[i] * np.exp(-lam * rr / (1 + np.abs(rr)))
                    at[n, h] = a
                if t1 == t0:
                    at[n, h] = d["a0"][n, h]
            for hv in range(h * G, (h + 1) * G):
                S = np.zeros((K, V))
                if "h0" in inp:
                    S = inp["h0"][n, hv] if r["state_layout"] == "kv" else inp["h0"][n, hv].T
                for i, t in enumerate(range(t0, t1)):
                    qq = nz(q[b, t, h]) if r["l2norm_q"] else q[b, t, h]
                    gg = d["g"][b, t, hv]
                    D = np.diag(np.exp(gg) * np.ones(K))
                    bt = (inp["eta"][b, t, hv] / (kk[i] @ kw[i] + r["eps"])
                          if r["mode"] == "kla" else inp["beta"][b, t, hv])
                    S = ((np.eye(K) - bt * np.outer(kw[i], kk[i])) @ D @ S
                         + bt * np.outer(kw[i], v[b, t, hv]))
                    o[b, t, hv] = S.T @ (r["scale"] * qq)
                ht[n, hv] = S
    if r["state_layout"] == "vk":
        ht = ht.transpose(0, 1, 3, 2)
    out = {"o": o, "ht": ht}
    if r["precond"] == "atk":
        out["at"] = at
    return out


def decode(inp, opts):
    """Token by token: forward on one token at a time, the state (in the file layout)
    and the ATK state carried from one call to the next (zeros when absent)."""
    r = kla_np.resolve_opts(inp, opts)
    B, T, H, K = inp["q"].shape
    HV, V = inp["v"].shape[2:]
    cu = inp.get("cu_seqlens")
    seqs = ([(b, 0, T) for b in range(B)] if cu is None
            else [(0, int(cu[i]), int(cu[i + 1])) for i in range(len(cu) - 1)])
    atk = r["precond"] == "atk"
    per_token = ("q", "k", "v", "g", "eta", "beta", "g_atk", "beta_atk")
    o = np.zeros(inp["v"].shape)
    hts, ats = [], []
    for n, (b, t0, t1) in enumerate(seqs):
        S = (inp["h0"][n:n + 1] if "h0" in inp else
             np.zeros((1, HV, K, V) if r["state_layout"] == "kv" else (1, HV, V, K)))
        A = inp["a0"][n:n + 1] if "a0" in inp else np.zeros((1, H, K))
        for t in range(t0, t1):
            one = {x: inp[x][b:b + 1, t:t + 1] for x in per_token if x in inp}
            one["h0"] = S
            if atk:
                one["a0"] = A
                if "log_atk_scale" in inp:
                    one["log_atk_scale"] = inp["log_atk_scale"]
            out = kla_np.forward(one, opts)
            o[b, t] = out["o"][0, 0]
            S, A = out["ht"], out.get("at", A)
        hts.append(S[0])
        ats.append(A[0])
    res = {"o": o, "ht": np.stack(hts)}
    if atk:
        res["at"] = np.stack(ats)
    return res


def max_rel(ref, got):
    """max |ref - got| / max(1e-300, max |ref|) over the keys of ref."""
    worst = 0.0
    for n in ref:
        a, b = np.asarray(ref[n], np.float64), np.asarray(got[n], np.float64)
        if a.shape != b.shape:
            return np.inf
        if a.size:
            worst = max(worst, np.max(np.abs(a - b)) / max(1e-300, np.max(np.abs(a))))
    return worst


# --------------------------------------------------------------------------- worked examples

def col(*rows):
    """Printed numbers of the notes as (values, tolerances): half a unit in the last
    printed decimal place (plus 1e-15), i.e. agreement to the printed digits."""
    flat = []
    for r in rows:
        flat.extend(r if isinstance(r, (list, tuple)) else [r])
    vals = np.array([float(s) for s in flat])
    tols = np.array([0.5 * 10.0 ** -(len(s.split(".")[1]) if "." in s else 0) + 1e-15
                     for s in flat])
    return vals, tols


def exact(*rows):
    """Numbers the notes give as exact (hand examples): tolerance 1e-13."""
    flat = []
    for r in rows:
        flat.extend(r if isinstance(r, (list, tuple)) else [r])
    vals = np.array(flat, dtype=np.float64)
    return vals, np.full(vals.shape, 1e-13)


def check_table(out, table):
    """Compare out[name].ravel() with each (values, tolerances). Returns (ok, worst
    error in units of the tolerance, worst absolute error, problems)."""
    ok, worst_units, worst_abs, bad = True, 0.0, 0.0, []
    for name, (vals, tols) in table.items():
        got = np.asarray(out[name], np.float64).ravel()
        if got.shape != vals.shape:
            ok = False
            bad.append(f"{name}: {got.size} values, want {vals.size}")
            continue
        err = np.abs(got - vals)
        worst_units = max(worst_units, np.max(err / tols))
        worst_abs = max(worst_abs, np.max(err))
        if np.any(err > tols):
            ok = False
            bad.append(f"{name}: got {got.tolist()}, want {vals.tolist()} "
                       f"(err {err.max():.2e})")
    return ok, worst_units, worst_abs, bad


def kda18(eta=None, eps="0"):
    inp = {"q": np.array([[1, 0], [1, 1]], float).reshape(1, 2, 1, 2),
           "k": np.array([[1, 1], [1, 0]], float).reshape(1, 2, 1, 2),
           "v": np.array([2, 3], float).reshape(1, 2, 1, 1),
           "g": np.array([[0, np.log(0.5)], [np.log(0.5), np.log(0.25)]]).reshape(1, 2, 1, 2),
           "do": np.ones((1, 2, 1, 1)), "dht": np.array([0.5, 2]).reshape(1, 1, 2, 1)}
    if eta is None:
        inp["beta"] = np.array([0.5, 0.8]).reshape(1, 2, 1)
    else:
        inp["eta"] = np.array(eta, float).reshape(1, 2, 1)
    return inp, {"scale": "1", "eps": eps}


def ex2(mode="gdn", l2norm=False):
    e = np.e
    inp = {"q": np.array([[1, 0], [0.6, 0.8]]).reshape(1, 2, 1, 2),
           "k": np.array([[1, 0], [0.6, 0.8]]).reshape(1, 2, 1, 2),
           "v": np.array([3.0, 1.0]).reshape(1, 2, 1, 1),
           "g": np.array([0, np.log(0.5)]).reshape(1, 2, 1),
           "g_atk": np.array([-1.0, 0.0]).reshape(1, 2, 1),
           "beta_atk": np.array([1 / e, 0.0]).reshape(1, 2, 1),
           "log_atk_scale": np.zeros(1), "a0": np.array([0, e * e]).reshape(1, 1, 2)}
    if mode == "gdn":
        inp["beta"] = np.array([0.5, 0.5]).reshape(1, 2, 1)
    else:
        inp["eta"] = np.ones((1, 2, 1))
    # the notes' squash eps is 0; the spec wants > 0: 1e-300 leaves ln(a + eps) = ln(a)
    opts = {"squash_x": "4", "squash_eps": "1e-300", "scale": "1", "eps": "0"}
    if l2norm:
        opts.update(l2norm_q="true", l2norm_k="true")
    return inp, opts


def ex3(variant="ex3", dat=False):
    """EX3 (PGDN), EX4 (PKDA), EX5 (KLA-PGDN, l2norm q, k), EX6 (KLA-PGDN, raw keys)."""
    inp = {"q": np.array([[1, 2], [-1, 0.5]]).reshape(1, 2, 1, 2),
           "k": np.array([[2, 1], [1, -3]], float).reshape(1, 2, 1, 2),
           "v": np.array([1.0, -2.0]).reshape(1, 2, 1, 1),
           "g": np.log([0.9, 0.5]).reshape(1, 2, 1),
           "g_atk": np.log([0.8, 0.6]).reshape(1, 2, 1),
           "beta_atk": np.array([0.5, 0.9]).reshape(1, 2, 1),
           "h0": np.array([0.1, -0.2]).reshape(1, 1, 2, 1),
           "a0": np.array([0.3, 0.05]).reshape(1, 1, 2),
           "do": np.array([1, -0.5]).reshape(1, 2, 1, 1),
           "dht": np.array([0.3, -0.2]).reshape(1, 1, 2, 1)}
    opts = {"l2norm_q": "true", "l2norm_k": "true"}  # scale K^-1/2, x 1.5, eps_s 1e-6, c -0.2
    if variant in ("ex3", "ex4"):
        inp["beta"] = np.array([0.7, 0.4]).reshape(1, 2, 1)
    else:
        inp["eta"] = np.array([0.7, 0.4]).reshape(1, 2, 1)
        opts["eps"] = "1e-6"
    if variant == "ex4":
        inp["g"] = np.log([[0.9, 0.7], [0.5, 0.95]]).reshape(1, 2, 1, 2)
    if variant == "ex6":
        opts["l2norm_k"] = "false"
    if dat:
        inp["dat"] = np.array([0.7, -0.4]).reshape(1, 1, 2)
    return inp, opts


EX3_GRADS = {
    "dq": col(["0.16584396653", "-0.082921983265"], ["-0.113540545293", "-0.227081090587"]),
    "dk": col(["-0.083769666647", "0.167539333295"], ["-0.169131683653", "-0.056377227884"]),
    "dv": col(["0.626236101729", "0.221468752527"]),
    "dg": col(["-0.047481887072", "0.193136663983"]),
    "dbeta": col(["0.894623002471", "-1.115369891454"]),
    "dg_atk": col(["-0.030793099212", "0.033414551614"]),
    "dbeta_atk": col(["-0.104298146511", "0.097844458125"]),
    "dh0": col(["0.026281590503", "0.250550230612"]),
    "da0": col(["-0.099334699101", "-0.019853789642"]),
    "dlog_atk_scale": col("-0.005117757389"),
}
EX3_DAT = dict(EX3_GRADS)
EX3_DAT.update({
    "dk": col(["-0.030969666647", "0.061939333295"], ["0.009068316347", "0.003022772116"]),
    "dg_atk": col(["0.060406900788", "0.268614551614"]),
    "dbeta_atk": col(["0.183701853489", "-0.192155541875"]),
    "da0": col(["0.236665300899", "-0.211853789642"]),
})
AT_EX3 = exact([0.474, 0.894])

EX2 = {"o": exact([3, 0.952]), "ht": exact([1.56, 0.02]),
       "at": col(["0.367879441171", "2.718281828459"])}

# EX6's dk[t=1][1]: the notes print 0.002374439447; this oracle gives 0.00237443947227,
# and so do 4th-order central differences of the independent matrix-form forward here
# (with x/||x||): 0.00237443947228. The notes' digits are off by 2.5e-11 (a typo of
# the last digits, "447" for "472"); checked at 3e-11 for that one element.
EX6_DK = col(["-0.129173766963", "0.002374439447"], ["-0.034069994732", "-0.057569062114"])
EX6_DK[1][1] = 3e-11

EXAMPLES = [
    # name, (inp, opts), expected table, also with the spec's l2norm (tolerance); the
    # printed digits are checked with fla's x/||x|| (kla_np's l2norm_eps = 0)
    ("KDA 1.8 (gdn, beta given)", kda18(), {
        "o": exact([1, 2.75]), "ht": exact([2.5, 0.25]),
        "dq": exact([1, 1], [2.5, 0.25]), "dk": exact([1.15, 0.75], [2.4, 5.7]),
        "dv": exact([0.95, 1.2]), "dg": exact([0, 0], [0.15, 0.75]),
        "dbeta": exact([3.8, 3.75])}, None),
    ("KDA 1.8 Kaczmarz form (eta = 1, 0.8; eps = 0)", kda18([1, 0.8]), {
        "o": exact([1, 2.75]), "ht": exact([2.5, 0.25]),
        "dq": exact([1, 1], [2.5, 0.25]), "dk": exact([-0.75, -1.15], [-3.6, 5.7]),
        "dv": exact([0.95, 1.2]), "dg": exact([0, 0], [0.15, 0.75]),
        "deta": exact([1.9, 3.75])}, None),
    ("KDA 1.8 relaxed (eta = 0.5, 0.8; eps = 1e-6)", kda18([0.5, 0.8], "1e-6"), {
        "o": col(["0.49999975", "2.5749977125"]),
        "ht": col(["2.449997775", "0.1249999375"])}, None),
    ("EX2 PGDN (x = 4, c = 0)", ex2(), EX2, None),
    # fla's naive PGDN normalises q and k; the unit keys make that the identity exactly
    # with x/||x||, and to ~1e-6 relative with the spec's x/sqrt(||x||^2 + 1e-6) (the
    # ATK sees k^2: a1[0] moves by -1e-6 relative, o1 by 2e-6 absolute)
    ("EX2 PGDN, l2norm q and k", ex2(l2norm=True), EX2, 3e-6),
    ("EX2K KLA-PGDN (eta = 1, eps = 0)", ex2("kla"), {
        "o": exact([3, 1]), "ht": col(["1.615384615385", "0.038461538462"]),
        "at": col(["0.367879441171", "2.718281828459"])}, None),
    ("EX3 PGDN (fla defaults)", ex3(), dict(EX3_GRADS, **{
        "o": col(["0.385617550675", "0.212627964402"]),
        "ht": col(["0.090091265202", "0.85257119216"]), "at": AT_EX3}), 5e-7),
    ("EX3 PGDN with dA_T", ex3(dat=True), dict(EX3_DAT, **{
        "o": col(["0.385617550675", "0.212627964402"]),
        "ht": col(["0.090091265202", "0.85257119216"]), "at": AT_EX3}), 5e-7),
    ("EX4 PKDA", ex3("ex4"), {
        "o": col(["0.402490284856", "0.231774921639"]),
        "ht": col(["0.102668390857", "0.9382734386"]), "at": AT_EX3,
        "dg": col(["0.004802539525", "-0.031341024015"], ["0.206514630978", "-0.036318757205"]),
        "dbeta": col(["0.840721981188", "-1.044655422726"]),
        "dg_atk": col(["-0.03037622896", "0.031296068514"]),
        "dbeta_atk": col(["-0.10239436072", "0.091641117935"]),
        "dlog_atk_scale": col("-0.000903518313")}, 5e-7),
    ("EX5 KLA-PGDN, l2norm q and k", ex3("ex5"), {
        "o": col(["0.332973366725", "0.23724330962"]),
        "ht": col(["0.046715349767", "0.843659917571"]),
        "dk": col(["-0.041519162941", "0.083038325883"], ["-0.131964733603", "-0.043988244534"]),
        "deta": col(["0.794959962551", "-1.136105092796"]),
        "dbeta_atk": col(["0.034967503746", "-0.040619566302"]),
        "dlog_atk_scale": col("0.007421995243")}, 5e-7),
    ("EX6 KLA-PGDN, raw keys", ex3("ex6"), {
        "o": col(["0.11049722673", "0.030217815194"]),
        "ht": col(["0.081584927487", "0.258726976901"]),
        "at": exact([2.244, 8.424]),
        "dq": col(["0.088641069606", "-0.044320534803"], ["-0.037886545437", "-0.075773090875"]),
        "dk": EX6_DK,
        "deta": col(["0.362163119469", "-0.375866997391"]),
        "dg_atk": col(["0.000116727382", "0.002438705412"]),
        "dbeta_atk": col(["-0.002459026310", "0.000238930350"]),
        "dlog_atk_scale": col("0.000897758312")}, 5e-7),
]

# intermediate values the notes print (checked through kla_np's internals)
INTERMEDIATES = [
    ("EX3 a1, m1, m2, kw1, kw2", ex3(), {
        "a": exact([0.64, 0.14], [0.474, 0.894]),
        "m": col(["1.08342384686", "1.29548058471"], ["1.15406496663", "0.967752991869"]),
        "kw": col(["0.969043748009", "0.579356530187"], ["0.364947386235", "-0.918091100024"]),
        "r": col(["-0.24628554013", "-1.76610571354"], ["-0.546545847585", "0.087951614759"])}),
    ("EX5 k^T kw", ex3("ex5"), {"n": col(["1.12583519443", "0.986384189345"])}),
    ("EX6 a, k^T kw, beta", ex3("ex6"), {
        "a": exact([2.24, 0.54], [2.244, 8.424]),
        "n": col(["4.39039661088", "7.59245398694"]),
        "beta": col(["0.159438862272", "0.0526838816546"])}),
    ("EX2K beta2 = 1/1.04", ex2("kla"), {"beta": exact([0.5, 1 / 1.04])}),
]


def run_example(inp, opts, l2norm_eps):
    out = kla_np.forward(inp, opts, l2norm_eps=l2norm_eps)
    if "do" in inp:  # backward's o, ht, at must be forward's
        bwd = kla_np.backward(inp, opts, l2norm_eps=l2norm_eps)
        if any(not np.array_equal(out[n], bwd[n]) for n in out):
            raise AssertionError("backward's outputs differ from forward's")
        out = bwd
    return out


def examples(tap):
    for name, (inp, opts), table, spec_tol in EXAMPLES:
        # fla's normalisation x/||x|| (test-only switch); no-op where nothing is normalised
        out = run_example(inp, opts, 0.0)
        ok, units, wabs, bad = check_table(out, table)
        tap(ok, f"{name}: {len(table)} tensors to the printed digits "
                f"(worst {units:.2f} of the tolerance, abs {wabs:.1e})", bad)
        if spec_tol is not None:
            out = run_example(inp, opts, kla_np.L2NORM_EPS)
            tab = {n: (v, np.maximum(t, spec_tol)) for n, (v, t) in table.items()}
            ok, units, wabs, bad = check_table(out, tab)
            _, _, wout, _ = check_table(out, {n: tab[n] for n in ("o", "ht") if n in tab})
            tap(ok, f"{name} with the spec's l2norm: within {spec_tol:g} (worst abs "
                    f"{wabs:.1e}; o, ht {wout:.1e})", bad)
    for name, (inp, opts), table in INTERMEDIATES:
        p = kla_np._Prepared(inp, opts, 0.0)
        vals = {"a": p.a if p.atk else None, "m": p.m if p.atk else None,
                "kw": p.kw, "r": p.r if p.atk else None, "n": getattr(p, "n", None),
                "beta": p.beta}
        ok, units, wabs, bad = check_table({n: vals[n] for n in table}, table)
        tap(ok, f"{name} (worst abs {wabs:.1e})", bad)


# --------------------------------------------------------------------------- properties

def properties(tap):
    # the spec's section 6 example still holds exactly
    inp = {"q": np.array([[1, 1], [1, 0]], float).reshape(1, 2, 1, 2),
           "k": np.array([[2, 0], [1, 1]], float).reshape(1, 2, 1, 2),
           "v": np.array([3, 1], float).reshape(1, 2, 1, 1),
           "g": np.array([0, np.log(0.5)]).reshape(1, 2, 1),
           "eta": np.array([1, 0.5]).reshape(1, 2, 1)}
    out = kla_np.forward(inp, {"scale": "1", "eps": "0"})
    ok = (np.array_equal(out["o"].ravel(), [1.5, 0.8125])
          and np.array_equal(out["ht"].ravel(), [0.8125, 0.0625]) and set(out) == {"o", "ht"})
    tap(ok, "spec section 6 example exact, outputs o ht only", [] if ok else [out])

    # exact projection: mode kla, eta = 1, eps = 0 => k_t^T S_t = v_t after every token
    for i, (gate, precond, l2k) in enumerate([("channel", "none", False),
                                              ("head", "atk", False),
                                              ("channel", "atk", False),
                                              ("channel", "atk", True)]):
        rng = np.random.default_rng(300 + i)
        inp = make_case(rng, gate=gate, precond=precond, T=6, H=2, HV=4, K=5, V=3,
                        h0=True, a0=True, eta_one=True)
        opts = {"eps": "0", "l2norm_k": str(l2k).lower()}
        S, A, worst = inp["h0"], inp.get("a0"), 0.0
        for t in range(6):
            one = {x: inp[x][:, t:t + 1] for x in ("q", "k", "v", "g", "eta", "g_atk",
                                                    "beta_atk") if x in inp}
            one.update(h0=S, **({"a0": A, "log_atk_scale": inp["log_atk_scale"]}
                                if precond == "atk" else {}))
            out = kla_np.forward(one, opts)
            S, A = out["ht"], out.get("at")
            k = inp["k"][0, t]
            if l2k:
                k = k / np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
            for hv in range(4):
                res = k[hv // 2] @ S[0, hv] - inp["v"][0, t, hv]
                worst = max(worst, np.max(np.abs(res)) / np.max(np.abs(inp["v"][0, t, hv])))
        tap(worst < 1e-12, f"exact projection k^T S_t = v_t, gate={gate} precond={precond}"
                           f"{' l2norm_k' if l2k else ''} (worst {worst:.1e})")

    # a channel gate with equal channels = gate head (forward and every gradient)
    for i, (precond, mode) in enumerate([("none", "kla"), ("none", "gdn"), ("atk", "kla"),
                                         ("atk", "gdn")]):
        rng = np.random.default_rng(400 + i)
        inp = make_case(rng, precond=precond, mode=mode, cu=[3, 2], H=2, HV=4, h0=True,
                        a0=True, dht=True, dat=True)
        opts = {"l2norm_q": "true", "l2norm_k": "true"}
        K = inp["q"].shape[-1]
        a = kla_np.backward(inp, opts)
        inp_c = dict(inp, g=np.repeat(inp["g"][..., None], K, axis=-1))
        b = kla_np.backward(inp_c, opts)
        ok_dims = b["dg"].shape == inp_c["g"].shape
        b["dg"] = b["dg"].sum(-1)
        err = max_rel(a, b)
        tap(err < 1e-13 and ok_dims and set(a) == set(b),
            f"equal channels = gate head, precond={precond} mode={mode} "
            f"(worst {err:.1e}; dg summed over K)")

    # PDN = PGDN with g = 0
    for mode in ("gdn", "kla"):
        rng = np.random.default_rng(500 + (mode == "kla"))
        inp = make_case(rng, precond="atk", mode=mode, g=False, cu=[2, 3], H=1, HV=2,
                        a0=True, dht=True, dat=True)
        a = kla_np.backward(inp, {})
        b = kla_np.backward(dict(inp, g=np.zeros(inp["v"].shape[:3])), {})
        err = max_rel(a, b)
        tap(err == 0 and set(a) == set(b),
            f"PDN (g absent) = PGDN with g = 0, mode {mode} (worst {err:.1e})")

    # decode (token by token, state and ATK state carried) = forward
    for i, (kw, opts) in enumerate([
            (dict(precond="atk", cu=[3, 1, 0, 4], H=2, HV=4, h0=True, a0=True),
             {"l2norm_q": "true", "l2norm_k": "true"}),
            (dict(gate="channel", precond="atk", mode="gdn", B=2, T=5, H=1, HV=2, h0=True,
                  layout="vk"), {"state_layout": "vk"}),
            (dict(gate="channel", precond="atk", B=1, T=6, H=2, HV=2, g_atk=False, las=False),
             {"squash_x": "1.8"}),
            (dict(gate="channel", cu=[4, 2], H=1, HV=3, h0=True), {})]):
        rng = np.random.default_rng(600 + i)
        inp = make_case(rng, **kw)
        inp.pop("do")
        a, b = kla_np.forward(inp, opts), decode(inp, opts)
        err = max_rel(a, b)
        tap(err < 1e-14 and set(a) == set(b),
            f"decode = forward ({kw.get('gate', 'head')}, {kw.get('precond', 'none')}, "
            f"{opts.get('state_layout', 'kv')}; worst {err:.1e})")

    # squash_x -> 1: m -> 1, the preconditioned rule becomes the plain one
    for i, gate in enumerate(("head", "channel")):
        rng = np.random.default_rng(700 + i)
        inp = make_case(rng, gate=gate, precond="atk", cu=[2, 3], H=2, HV=4, h0=True,
                        a0=True, dht=True)
        opts = {"squash_x": repr(1 + 1e-12)}
        a = kla_np.backward(inp, opts)
        plain = {n: v for n, v in inp.items() if n not in ATK_IN + ("dat",)}
        b = kla_np.backward(plain, {})
        err = max_rel(b, {n: a[n] for n in b})
        small = max(np.max(np.abs(a[n])) for n in ("dg_atk", "dbeta_atk", "dlog_atk_scale",
                                                   "da0"))
        tap(err < 1e-10 and small < 1e-10,
            f"squash_x = 1 + 1e-12 equals precond none, gate {gate} (worst {err:.1e}, "
            f"ATK gradients {small:.1e})")

    # grouped heads: value head hv reads key head hv // G, the ATK state per key head;
    # the same as G-times repeated key heads (one per value head) with the ATK repeated
    for i, (gate, precond) in enumerate([("head", "atk"), ("channel", "atk"),
                                         ("channel", "none")]):
        rng = np.random.default_rng(800 + i)
        inp = make_case(rng, gate=gate, precond=precond, cu=[3, 2], H=2, HV=6, h0=True,
                        a0=True, dht=True)
        opts = {"l2norm_k": "true"}
        G = 3
        rep = {"q": 2, "k": 2, "g_atk": 2, "beta_atk": 2, "log_atk_scale": 0, "a0": 1}
        big = dict(inp)
        for x, ax in rep.items():
            if x in inp:
                big[x] = np.repeat(inp[x], G, axis=ax)
        a, b = kla_np.backward(inp, opts), kla_np.backward(big, opts)
        sumg = lambda x, ax: x.reshape(x.shape[:ax] + (-1, G) + x.shape[ax + 1:]).sum(ax + 1)
        err = max_rel({n: a[n] for n in ("o", "ht", "dv", "dg", "deta", "dh0")}, b)
        for n, ax in (("dq", 2), ("dk", 2), ("dg_atk", 2), ("dbeta_atk", 2),
                      ("dlog_atk_scale", 0), ("da0", 1)):
            if n in a:
                err = max(err, max_rel({n: a[n]}, {n: sumg(b[n], ax)}))
        if "at" in a:
            err = max(err, max_rel({"at": np.repeat(a["at"], G, axis=1)}, {"at": b["at"]}))
        tap(err < 1e-13, f"grouped heads (H 2, HV 6) = key heads repeated, gate {gate} "
                         f"precond {precond} (worst {err:.1e})")


# --------------------------------------------------------------------------- options

def options(tap):
    rng = np.random.default_rng(900)
    base = make_case(rng, gate="channel", precond="atk")
    base.pop("do")
    r = kla_np.resolve_opts(base, {})
    tap(r["gate"] == "channel" and r["precond"] == "atk" and r["squash_x"] == 1.5
        and r["squash_eps"] == 1e-6 and r["mode"] == "kla",
        "defaults: gate channel for a 4-dim g, precond atk with beta_atk, squash 1.5 / 1e-6",
        [r] if r["gate"] != "channel" else [])
    plain = {n: v for n, v in base.items() if n not in ATK_IN}
    plain["g"] = plain["g"][..., 0]
    r = kla_np.resolve_opts(plain, {})
    tap(r["gate"] == "head" and r["precond"] == "none", "defaults: gate head, precond none")
    out = kla_np.forward(plain, {})
    tap(set(out) == {"o", "ht"}, "no at without precond")
    nolas = {n: v for n, v in base.items() if n != "log_atk_scale"}
    a = kla_np.forward(nolas, {})
    b = kla_np.forward(nolas, {"gate": "channel", "precond": "atk", "squash_x": "1.5",
                               "squash_eps": "1e-6"})
    c = kla_np.forward(dict(nolas, log_atk_scale=np.full(1, -0.2)), {})
    tap(max_rel(a, b) == 0 and max_rel(a, c) == 0,
        "explicit defaults (options, log_atk_scale = -0.2) change nothing")

    def raises(name, inp, opts, what):
        try:
            kla_np.forward(inp, opts)
        except ValueError as ex:
            return tap(what in str(ex), f"error: {name} ({ex})")
        return tap(False, f"error: {name} (accepted)")

    raises("precond atk without beta_atk", {n: v for n, v in base.items() if n != "beta_atk"},
           {"precond": "atk"}, "beta_atk")
    raises("g_atk with precond none", dict(plain, g_atk=base["g_atk"]), {}, "g_atk")
    raises("beta_atk with precond none given", base, {"precond": "none"}, "beta_atk")
    raises("gate head with a 4-dim g", base, {"gate": "head"}, "gate")
    raises("gate channel with a 3-dim g", plain, {"gate": "channel"}, "gate")
    raises("bad gate", plain, {"gate": "chan"}, "gate")
    raises("bad precond", base, {"precond": "ATK"}, "precond")
    raises("squash_x <= 1", base, {"squash_x": "1"}, "squash_x")
    raises("squash_eps <= 0", base, {"squash_eps": "0"}, "squash_eps")
    raises("a0 shape", dict(base, a0=np.zeros((1, 1, 4))), {}, "a0")
    raises("log_atk_scale shape", dict(base, log_atk_scale=np.zeros(2)), {}, "log_atk_scale")
    raises("g_atk shape", dict(base, g_atk=np.zeros((1, 5, 2))), {}, "g_atk")
    raises("g shape (channel)", dict(base, g=np.zeros((1, 5, 2, 4))), {}, "g shape")


# --------------------------------------------------------------------------- main

def main():
    tap = Tap()
    t0 = time.time()
    worst_all = 0.0
    for i, (name, kw, opts) in enumerate(FD_CASES):
        inp = make_case(np.random.default_rng(100 + i), **kw)
        worst, where, problems = fd_check(inp, opts)
        worst_all = max(worst_all, worst)
        tap(worst < 1e-8 and not problems, f"fd {name} (worst {worst:.1e} {where})",
            problems)
    print(f"# worst finite-difference error over all cases: {worst_all:.1e}")
    worst = 0.0
    for i, (name, kw, opts) in enumerate(FD_CASES):
        inp = make_case(np.random.default_rng(200 + i), **kw)
        inp.pop("do")
        worst = max(worst, max_rel(forward_matrix_form(inp, opts), kla_np.forward(inp, opts)))
    tap(worst < 1e-13, f"forward = matrix form with closed-form ATK, {len(FD_CASES)} cases "
                       f"(worst {worst:.1e})")
    examples(tap)
    properties(tap)
    options(tap)
    print(f"# {tap.n - tap.failed}/{tap.n} passed in {time.time() - t0:.1f} s")
    return tap.finish()


if __name__ == "__main__":
    sys.exit(main())
