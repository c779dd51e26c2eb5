#!/usr/bin/env python3
"""Golden values for the MEDUSA-2 combined loss and its gradients (test/medusa2-loss.test.ts).

An independent plain-PyTorch route (float64 autograd; no transformers, no PEFT, nothing from our
TypeScript): a Llama / Qwen2 decoder written out below (the model math of transformers'
modeling_llama / modeling_qwen2, eager attention, right padding), PEFT-style LoRA
(out = linear(x, W, b) + (x @ A^T @ B^T) * alpha / r), Medusa heads (h <- h + SiLU(h W1^T + b1), then
W2), and

    L = L_LM + lambda * sum_k decay^k * L_k

L_k: head k's cross-entropy on token t+k+2 at rows t whose target token is an assistant token
(loss_mask 1), mean over head k's rows. L_LM at every assistant token j (1 <= j < length), predicted
from row j-1, mean over those tokens:
  ce:        -log p_student(token j)
  kd topk:   KL over the teacher's top-k ids plus one lumped "rest" bucket:
             sum_i pT_i (lpT_i - log pS_i) + pT_rest (log pT_rest - log pS_rest),
             pT_rest = 1 - sum_i pT_i, pS_rest = 1 - sum_i pS_i (computed in float64 as 1 - sum here,
             a different route from the TypeScript's complement logsumexp)
  kd frozen: KL(softmax(teacher logits) || softmax(student logits)) over the whole vocabulary.

Inputs are stored as float32 and read back before use, so both sides start from the same bits;
the loss, per-head losses and every trainable gradient (PyTorch layout [out, in]) are stored as F64.

Regenerate (deterministic):

    /usr/bin/python3 scripts/golden_medusa2.py --out test/fixtures/medusa2
"""

import argparse
import json
import math
import os
import struct

import numpy as np
import torch

torch.set_num_threads(1)

VOCAB = 64
HIDDEN = 32
INTER = 48
LAYERS = 2
HEADS = 4
KV_HEADS = 2
B = 2
T = 12
LENGTHS = [12, 9]
NUM_MEDUSA = 3
LAMBDA = 0.2
DECAY = 0.8
TOPK = 5

# --------------------------------------------------------------------------- safetensors


def write_safetensors(path, tensors):
    """tensors: name -> (torch tensor, 'F32' | 'F64' | 'I64'), written sorted by name."""
    header = {"__metadata__": {"format": "pt"}}
    blobs = []
    off = 0
    for name in sorted(tensors):
        t, dt = tensors[name]
        t = t.contiguous()
        if dt == "F32":
            b = t.to(torch.float32).numpy().astype("<f4").tobytes()
        elif dt == "F64":
            b = t.to(torch.float64).numpy().astype("<f8").tobytes()
        else:
            b = t.to(torch.int64).numpy().astype("<i8").tobytes()
        header[name] = {"dtype": dt, "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - (8 + len(h)) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def f32(t):
    """Round to float32 (what is stored), back to float64 for the computation."""
    return t.to(torch.float32).to(torch.float64)


# --------------------------------------------------------------------------- model


def config(model_type):
    cfg = {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "max_position_embeddings": 64,
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": KV_HEADS,
        "rope_scaling": None,
        "torch_dtype": "float32",
        "vocab_size": VOCAB,
    }
    if model_type == "llama":
        cfg.update({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False, "mlp_bias": False,
                    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False})
    else:
        cfg.update({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                    "sliding_window": None, "use_sliding_window": False, "max_window_layers": LAYERS, "tie_word_embeddings": True})
    return cfg


def make_weights(cfg, g):
    hd = HIDDEN // HEADS

    def lin(o, i):
        return torch.randn(o, i, generator=g, dtype=torch.float64) * 0.2

    def norm(n):
        return 1.0 + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)

    W = {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64) * 0.5}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        W[p + "input_layernorm.weight"] = norm(HIDDEN)
        W[p + "self_attn.q_proj.weight"] = lin(HEADS * hd, HIDDEN)
        W[p + "self_attn.k_proj.weight"] = lin(KV_HEADS * hd, HIDDEN)
        W[p + "self_attn.v_proj.weight"] = lin(KV_HEADS * hd, HIDDEN)
        W[p + "self_attn.o_proj.weight"] = lin(HIDDEN, HEADS * hd)
        if cfg["model_type"] == "qwen2":
            W[p + "self_attn.q_proj.bias"] = 0.1 * torch.randn(HEADS * hd, generator=g, dtype=torch.float64)
            W[p + "self_attn.k_proj.bias"] = 0.1 * torch.randn(KV_HEADS * hd, generator=g, dtype=torch.float64)
            W[p + "self_attn.v_proj.bias"] = 0.1 * torch.randn(KV_HEADS * hd, generator=g, dtype=torch.float64)
        W[p + "post_attention_layernorm.weight"] = norm(HIDDEN)
        W[p + "mlp.gate_proj.weight"] = lin(INTER, HIDDEN)
        W[p + "mlp.up_proj.weight"] = lin(INTER, HIDDEN)
        W[p + "mlp.down_proj.weight"] = lin(HIDDEN, INTER)
    W["model.norm.weight"] = norm(HIDDEN)
    if not cfg["tie_word_embeddings"]:
        W["lm_head.weight"] = lin(VOCAB, HIDDEN) * 2.0
    return {k: f32(v) for k, v in W.items()}


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rms_norm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def forward(cfg, W, ids, attn, lora):
    """Right-padded batch. lora: module path -> (A [r, in], B [out, r], scale). Returns hidden, logits."""
    Bn, Tn = ids.shape
    hd = HIDDEN // HEADS
    eps = cfg["rms_norm_eps"]
    pos = attn.cumsum(-1) - 1
    pos = pos.masked_fill(attn == 0, 1)
    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.int64).to(torch.float64) / hd))
    fr = pos[:, :, None].to(torch.float64) * inv[None, None, :]
    emb = torch.cat((fr, fr), -1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]
    q_i = torch.arange(Tn)[:, None]
    k_i = torch.arange(Tn)[None, :]
    allowed = (k_i <= q_i)[None, None] & attn.bool()[:, None, None, :]
    mask = torch.zeros(Bn, 1, Tn, Tn, dtype=torch.float64).masked_fill(~allowed, -1e30)

    def proj(x, path, name):
        out = torch.nn.functional.linear(x, W[f"{path}.weight"], W.get(f"{path}.bias"))
        if name in lora:
            A, Bm, s = lora[name]
            out = out + (x @ A.T @ Bm.T) * s
        return out

    x = W["model.embed_tokens.weight"][ids]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        n = rms_norm(x, W[p + "input_layernorm.weight"], eps)
        q = proj(n, p + "self_attn.q_proj", f"base_model.model.{p}self_attn.q_proj").view(Bn, Tn, -1, hd).transpose(1, 2)
        k = proj(n, p + "self_attn.k_proj", f"base_model.model.{p}self_attn.k_proj").view(Bn, Tn, -1, hd).transpose(1, 2)
        v = proj(n, p + "self_attn.v_proj", f"base_model.model.{p}self_attn.v_proj").view(Bn, Tn, -1, hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = HEADS // KV_HEADS
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        a = torch.softmax(q @ k.transpose(2, 3) * hd ** -0.5 + mask, dim=-1)
        o = (a @ v).transpose(1, 2).reshape(Bn, Tn, -1)
        x = x + proj(o, p + "self_attn.o_proj", f"base_model.model.{p}self_attn.o_proj")
        n = rms_norm(x, W[p + "post_attention_layernorm.weight"], eps)
        gte = proj(n, p + "mlp.gate_proj", f"base_model.model.{p}mlp.gate_proj")
        up = proj(n, p + "mlp.up_proj", f"base_model.model.{p}mlp.up_proj")
        x = x + proj(torch.nn.functional.silu(gte) * up, p + "mlp.down_proj", f"base_model.model.{p}mlp.down_proj")
    hidden = rms_norm(x, W["model.norm.weight"], eps)
    lm = W["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else W["lm_head.weight"]
    logits = torch.nn.functional.linear(hidden, lm)
    if "base_model.model.lm_head" in lora:
        A, Bm, s = lora["base_model.model.lm_head"]
        logits = logits + (hidden @ A.T @ Bm.T) * s
    return hidden, logits


# --------------------------------------------------------------------------- batch, heads, loss


def make_batch(g):
    ids = torch.randint(3, VOCAB, (B, T), generator=g, dtype=torch.int64)
    attn = torch.zeros(B, T, dtype=torch.int64)
    loss_mask = torch.zeros(B, T, dtype=torch.int64)
    for b, L in enumerate(LENGTHS):
        attn[b, :L] = 1
        ids[b, L:] = 0
    loss_mask[0, 4:8] = 1  # assistant turn, then a user token at 8, assistant again 9..11
    loss_mask[0, 9:12] = 1
    loss_mask[1, 3:9] = 1
    return ids, attn, loss_mask


def make_heads(g, lm_head):
    H = {}
    for k in range(NUM_MEDUSA):
        H[f"{k}.0.linear.weight"] = f32(torch.randn(HIDDEN, HIDDEN, generator=g, dtype=torch.float64) * 0.1)
        H[f"{k}.0.linear.bias"] = f32((torch.rand(HIDDEN, generator=g, dtype=torch.float64) * 2 - 1) / math.sqrt(HIDDEN))
        H[f"{k}.1.weight"] = f32(lm_head + 0.05 * torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64))
    return H


def heads_loss(H, hidden, ids, loss_mask):
    """Per head: mean CE over rows t with loss_mask[t+k+2] = 1 (t+k+2 < length), sum CE, count."""
    out = []
    for k in range(NUM_MEDUSA):
        rows, labels = [], []
        for b, L in enumerate(LENGTHS):
            for t in range(L - k - 2):
                if loss_mask[b, t + k + 2] == 1:
                    rows.append((b, t))
                    labels.append(int(ids[b, t + k + 2]))
        h = torch.stack([hidden[b, t] for b, t in rows])
        z = torch.nn.functional.linear(h, H[f"{k}.0.linear.weight"], H[f"{k}.0.linear.bias"])
        h = h + torch.nn.functional.silu(z)
        logits = torch.nn.functional.linear(h, H[f"{k}.1.weight"])
        ce = torch.nn.functional.cross_entropy(logits, torch.tensor(labels), reduction="mean")
        out.append((ce, len(rows)))
    return out


def lm_positions(loss_mask):
    pos = []
    for b, L in enumerate(LENGTHS):
        for t in range(1, L):
            if loss_mask[b, t] == 1:
                pos.append((b, t))
    return pos


def lm_loss(kind, logits, ids, loss_mask, teacher):
    pos = lm_positions(loss_mask)
    rows = torch.stack([logits[b, t - 1] for b, t in pos])
    logp = torch.log_softmax(rows, -1)
    if kind == "ce":
        return -torch.stack([logp[i, int(ids[b, t])] for i, (b, t) in enumerate(pos)]).mean()
    if "logits" in teacher:
        tl = torch.stack([teacher["logits"][b, t - 1] for b, t in pos])
        tlogp = torch.log_softmax(tl, -1)
        return (tlogp.exp() * (tlogp - logp)).sum(-1).mean()
    kl = []
    for i, (b, t) in enumerate(pos):
        tid = teacher["ids"][b, t]
        tlp = teacher["logprobs"][b, t]
        pt = tlp.exp()
        ps = logp[i, tid].exp()
        pt_rest = torch.clamp(1 - pt.sum(), min=0.0)
        ps_rest = 1 - ps.sum()
        term = (pt * (tlp - logp[i, tid])).sum()
        if pt_rest > 0:
            term = term + pt_rest * (torch.log(pt_rest) - torch.log(ps_rest))
        kl.append(term)
    return torch.stack(kl).mean()


# --------------------------------------------------------------------------- cases


def lora_modules(targets, rank):
    """PEFT module paths and (in, out) dims, layer by layer, lm_head last."""
    hd = HIDDEN // HEADS
    dims = {"q_proj": (HIDDEN, HEADS * hd), "k_proj": (HIDDEN, KV_HEADS * hd), "v_proj": (HIDDEN, KV_HEADS * hd), "o_proj": (HEADS * hd, HIDDEN),
            "gate_proj": (HIDDEN, INTER), "up_proj": (HIDDEN, INTER), "down_proj": (INTER, HIDDEN)}
    out = []
    for i in range(LAYERS):
        for m in ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]:
            if m in targets:
                blk = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
                out.append((f"base_model.model.model.layers.{i}.{blk}.{m}", dims[m]))
    if "lm_head" in targets:
        out.append(("base_model.model.lm_head", (HIDDEN, VOCAB)))
    return out


CASES = [
    # name, model, backbone spec, lm_loss, teacher
    ("lora_ce", "llama", {"mode": "lora", "rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "lm_head"], "train_embeddings": False}, "ce", None),
    ("full_kd_topk", "llama", {"mode": "full", "last_layers": 1, "train_embeddings": False}, "kd", "topk"),
    ("lora_kd_frozen", "llama", {"mode": "lora", "rank": 2, "alpha": 6, "targets": ["k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "train_embeddings": False}, "kd", "frozen"),
    ("full_emb_ce_tied", "qwen2", {"mode": "full", "last_layers": 1, "train_embeddings": True}, "ce", None),
    ("lora_emb_kd_topk", "llama", {"mode": "lora", "rank": 3, "alpha": 3, "targets": ["q_proj", "down_proj"], "train_embeddings": True}, "kd", "topk"),
]


def run_case(out, name, model_name, cfg, W0, spec, kind, teacher_kind, g):
    ids, attn, loss_mask = make_batch(g)
    stored = {"input_ids": (ids, "I64"), "attention_mask": (attn, "I64"), "loss_mask": (loss_mask, "I64")}
    W = {k: v.clone() for k, v in W0.items()}
    trainable = {}
    lora = {}
    if spec["mode"] == "lora":
        r = spec["rank"]
        s = spec["alpha"] / r
        for path, (i, o) in lora_modules(spec["targets"], r):
            A = f32((torch.rand(r, i, generator=g, dtype=torch.float64) * 2 - 1) / math.sqrt(i)).requires_grad_()
            Bm = f32(torch.randn(o, r, generator=g, dtype=torch.float64) * 0.1).requires_grad_()  # non-zero so A has a gradient
            lora[path] = (A, Bm, s)
            trainable[f"{path}.lora_A.weight"] = A
            trainable[f"{path}.lora_B.weight"] = Bm
    else:
        first = LAYERS - spec["last_layers"]
        for k in list(W):
            if any(k.startswith(f"model.layers.{i}.") for i in range(first, LAYERS)) or k == "model.norm.weight":
                W[k] = W[k].clone().requires_grad_()
                trainable[k] = W[k]
    if spec["train_embeddings"]:
        W["model.embed_tokens.weight"] = W["model.embed_tokens.weight"].clone().requires_grad_()
        trainable["model.embed_tokens.weight"] = W["model.embed_tokens.weight"]
    for k, v in trainable.items():
        stored[f"init.{k}"] = (v.detach(), "F32")
    lm_head = W0["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else W0["lm_head.weight"]
    H = {k: v.requires_grad_() for k, v in make_heads(g, lm_head).items()}
    for k, v in H.items():
        stored[f"heads.{k}"] = (v.detach(), "F32")

    teacher = {}
    if teacher_kind is not None:
        with torch.no_grad():
            _, base_logits = forward(cfg, W0, ids, attn, {})
        if teacher_kind == "frozen":
            teacher["logits"] = f32(base_logits)
            stored["teacher_logits"] = (teacher["logits"], "F32")
        else:
            # a different distribution than the student's: sharpened base logits plus noise
            tl = torch.log_softmax(base_logits * 1.5 + 0.5 * torch.randn(base_logits.shape, generator=g, dtype=torch.float64), -1)
            lp, tid = tl.topk(TOPK, dim=-1)  # position t: distribution of token t+1
            tid_tok = torch.zeros(B, T, TOPK, dtype=torch.int64)  # by TOKEN position j (= row j-1)
            lp_tok = torch.zeros(B, T, TOPK, dtype=torch.float64)
            for b, t in lm_positions(loss_mask):
                tid_tok[b, t] = tid[b, t - 1]
                lp_tok[b, t] = lp[b, t - 1]
            teacher["ids"] = tid_tok
            teacher["logprobs"] = f32(lp_tok)
            stored["teacher_topk_ids"] = (tid_tok, "I64")
            stored["teacher_topk_logprobs"] = (teacher["logprobs"], "F32")

    hidden, logits = forward(cfg, W, ids, attn, lora)
    l_lm = lm_loss(kind, logits, ids, loss_mask, teacher)
    hl = heads_loss(H, hidden, ids, loss_mask)
    total = l_lm + LAMBDA * sum((DECAY ** k) * ce for k, (ce, _) in enumerate(hl))
    params = list(trainable.items()) + list(H.items())
    grads = torch.autograd.grad(total, [p for _, p in params])
    stored["loss"] = (total.detach().reshape(1), "F64")
    stored["lm_loss"] = (l_lm.detach().reshape(1), "F64")
    stored["head_loss"] = (torch.stack([ce.detach() for ce, _ in hl]), "F64")
    stored["head_valid"] = (torch.tensor([n for _, n in hl]), "I64")
    stored["lm_valid"] = (torch.tensor([len(lm_positions(loss_mask))]), "I64")
    for (k, _), gr in zip(params, grads):
        stored[f"grad.{k}"] = (gr, "F64")
    write_safetensors(os.path.join(out, f"{name}.safetensors"), stored)
    return {
        "name": name, "file": f"{name}.safetensors", "model": model_name, "backbone": spec, "lm_loss": kind, "teacher": teacher_kind,
        "topk": TOPK if teacher_kind == "topk" else 0, "heads_coefficient": LAMBDA, "decay": DECAY, "num_heads": NUM_MEDUSA,
        "batch": B, "seq_len": T, "lengths": LENGTHS, "trainable": sorted(trainable), "heads": sorted(H),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    models = {}
    for mi, mt in enumerate(["llama", "qwen2"]):
        name = "llama" if mt == "llama" else "qwen2-tied"
        cfg = config(mt)
        W = make_weights(cfg, torch.Generator().manual_seed(7001 + mi))
        folder = os.path.join(a.out, name)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w") as f:
            f.write(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        write_safetensors(os.path.join(folder, "model.safetensors"), {k: (v, "F32") for k, v in W.items()})
        models[mt] = (name, cfg, W)
    index = []
    for ci, (name, mt, spec, kind, teacher) in enumerate(CASES):
        mname, cfg, W = models[mt]
        index.append(run_case(a.out, name, mname, cfg, W, spec, kind, teacher, torch.Generator().manual_seed(8001 + ci)))
    with open(os.path.join(a.out, "index.json"), "w") as f:
        f.write(json.dumps({"cases": index}, indent=2) + "\n")
    print(f"wrote {len(index)} cases to {a.out}")


if __name__ == "__main__":
    main()
