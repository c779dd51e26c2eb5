#!/usr/bin/env python3
"""Golden values for Medusa heads training: heads forward, loss, top-k accuracy and
gradients; AdamW; gradient-norm clipping; learning-rate schedules.

An independent route to the numbers the TypeScript trainer must produce. Everything is
computed in float64 with plain PyTorch (autograd, torch.optim.AdamW,
torch.nn.utils.clip_grad_norm_, torch.optim.lr_scheduler.LambdaLR), and the heads' loss is
re-derived a second time with numpy loops plus central finite differences for the gradients.
Every input is drawn in float32 and widened exactly to float64, so a float32 consumer loads
the very same inputs; only its arithmetic differs.

Needs only torch and numpy (no transformers, no safetensors package): the safetensors files
are written (and read back) by hand; the schedule lambdas are transcribed from transformers'
src/transformers/optimization.py (see schedule_lambda below).

Regenerate (deterministic, byte-identical output):

    /usr/bin/python3 scripts/golden_heads.py --out test/fixtures/heads

See test/fixtures/heads/README.md for the semantics of every stored tensor.
"""

import argparse
import json
import math
import os
import struct
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

torch.set_num_threads(1)  # fixed reduction order -> reproducible bytes

# Heads cases: sizes shared by all cases.
D = 16
V = 40
K = 3
B = 2
T = 14
# loss_mask layout (1 = the token is a training label):
#   row 0: a 3-token prompt (0), an answer, a 2-token template gap at 8..9 (a second turn), an answer
#   row 1: a 2-token prompt (0), an answer up to position 10, then 3 padding positions (0, id 0)
ROW0_ZERO = [0, 1, 2, 8, 9]
ROW1_PROMPT = 2
ROW1_PADS = 3

CASES = [
    # name, mode, layers per head L, decay, heads_coefficient, seed
    ("per_head_l1", "per_head", 1, 0.8, 1.0, 7101),
    ("per_head_l2", "per_head", 2, 0.8, 0.5, 7102),
    ("shared_l1", "shared", 1, 0.9, 1.0, 7103),
]
TOPK = 10  # top-1..top-10 accuracy (what `medusa-train eval` reports)
# float32 consumers must rank every label exactly as float64 does
MIN_LABEL_MARGIN = 1e-4

# --------------------------------------------------------------------------
# safetensors (hand-written writer / reader)
# --------------------------------------------------------------------------

ST_DTYPES = {"F64": ("<f8", 8), "F32": ("<f4", 4), "I64": ("<i8", 8)}


def write_safetensors(path, tensors):
    """tensors: dict name -> (torch tensor, st dtype). Data sorted by name; no metadata
    beyond {"format": "pt"}; header padded with spaces to an 8-byte boundary."""
    header = {"__metadata__": {"format": "pt"}}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        t, dtype = tensors[name]
        np_dtype, size = ST_DTYPES[dtype]
        b = t.detach().contiguous().numpy().astype(np_dtype).tobytes()
        assert len(b) == t.numel() * size
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hjson += b" " * ((8 - (8 + len(hjson)) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for b in blobs:
            f.write(b)


def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n].decode("utf-8"))
    data = raw[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        arr = np.frombuffer(data[b:e], dtype=ST_DTYPES[info["dtype"]][0]).copy()
        out[name] = torch.from_numpy(arr).reshape(info["shape"])
    return out


def write_checked(path, tensors):
    """Write, read back, and require every tensor to come back bit-identical."""
    write_safetensors(path, tensors)
    back = read_safetensors(path)
    assert sorted(back) == sorted(tensors), path
    for k, (t, dtype) in tensors.items():
        want = t.detach().double() if dtype == "F64" else t.detach()
        assert back[k].dtype == want.dtype and torch.equal(back[k], want), (path, k)


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def randn32(g, *shape, std=1.0):
    """float32 N(0, std^2) draws, widened exactly to float64."""
    return (torch.randn(*shape, generator=g, dtype=torch.float32) * std).double()


# --------------------------------------------------------------------------
# Medusa heads (DESIGN.md section 2)
# --------------------------------------------------------------------------


def param_names(mode, L):
    """Trainable parameter names in creation order (the shared lm_head is frozen, not listed)."""
    names = []
    for k in range(K):
        for l in range(L):
            names += [f"{k}.{l}.linear.weight", f"{k}.{l}.linear.bias"]
        if mode == "per_head":
            names.append(f"{k}.{L}.weight")
    return names


def make_params(g, mode, L):
    P = {}
    for name in param_names(mode, L):
        if name.endswith(".linear.weight"):
            P[name] = randn32(g, D, D, std=0.1)  # [out, in]; NOT the zero init, so gradients flow through blocks
        elif name.endswith(".linear.bias"):
            P[name] = randn32(g, D, std=0.1)
        else:
            P[name] = randn32(g, V, D, std=0.3)  # per-head W2 [V, d]
    frozen = {"lm_head.weight": randn32(g, V, D, std=0.3)} if mode == "shared" else {}
    return P, frozen


def heads_logits(P, frozen, hidden, mode, L):
    """Per head k: L blocks h <- h + SiLU(h W1^T + b1), then h W2^T. Returns [K, B, T, V]."""
    out = []
    for k in range(K):
        h = hidden
        for l in range(L):
            h = h + F.silu(F.linear(h, P[f"{k}.{l}.linear.weight"], P[f"{k}.{l}.linear.bias"]))
        w2 = P[f"{k}.{L}.weight"] if mode == "per_head" else frozen["lm_head.weight"]
        out.append(F.linear(h, w2))
    return torch.stack(out)


def heads_loss(logits, input_ids, loss_mask, decay, coef):
    """Valid (b, t) for head k: t + k + 2 < T and loss_mask[b, t+k+2] == 1; label input_ids[b, t+k+2].
    CE_k = mean cross-entropy over valid positions; loss = coef * sum_k decay^k CE_k.
    Top-j accuracy: fraction of valid positions whose label logit is beaten (strictly) by < j logits."""
    total = torch.zeros((), dtype=torch.float64)
    ces, accs, counts, margins = [], [], [], []
    for k in range(K):
        s = k + 2
        lg = logits[k][:, : T - s]  # [B, T-s, V]: positions t = 0..T-s-1
        lab = input_ids[:, s:]  # [B, T-s]
        valid = loss_mask[:, s:] == 1
        lv, yv = lg[valid], lab[valid]  # [N, V], [N]
        ce = F.cross_entropy(lv, yv, reduction="mean")
        total = total + (decay**k) * ce
        with torch.no_grad():
            lab_logit = lv.gather(1, yv[:, None])
            rank = (lv > lab_logit).sum(1)
            accs.append(torch.stack([(rank < j).double().mean() for j in range(1, TOPK + 1)]))
            others = (lv - lab_logit).abs()
            others[torch.arange(len(yv)), yv] = float("inf")
            margins.append(others.min().item())
        ces.append(ce)
        counts.append(int(valid.sum()))
    return coef * total, torch.stack(ces), torch.stack(accs), counts, min(margins)


# ---- second route: numpy, explicit loops over heads / rows / positions ----


def np_loss(P, frozen, hidden, ids, mask, mode, L, decay, coef):
    total = 0.0
    ces, accs, counts = [], [], []
    for k in range(K):
        ce_sum, n, hits = 0.0, 0, [0] * TOPK
        w2 = P[f"{k}.{L}.weight"] if mode == "per_head" else frozen["lm_head.weight"]
        for b in range(B):
            for t in range(T):
                p = t + k + 2
                if p >= T or mask[b, p] != 1:
                    continue
                h = hidden[b, t].copy()
                for l in range(L):
                    z = P[f"{k}.{l}.linear.weight"] @ h + P[f"{k}.{l}.linear.bias"]
                    h = h + z / (1.0 + np.exp(-z))
                lg = w2 @ h
                y = int(ids[b, p])
                m = lg.max()
                ce_sum += m + math.log(np.exp(lg - m).sum()) - lg[y]
                beaten = int((lg > lg[y]).sum())
                for j in range(TOPK):
                    hits[j] += beaten < j + 1
                n += 1
        ces.append(ce_sum / n)
        accs.append([h_ / n for h_ in hits])
        counts.append(n)
        total += decay**k * (ce_sum / n)
    return coef * total, ces, accs, counts


def finite_difference_check(P, frozen, hidden, ids, mask, mode, L, decay, coef, grads, g):
    """Central differences of the numpy loss on 6 random entries of every parameter."""
    Pn = {k: v.numpy().copy() for k, v in P.items()}
    Fn = {k: v.numpy() for k, v in frozen.items()}
    hn = hidden.numpy()
    eps = 1e-6
    worst = 0.0
    for name in sorted(Pn):
        flat = Pn[name].reshape(-1)
        for idx in torch.randperm(flat.size, generator=g)[:6].tolist():
            orig = flat[idx]
            flat[idx] = orig + eps
            up = np_loss(Pn, Fn, hn, ids, mask, mode, L, decay, coef)[0]
            flat[idx] = orig - eps
            down = np_loss(Pn, Fn, hn, ids, mask, mode, L, decay, coef)[0]
            flat[idx] = orig
            fd = (up - down) / (2 * eps)
            ad = grads[name].reshape(-1)[idx].item()
            err = abs(fd - ad) / max(1e-3, abs(ad))
            worst = max(worst, err)
            assert err < 1e-6, (name, idx, fd, ad)
    return worst


def make_mask():
    mask = torch.ones(B, T, dtype=torch.int64)
    mask[0, ROW0_ZERO] = 0
    mask[1, :ROW1_PROMPT] = 0
    mask[1, T - ROW1_PADS :] = 0
    return mask


PLANT_RANKS = [0, 1, 0, 2, 0, 3, 4, 0, 6, 0, 5, 8, 0, 12, 7, 0, 9, 2, 0, 10, 1]


def plant_labels(logits, input_ids, loss_mask):
    """Random labels would leave every head at ~0 top-1 accuracy. Label position p is a label of
    every head k (from t = p - k - 2); one of them, k = p % K, gets its rank-r token at t as the
    label, r taken from PLANT_RANKS (ranks 10 and 12 are outside the top 10), so each head's
    top-1..top-10 accuracies differ. Positions whose t would be negative keep their random id."""
    for b in range(B):
        for p in range(T):
            k = p % K
            t = p - k - 2
            if t < 0 or loss_mask[b, p] != 1:
                continue
            r = PLANT_RANKS[(p + 5 * b) % len(PLANT_RANKS)]
            input_ids[b, p] = int(torch.argsort(logits[k, b, t], descending=True)[r])


def generate_case(out_dir, name, mode, L, decay, coef, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = randn32(g, B, T, D)
    input_ids = torch.randint(0, V, (B, T), generator=g, dtype=torch.int64)
    input_ids[1, T - ROW1_PADS :] = 0  # padding id
    loss_mask = make_mask()
    P, frozen = make_params(g, mode, L)
    for p in P.values():
        p.requires_grad_(True)

    logits = heads_logits(P, frozen, hidden, mode, L)
    plant_labels(logits.detach(), input_ids, loss_mask)
    loss, ces, accs, counts, margin = heads_loss(logits, input_ids, loss_mask, decay, coef)
    names = param_names(mode, L)
    grads = dict(zip(names, torch.autograd.grad(loss, [P[n] for n in names])))
    P = {k: v.detach() for k, v in P.items()}

    # --- checks ---
    assert margin > MIN_LABEL_MARGIN, (name, margin)
    assert all(c > 0 for c in counts)
    for n_, gr in grads.items():
        assert torch.isfinite(gr).all() and gr.abs().max() > 1e-4, (name, n_)
    np_total, np_ces, np_accs, np_counts = np_loss(
        {k: v.numpy() for k, v in P.items()},
        {k: v.numpy() for k, v in frozen.items()},
        hidden.numpy(),
        input_ids.numpy(),
        loss_mask.numpy(),
        mode,
        L,
        decay,
        coef,
    )
    assert np_counts == counts
    assert abs(np_total - loss.item()) < 1e-12 * abs(np_total), (name, np_total, loss.item())
    assert np.abs(np.array(np_ces) - ces.detach().numpy()).max() < 1e-12
    assert np.array_equal(np.array(np_accs), accs.numpy())
    fd_worst = finite_difference_check(
        P, frozen, hidden, input_ids.numpy(), loss_mask.numpy(), mode, L, decay, coef, grads, g
    )

    tensors = {
        "hidden": (hidden, "F64"),
        "input_ids": (input_ids, "I64"),
        "loss_mask": (loss_mask, "I64"),
        "logits": (logits.detach(), "F64"),
        "loss": (loss.detach(), "F64"),
        "head_loss": (ces.detach(), "F64"),
        "head_topk_acc": (accs, "F64"),
        "head_valid": (torch.tensor(counts, dtype=torch.int64), "I64"),
    }
    for n_, p in {**P, **frozen}.items():
        tensors[n_] = (p, "F64")
    for n_, gr in grads.items():
        tensors[f"grad.{n_}"] = (gr, "F64")
    write_checked(os.path.join(out_dir, f"{name}.safetensors"), tensors)
    print(
        f"{name}: loss {loss.item():.6f}, head_loss {[round(c, 6) for c in ces.tolist()]}, "
        f"top1 {[round(a, 4) for a in accs[:, 0].tolist()]}, valid {counts}, "
        f"min label margin {margin:.2e}, finite-difference worst rel err {fd_worst:.1e}"
    )
    return {
        "name": name,
        "file": f"{name}.safetensors",
        "mode": mode,
        "num_heads": K,
        "num_layers": L,
        "hidden_size": D,
        "vocab_size": V,
        "batch": B,
        "seq_len": T,
        "decay": decay,
        "heads_coefficient": coef,
        "topk": TOPK,
        "seed": seed,
        "trainable": names,
        "frozen": sorted(frozen),
    }


# --------------------------------------------------------------------------
# AdamW (torch.optim.AdamW, two param groups)
# --------------------------------------------------------------------------

ADAMW_LR = 1e-3
ADAMW_BETAS = (0.9, 0.999)
ADAMW_EPS = 1e-8
ADAMW_WD = 0.01
ADAMW_STEPS = 3
ADAMW_PARAMS = [("lin1.weight", (4, 3)), ("lin1.bias", (4,)), ("lin2.weight", (2, 4)), ("lin2.bias", (2,))]


def generate_adamw(out_dir, seed=7201):
    g = torch.Generator().manual_seed(seed)
    params = {n: torch.nn.Parameter(randn32(g, *s)) for n, s in ADAMW_PARAMS}
    step_grads = []
    for s in range(ADAMW_STEPS):
        # gradient scale changes between steps so the moments' running averages matter
        gs = {n: randn32(g, *shape, std=[1.0, 0.1, 2.0][s]) for n, shape in ADAMW_PARAMS}
        gs["lin1.weight"][0, 0] = 0.0  # never a gradient: only weight decay moves it; eps avoids 0/0
        gs["lin2.bias"][1] = float(np.float32(1e-9))  # |g| < eps: eps dominates the denominator
        step_grads.append(gs)
    decay_names = [n for n, _ in ADAMW_PARAMS if n.endswith(".weight")]
    nodecay_names = [n for n, _ in ADAMW_PARAMS if n.endswith(".bias")]
    opt = torch.optim.AdamW(
        [
            {"params": [params[n] for n in decay_names], "weight_decay": ADAMW_WD},
            {"params": [params[n] for n in nodecay_names], "weight_decay": 0.0},
        ],
        lr=ADAMW_LR,
        betas=ADAMW_BETAS,
        eps=ADAMW_EPS,
        foreach=False,
    )
    tensors = {f"param0.{n}": (p.detach().clone(), "F64") for n, p in params.items()}
    for s, gs in enumerate(step_grads, start=1):
        for n, p in params.items():
            p.grad = gs[n].clone()
            tensors[f"grad{s}.{n}"] = (gs[n], "F64")
        opt.step()
        for n, p in params.items():
            tensors[f"param{s}.{n}"] = (p.detach().clone(), "F64")
    for n, p in params.items():
        st = opt.state[p]
        assert float(st["step"]) == ADAMW_STEPS
        tensors[f"exp_avg.{n}"] = (st["exp_avg"].clone(), "F64")
        tensors[f"exp_avg_sq.{n}"] = (st["exp_avg_sq"].clone(), "F64")

    # second route: the update written out by hand (torch 1.13 _single_tensor_adamw, float64)
    b1, b2 = ADAMW_BETAS
    for n, _ in ADAMW_PARAMS:
        wd = ADAMW_WD if n in decay_names else 0.0
        p = tensors[f"param0.{n}"][0].clone()
        m = torch.zeros_like(p)
        v = torch.zeros_like(p)
        for s in range(1, ADAMW_STEPS + 1):
            gr = step_grads[s - 1][n]
            p = p * (1 - ADAMW_LR * wd)
            m = m * b1 + gr * (1 - b1)
            v = v * b2 + gr * gr * (1 - b2)
            denom = (v.sqrt() / math.sqrt(1 - b2**s)) + ADAMW_EPS
            p = p - (ADAMW_LR / (1 - b1**s)) * m / denom
            assert (p - tensors[f"param{s}.{n}"][0]).abs().max() < 1e-15, (n, s)
    write_checked(os.path.join(out_dir, "adamw.safetensors"), tensors)
    moved = (tensors["param3.lin1.weight"][0][0, 0] / tensors["param0.lin1.weight"][0][0, 0]).item()
    print(f"adamw: {ADAMW_STEPS} steps; lin1.weight[0,0] (zero grad) scaled by {moved!r} (= (1 - lr*wd)^3)")
    return {
        "file": "adamw.safetensors",
        "lr": ADAMW_LR,
        "betas": list(ADAMW_BETAS),
        "eps": ADAMW_EPS,
        "steps": ADAMW_STEPS,
        "params": [
            {"name": n, "shape": list(s), "weight_decay": ADAMW_WD if n in decay_names else 0.0}
            for n, s in ADAMW_PARAMS
        ],
        "seed": seed,
    }


# --------------------------------------------------------------------------
# clip_grad_norm_
# --------------------------------------------------------------------------

CLIP_MAX_NORM = 0.5
CLIP_GRADS = [("a", (3, 4)), ("b", (5,)), ("c", (2, 2, 3))]


def generate_clip(out_dir, seed=7301):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    sets = []
    for label, std in (("big", 1.0), ("small", 0.01)):
        params = {n: torch.nn.Parameter(torch.zeros(s, dtype=torch.float64)) for n, s in CLIP_GRADS}
        for n, s in CLIP_GRADS:
            params[n].grad = randn32(g, *s, std=std)
            tensors[f"{label}.grad.{n}"] = (params[n].grad.clone(), "F64")
        total = torch.nn.utils.clip_grad_norm_([params[n] for n, _ in CLIP_GRADS], CLIP_MAX_NORM)
        for n, _ in CLIP_GRADS:
            tensors[f"{label}.clipped.{n}"] = (params[n].grad.clone(), "F64")
        tensors[f"{label}.total_norm"] = (total.detach().clone(), "F64")
        # second route: one flat vector
        flat = torch.cat([tensors[f"{label}.grad.{n}"][0].reshape(-1) for n, _ in CLIP_GRADS])
        norm = math.sqrt(sum(x * x for x in flat.tolist()))
        assert abs(norm - total.item()) < 1e-14 * norm
        coef = min(1.0, CLIP_MAX_NORM / (norm + 1e-6))
        for n, _ in CLIP_GRADS:
            want = tensors[f"{label}.grad.{n}"][0] * coef
            assert (want - tensors[f"{label}.clipped.{n}"][0]).abs().max() < 1e-16
        assert (coef < 1.0) == (label == "big")
        sets.append({"prefix": label, "total_norm": total.item(), "clip_coef": coef})
        print(f"clip {label}: total norm {total.item():.6f}, applied coefficient {coef:.6f}")
    write_checked(os.path.join(out_dir, "clip.safetensors"), tensors)
    return {
        "file": "clip.safetensors",
        "max_norm": CLIP_MAX_NORM,
        "grads": [{"name": n, "shape": list(s)} for n, s in CLIP_GRADS],
        "sets": sets,
        "seed": seed,
    }


# --------------------------------------------------------------------------
# LR schedules (transformers src/transformers/optimization.py, transcribed)
# --------------------------------------------------------------------------


def _constant_with_warmup(current_step, *, num_warmup_steps):
    # _get_constant_schedule_with_warmup_lr_lambda
    if current_step < num_warmup_steps:
        return float(current_step) / float(max(1.0, num_warmup_steps))
    return 1.0


def _linear_with_warmup(current_step, *, num_warmup_steps, num_training_steps):
    # _get_linear_schedule_with_warmup_lr_lambda
    if current_step < num_warmup_steps:
        return float(current_step) / float(max(1, num_warmup_steps))
    return max(0.0, float(num_training_steps - current_step) / float(max(1, num_training_steps - num_warmup_steps)))


def _cosine_with_warmup(current_step, *, num_warmup_steps, num_training_steps, num_cycles, min_lr_rate=0.0):
    # _get_cosine_schedule_with_warmup_lr_lambda. optimization.py defines it twice; the later
    # definition (with min_lr_rate, default 0.0) is the one get_cosine_schedule_with_warmup
    # binds at import time. With min_lr_rate 0, factor * 1 + 0 == factor exactly.
    if current_step < num_warmup_steps:
        return float(current_step) / float(max(1, num_warmup_steps))
    progress = float(current_step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
    factor = 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))
    factor = factor * (1 - min_lr_rate) + min_lr_rate
    return max(0, factor)


def schedule_lambda(kind, warmup, total):
    if kind == "cosine":
        return partial(_cosine_with_warmup, num_warmup_steps=warmup, num_training_steps=total, num_cycles=0.5)
    if kind == "linear":
        return partial(_linear_with_warmup, num_warmup_steps=warmup, num_training_steps=total)
    if kind == "constant":
        return partial(_constant_with_warmup, num_warmup_steps=warmup)
    raise ValueError(kind)


def lambda_lr_values(kind, lr, warmup, total, steps):
    """The lr each optimizer.step() uses, read from a real LambdaLR: step s uses lambda(s)."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule_lambda(kind, warmup, total))
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        p.grad = torch.zeros(1)
        opt.step()
        sched.step()
    return out


def get_warmup_steps(num_training_steps, warmup_ratio):
    # TrainingArguments.get_warmup_steps with warmup_steps == 0
    return math.ceil(num_training_steps * warmup_ratio)


def generate_schedules(out_dir):
    configs = [
        # name, warmup, total: steps 0..total (the last optimizer step is total - 1; total is included
        # as the first step past the end, where transformers' value is still defined by the formula)
        ("main", 3, 20),
        ("no_warmup", 0, 10),
        ("all_warmup", 4, 4),
        ("warmup_past_total", 5, 3),
        ("one_step", 0, 1),
    ]
    cases = []
    for cname, warmup, total in configs:
        for kind in ("cosine", "linear", "constant"):
            lrs = lambda_lr_values(kind, 1e-3, warmup, total, total + 1)
            direct = [1e-3 * schedule_lambda(kind, warmup, total)(s) for s in range(total + 1)]
            assert lrs == direct, (cname, kind)
            cases.append(
                {"name": f"{cname}_{kind}", "kind": kind, "lr": 1e-3, "warmup_steps": warmup, "total_steps": total, "lrs": lrs}
            )
    warm = []
    for total, ratio in [(20, 0.1), (20, 0.15), (100, 0.07), (1000, 0.03), (7, 0.5), (10, 0.0), (3, 1.0), (1, 0.1)]:
        warm.append({"total_steps": total, "warmup_ratio": ratio, "warmup_steps": get_warmup_steps(total, ratio)})
    assert warm[2]["warmup_steps"] == 8  # 100 * 0.07 == 7.000000000000001 in binary64: ceil gives 8
    doc = {
        "source": "huggingface/transformers src/transformers/optimization.py (get_cosine_schedule_with_warmup "
        "num_cycles 0.5, get_linear_schedule_with_warmup, get_constant_schedule_with_warmup) under "
        "torch.optim.lr_scheduler.LambdaLR; lrs[s] is the lr used by optimizer step s (0-based). "
        "warmup_steps: TrainingArguments.get_warmup_steps = ceil(num_training_steps * warmup_ratio).",
        "cases": cases,
        "warmup_steps": warm,
    }
    write_json(os.path.join(out_dir, "schedules.json"), doc)
    main = {c["kind"]: c["lrs"] for c in cases if c["name"].startswith("main_")}
    print("schedules main: " + ", ".join(f"{k} [{v[0]}, {v[3]}, {v[-2]!r}, {v[-1]}]" for k, v in main.items()))
    return {"file": "schedules.json", "cases": [c["name"] for c in cases]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="test/fixtures/heads")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for stale in os.listdir(args.out):
        if stale.endswith(".safetensors") or stale.endswith(".json"):
            os.remove(os.path.join(args.out, stale))
    index = {
        "generator": "scripts/golden_heads.py",
        "heads": [generate_case(args.out, *c) for c in CASES],
        "adamw": generate_adamw(args.out),
        "clip": generate_clip(args.out),
        "schedules": generate_schedules(args.out),
    }
    write_json(os.path.join(args.out, "index.json"), index)


if __name__ == "__main__":
    main()
