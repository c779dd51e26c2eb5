#!/usr/bin/env python3
"""Train the embedded structured base model (a small Llama) on the project's structured corpus.

Step 2 of `npm run build:structured-model` (step 1, scripts/structured-corpus.ts, writes the corpus
token ids and the tokenizer files). Plain PyTorch on the CPU; the model math is
scripts/golden_decoder.py's `forward` (the independent re-implementation of transformers'
LlamaForCausalLM that the TypeScript decoder is checked against), so the weights mean exactly what
src/model/decoder.ts computes with them.

    /usr/bin/python3 scripts/build_structured_model.py --corpus .scratch/structured-corpus \\
        --out assets/structured-model --fixtures test/fixtures/structured

Reproducible: seeded init and data order, a fixed thread count, deterministic algorithms and a
fixed step count, so the same corpus and seed rebuild the same model.safetensors bit for bit on
the same machine (thread count and the BLAS build decide float reduction order).

Writes --out: config.json, generation_config.json, model.safetensors (F16), tokenizer.json,
tokenizer_config.json, special_tokens_map.json, build-info.json (losses, accuracies, timings) and
README.md; and --fixtures: golden.safetensors (logits of fixed inputs and greedy ids, computed
from the stored F16 weights upcast to float32) for test/structured-model.test.ts.
"""

import argparse
import hashlib
import json
import math
import os
import shutil
import struct
import sys
import time

# Threads that sleep instead of spinning while they wait: on a shared 2-core machine spinning OpenMP
# threads made each step 3-8x slower. Must be set before torch loads libgomp; does not change results.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import golden_decoder as gd  # noqa: E402  (sets 1 thread on import; we set ours below)

THREADS = 1  # one intra-op thread: a fixed reduction order, and as fast as 2 on the shared machine (measured)
SEQ = 256  # training row length (conversations packed whole, never split)
FIXTURE_GREEDY = 64  # greedy tokens recorded per fixture prompt


def model_config(vocab, pad_id, eos_ids, bos_id, a):
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos_id,
        "eos_token_id": eos_ids,
        "hidden_act": "silu",
        "hidden_size": a.hidden,
        "initializer_range": 0.02,
        "intermediate_size": a.intermediate,
        "max_position_embeddings": 512,
        "mlp_bias": False,
        "num_attention_heads": a.heads,
        "num_hidden_layers": a.layers,
        "num_key_value_heads": a.kv_heads,
        "pad_token_id": pad_id,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "float16",
        "use_cache": True,
        "vocab_size": vocab,
    }


def init_weights(cfg, seed):
    """GPT-2 style init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * layers), norms 1."""
    g = torch.Generator().manual_seed(seed)
    H, I, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = gd.head_dim_of(cfg)
    nH, nKV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    std, out_std = 0.02, 0.02 / math.sqrt(2 * L)

    def lin(o, i, s=std):
        return torch.randn(o, i, generator=g) * s

    W = {"model.embed_tokens.weight": lin(cfg["vocab_size"], H)}
    for i in range(L):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        W[p + "input_layernorm.weight"] = torch.ones(H)
        W[a + "q_proj.weight"] = lin(nH * hd, H)
        W[a + "k_proj.weight"] = lin(nKV * hd, H)
        W[a + "v_proj.weight"] = lin(nKV * hd, H)
        W[a + "o_proj.weight"] = lin(H, nH * hd, out_std)
        W[p + "post_attention_layernorm.weight"] = torch.ones(H)
        W[p + "mlp.gate_proj.weight"] = lin(I, H)
        W[p + "mlp.up_proj.weight"] = lin(I, H)
        W[p + "mlp.down_proj.weight"] = lin(H, I, out_std)
    W["model.norm.weight"] = torch.ones(H)
    return W


class TrainForward:
    """The forward of golden_decoder.forward for unpadded rows, restructured for training speed (fused
    q/k/v and gate/up matmuls, cos/sin and the causal mask computed once, GQA by grouping query heads
    instead of repeating K/V). Same function: checked against golden_decoder.forward before training."""

    def __init__(self, cfg, T):
        self.cfg = cfg
        self.hd = gd.head_dim_of(cfg)
        self.nH, self.nKV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.rep = self.nH // self.nKV
        pos = torch.arange(T)[None]  # [1, T]
        cos, sin = gd.rope_cos_sin(gd.compute_inv_freq(cfg), pos)  # [1, T, hd]
        self.cos, self.sin = cos[:, None], sin[:, None]  # [1, 1, T, hd]
        mask = torch.zeros(T, T).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))  # [T, T]
        self.mask = mask.repeat(self.rep, 1)  # [rep*T, T]: row r*T+i is query i of head r in a group

    def __call__(self, W, ids):
        cfg, hd, nH, nKV, rep = self.cfg, self.hd, self.nH, self.nKV, self.rep
        B, T = ids.shape
        eps = cfg["rms_norm_eps"]
        x = W["model.embed_tokens.weight"][ids]  # [B, T, d]
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            n = gd.rms_norm(x, W[p + "input_layernorm.weight"], eps)  # [B, T, d]
            wqkv = torch.cat([W[a + "q_proj.weight"], W[a + "k_proj.weight"], W[a + "v_proj.weight"]])  # [(nH+2nKV)*hd, d]
            qkv = torch.nn.functional.linear(n, wqkv)  # [B, T, (nH+2nKV)*hd]
            q, k, v = qkv.split([nH * hd, nKV * hd, nKV * hd], dim=-1)
            q = q.view(B, T, nH, hd).transpose(1, 2)  # [B, nH, T, hd]
            k = k.view(B, T, nKV, hd).transpose(1, 2)  # [B, nKV, T, hd]
            v = v.view(B, T, nKV, hd).transpose(1, 2)  # [B, nKV, T, hd]
            q = q * self.cos + gd.rotate_half(q) * self.sin
            k = k * self.cos + gd.rotate_half(k) * self.sin
            qg = q.reshape(B, nKV, rep * T, hd)  # [B, nKV, rep*T, hd]: head h = g*rep + r
            att = torch.matmul(qg, k.transpose(2, 3)) * hd**-0.5 + self.mask  # [B, nKV, rep*T, T]
            att = torch.softmax(att, dim=-1)
            o = torch.matmul(att, v).view(B, nH, T, hd).transpose(1, 2).reshape(B, T, nH * hd)  # [B, T, nH*hd]
            x = x + torch.nn.functional.linear(o, W[a + "o_proj.weight"])
            n = gd.rms_norm(x, W[p + "post_attention_layernorm.weight"], eps)
            m = p + "mlp."
            gu = torch.nn.functional.linear(n, torch.cat([W[m + "gate_proj.weight"], W[m + "up_proj.weight"]]))  # [B, T, 2I]
            g, u = gu.chunk(2, dim=-1)
            x = x + torch.nn.functional.linear(torch.nn.functional.silu(g) * u, W[m + "down_proj.weight"])
        hidden = gd.rms_norm(x, W["model.norm.weight"], eps)  # [B, T, d]
        return torch.nn.functional.linear(hidden, W["model.embed_tokens.weight"])  # [B, T, V]


def read_corpus(d, prefix):
    ids = np.fromfile(os.path.join(d, f"{prefix}_ids.bin"), dtype="<u2").astype(np.int64)
    off = np.fromfile(os.path.join(d, f"{prefix}_offsets.bin"), dtype="<u4").astype(np.int64)
    mask = np.fromfile(os.path.join(d, f"{prefix}_mask.bin"), dtype=np.uint8)
    assert off[0] == 0 and off[-1] == len(ids) == len(mask), prefix
    return ids, off, mask


def pack_rows(ids, off, order, pad_id):
    """Whole conversations, in `order`, packed greedily into rows of SEQ tokens (pad at the end).
    Returns tokens [R, SEQ] and a target-valid mask [R, SEQ] (1 where position t+1 is a real token)."""
    rows, valid = [], []
    cur = []
    for c in order:
        conv = ids[off[c] : off[c + 1]]
        assert len(conv) <= SEQ, "a conversation longer than a training row"
        if len(cur) + len(conv) > SEQ:
            rows.append(cur)
            cur = []
        cur = cur + conv.tolist()
    if cur:
        rows.append(cur)
    T = np.full((len(rows), SEQ), pad_id, dtype=np.int64)
    V = np.zeros((len(rows), SEQ), dtype=np.float32)
    for r, row in enumerate(rows):
        T[r, : len(row)] = row
        V[r, : len(row) - 1] = 1.0
    return T, V


def lr_at(step, steps, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train(cfg, corpus_dir, meta, a):
    ids, off, _ = read_corpus(corpus_dir, "train")
    n_conv = len(off) - 1
    rng = np.random.RandomState(a.seed)
    W = {k: v.clone().requires_grad_(True) for k, v in init_weights(cfg, a.seed).items()}
    decay = [v for k, v in W.items() if v.dim() == 2]
    no_decay = [v for k, v in W.items() if v.dim() != 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=a.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    fwd = TrainForward(cfg, SEQ)
    with torch.no_grad():  # the training forward computes golden_decoder.forward's function
        probe = torch.from_numpy(ids[:SEQ].reshape(1, SEQ))
        diff = (fwd(W, probe) - gd.forward(cfg, W, probe)[1]).abs().max().item()
        assert diff < 1e-4, f"training forward differs from golden_decoder.forward by {diff}"
        print(f"training forward vs golden_decoder.forward: max |diff| {diff:.2e}", flush=True)
    rows = np.zeros((0, SEQ), dtype=np.int64)
    valid = np.zeros((0, SEQ), dtype=np.float32)
    cursor = 0
    epoch = 0
    log = []
    t0 = time.time()
    ema = None
    for step in range(a.steps):
        if cursor + a.batch > len(rows):
            T_, V_ = pack_rows(ids, off, rng.permutation(n_conv), meta["pad_id"])
            rows = np.concatenate([rows[cursor:], T_])
            valid = np.concatenate([valid[cursor:], V_])
            cursor = 0
            epoch += 1
        x = torch.from_numpy(rows[cursor : cursor + a.batch])
        v = torch.from_numpy(valid[cursor : cursor + a.batch])
        cursor += a.batch
        for group in opt.param_groups:
            group["lr"] = lr_at(step, a.steps, a.lr, a.warmup)
        logits = fwd(W, x)  # [B, SEQ, V]
        lp = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, cfg["vocab_size"]), x[:, 1:].reshape(-1), reduction="none"
        )  # [B * (SEQ-1)]
        vv = v[:, :-1].reshape(-1)
        loss = (lp * vv).sum() / vv.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([W[k] for k in W], 1.0)
        opt.step()
        li = loss.item()
        ema = li if ema is None else 0.95 * ema + 0.05 * li
        if step % 25 == 0 or step == a.steps - 1:
            el = time.time() - t0
            log.append({"step": step, "loss": round(li, 5), "loss_ema": round(ema, 5), "seconds": round(el, 1)})
            print(f"step {step:5d}  loss {li:.4f}  ema {ema:.4f}  lr {lr_at(step, a.steps, a.lr, a.warmup):.2e}  {el:.0f}s", flush=True)
    seconds = time.time() - t0
    trained_tokens = int(a.steps * a.batch * SEQ)
    return {k: v.detach() for k, v in W.items()}, log, seconds, trained_tokens, epoch


@torch.no_grad()
def evaluate(cfg, W, corpus_dir, meta):
    """Teacher-forced next-token accuracy and loss on the held-out reference answers, and greedy exact
    match: greedy decoding reproduces an answer exactly iff the argmax is right at every one of its
    positions under teacher forcing (its closing <|im_end|> included), so one forward per answer decides it."""
    ids, off, mask = read_corpus(corpus_dir, "heldout")
    tasks = meta["heldout_tasks"]
    correct = total = 0
    nll = 0.0
    exact = {}
    for c in range(len(off) - 1):
        conv = torch.from_numpy(ids[off[c] : off[c + 1]])  # [T]
        m = torch.from_numpy(mask[off[c] : off[c + 1]].astype(np.int64))  # [T]
        _, logits = gd.forward(cfg, W, conv[None])  # [1, T, V]
        lg = logits[0, :-1]  # [T-1, V]: predicts tokens 1..T-1
        tgt = conv[1:]
        sel = m[1:].bool()
        hits = lg.argmax(-1)[sel] == tgt[sel]
        correct += int(hits.sum())
        total += int(sel.sum())
        nll += float(torch.nn.functional.cross_entropy(lg[sel], tgt[sel], reduction="sum"))
        ok, n = exact.get(tasks[c], (0, 0))
        exact[tasks[c]] = (ok + int(bool(hits.all())), n + 1)
    return {
        "heldout_answer_tokens": total,
        "heldout_next_token_accuracy": correct / total,
        "heldout_answer_loss": nll / total,
        "heldout_greedy_exact": sum(v[0] for v in exact.values()) / sum(v[1] for v in exact.values()),
        "heldout_greedy_exact_by_task": {k: f"{v[0]}/{v[1]}" for k, v in exact.items()},
    }


@torch.no_grad()
def greedy(cfg, W, prompt, n, eos_ids):
    """Greedy continuation by repeated full forwards (no cache), at most n tokens, stopping after an eos id."""
    seq = list(prompt)
    out = []
    for _ in range(n):
        _, lg = gd.forward(cfg, W, torch.tensor([seq]))  # [1, T, V]
        nxt = int(lg[0, -1].argmax())
        out.append(nxt)
        seq.append(nxt)
        if nxt in eos_ids:
            break
    return out


@torch.no_grad()
def write_fixtures(cfg, W, corpus_dir, meta, out):
    """Logits of two fixed inputs (the first 40 tokens of held-out conversations 0 and 30) and the
    first FIXTURE_GREEDY greedy ids for held-out prompts 0 and 30, from the stored weights."""
    ids, off, mask = read_corpus(corpus_dir, "heldout")
    rows = [0, 30]
    x = torch.stack([torch.from_numpy(ids[off[c] : off[c] + 40]) for c in rows])  # [2, 40]
    _, logits = gd.forward(cfg, W, x)  # [2, 40, V]
    golden = {"input_ids": (x, "I64"), "logits": (logits, "F32")}
    for c in rows:
        m = mask[off[c] : off[c + 1]]
        start = int(np.nonzero(m)[0][0])
        prompt = ids[off[c] : off[c] + start].tolist()
        golden[f"greedy_prompt_{c}"] = (torch.tensor(prompt, dtype=torch.int64), "I64")
        golden[f"greedy_ids_{c}"] = (torch.tensor(greedy(cfg, W, prompt, FIXTURE_GREEDY, meta["eos_ids"]), dtype=torch.int64), "I64")
    os.makedirs(out, exist_ok=True)
    gd.write_safetensors(os.path.join(out, "golden.safetensors"), golden)


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


README = """# structured-model: the embedded base model

A small Llama-shaped chat model that medusa-train builds itself (nothing downloaded), so that the
demo and the performance figures run on a base model whose greedy output is structured text.
Built by `npm run build:structured-model`:

1. `scripts/structured-corpus.ts` (corpus in `src/model/structured-corpus.ts`) writes {conversations}
   seeded chat conversations in ChatML ({tokens} tokens): stories that keep repeating the hero,
   object and place named in the prompt, animal fact sheets with numbered facts, counting
   (up, down, by twos), lists of days / months / fruits / planets, and "repeat this n times".
   Every answer is a deterministic function of the prompt. The 64 held-out prompts
   (`data/prompts/structured.jsonl`) come from another seed and are never trained on.
   The tokenizer is the project's byte-level BPE (`trainByteLevelBpe`, the tiny tokenizer's
   specials and chat template) retrained on the corpus to {vocab} tokens.
2. `scripts/build_structured_model.py` trains the model with plain PyTorch on the CPU
   ({threads} intra-op thread, deterministic algorithms, seed {seed}) using the forward pass of
   `scripts/golden_decoder.py`, and writes this folder plus `test/fixtures/structured/`.

| | |
|---|---|
| architecture | LlamaForCausalLM, hidden {hidden}, {layers} layers, {heads} heads ({kv_heads} KV heads, head dim {head_dim}), MLP {intermediate}, tied embeddings, RoPE theta 10000, RMSNorm eps 1e-6 |
| parameters | {params:,} |
| weights | model.safetensors, F16, {size_mb:.1f} MB |
| training | {steps} steps x {batch} rows x {seq} tokens ({trained_tokens:,} tokens, {epochs} packing pass(es) over the corpus), AdamW lr {lr} (warmup {warmup}, cosine to 10%), weight decay 0.01, grad clip 1 |
| final training loss | {final_loss:.4f} (mean of the last 10 logged steps' EMA: {final_ema:.4f}) |
| held-out answers, teacher-forced | next-token accuracy {acc:.4f}, loss {heldout_loss:.4f} over {answer_tokens} answer tokens |
| held-out greedy answers equal to the reference | {exact:.3f} ({exact_by_task}) |
| train time | {train_seconds:.0f} s on the 2-core build machine, shared with other jobs ({load}) |
| model.safetensors sha256 | `{sha}` |

Rebuild (same bytes on the same machine and software: the thread count and the BLAS build fix the float
reduction order; another CPU or BLAS may round differently):

    npm run build:structured-model

Use it: `medusa-train <command> --model assets/structured-model` (from a clean clone or the
installed package: `structuredModelPath()` in `src/model/embedded.ts`).
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=".scratch/structured-corpus")
    ap.add_argument("--out", default="assets/structured-model")
    ap.add_argument("--fixtures", default="test/fixtures/structured")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=576)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation (quick experiments)")
    ap.add_argument("--eval-only", action="store_true", help="only evaluate the model already in --out (experiments)")
    a = ap.parse_args()

    torch.set_num_threads(THREADS)
    torch.manual_seed(a.seed)
    torch.use_deterministic_algorithms(True)

    with open(os.path.join(a.corpus, "meta.json")) as f:
        meta = json.load(f)
    tokdir = os.path.join(a.corpus, "tokenizer")
    with open(os.path.join(tokdir, "generation_config.json")) as f:
        gen = json.load(f)
    cfg = model_config(meta["vocab_size"], meta["pad_id"], meta["eos_ids"], gen["bos_token_id"], a)
    params = sum(v.numel() for v in init_weights(cfg, a.seed).values())
    print(f"model: {params:,} parameters; corpus {meta['conversations']} conversations, {meta['tokens']} tokens", flush=True)

    if a.eval_only:
        WL = gd.read_safetensors(os.path.join(a.out, "model.safetensors"))
        print(json.dumps(evaluate(cfg, WL, a.corpus, meta)))
        return
    W, log, seconds, trained_tokens, epochs = train(cfg, a.corpus, meta, a)

    os.makedirs(a.out, exist_ok=True)
    st = os.path.join(a.out, "model.safetensors")
    gd.write_safetensors(st, {k: (v, "F16") for k, v in W.items()})
    WL = gd.read_safetensors(st)  # what the TypeScript loader sees: F16 upcast to float32
    for k in W:
        assert torch.equal(WL[k], W[k].half().float()), k
        assert torch.isfinite(WL[k]).all(), k
    gd.write_json(os.path.join(a.out, "config.json"), cfg)
    gd.write_json(os.path.join(a.out, "generation_config.json"), gen)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(os.path.join(tokdir, name), os.path.join(a.out, name))

    info = {
        "seed": a.seed,
        "threads": THREADS,
        "torch": torch.__version__,
        "parameters": params,
        "steps": a.steps,
        "batch": a.batch,
        "seq": SEQ,
        "lr": a.lr,
        "warmup": a.warmup,
        "trained_tokens": trained_tokens,
        "epochs": epochs,
        "train_seconds": round(seconds, 1),
        "corpus": {k: meta[k] for k in ("seed", "heldout_seed", "conversations", "tokens", "task_counts", "tokenizer_sha256")},
        "model_safetensors_sha256": sha256(st),
        "log": log,
    }
    if not a.no_eval:
        t1 = time.time()
        ev = evaluate(cfg, WL, a.corpus, meta)
        info.update(ev)
        info["eval_seconds"] = round(time.time() - t1, 1)
        write_fixtures(cfg, WL, a.corpus, meta, a.fixtures)
        print(json.dumps(ev), flush=True)
    load = os.getloadavg()
    info["load_average_at_end"] = [round(x, 2) for x in load]
    gd.write_json(os.path.join(a.out, "build-info.json"), info)
    if not a.no_eval:
        tail = log[-10:]
        with open(os.path.join(a.out, "README.md"), "w") as f:
            f.write(
                README.format(
                    conversations=meta["conversations"],
                    tokens=meta["tokens"],
                    vocab=meta["vocab_size"],
                    threads=THREADS,
                    seed=a.seed,
                    hidden=a.hidden,
                    layers=a.layers,
                    heads=a.heads,
                    kv_heads=a.kv_heads,
                    head_dim=a.hidden // a.heads,
                    intermediate=a.intermediate,
                    params=params,
                    size_mb=os.path.getsize(st) / 1e6,
                    steps=a.steps,
                    batch=a.batch,
                    seq=SEQ,
                    trained_tokens=trained_tokens,
                    epochs=epochs,
                    lr=a.lr,
                    warmup=a.warmup,
                    final_loss=log[-1]["loss"],
                    final_ema=sum(r["loss_ema"] for r in tail) / len(tail),
                    acc=info["heldout_next_token_accuracy"],
                    heldout_loss=info["heldout_answer_loss"],
                    answer_tokens=info["heldout_answer_tokens"],
                    exact=info["heldout_greedy_exact"],
                    exact_by_task=", ".join(f"{k} {v}" for k, v in info["heldout_greedy_exact_by_task"].items()),
                    train_seconds=seconds,
                    load=f"load average {load[0]:.2f} at the end",
                    sha=info["model_safetensors_sha256"],
                )
            )
    print(f"wrote {a.out} (model.safetensors sha256 {info['model_safetensors_sha256']}) in {seconds:.0f} s of training")


if __name__ == "__main__":
    main()
