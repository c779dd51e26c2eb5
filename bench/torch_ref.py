#!/usr/bin/env python3
"""PyTorch reference timings for the engine benchmark (bench/engines.ts runs this in the same invocation).

Run it as the benchmark does, with PyTorch at its best on this CPU:
  OPENBLAS_CORETYPE=SkylakeX MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_TOP_PAD_=536870912 \
    /usr/bin/python3 bench/torch_ref.py --threads 2
Prints one JSON object: best-of-N seconds for
  heads_step_big:  3 Medusa heads (1 residual SiLU block + own lm_head), d=512, V=32000, 2048 positions:
                   forward, cross-entropy, backward, AdamW step (float32)
  heads_step_tiny: the same with d=64, V=512
  prefill_512:     a ~50M-parameter Llama-shaped decoder (hidden 640, 8 layers, 10 heads, 5 kv heads, ffn 1792,
                   vocab 16384), 512-token prefill at batch 1, last-position logits
  decode_128:      128 cached decoding steps at batch 1 after a 32-token prompt
"""
import argparse, json, math, time
import torch
import torch.nn.functional as F


def best(fn, reps):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def heads_step(d, V, K, N, reps):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, d, generator=g)
    labels = [torch.randint(0, V, (N,), generator=g) for _ in range(K)]
    params = []
    for _ in range(K):
        w1 = torch.zeros(d, d, requires_grad=True)
        b1 = (torch.rand(d, generator=g) * 2 - 1).div(math.sqrt(d)).requires_grad_()
        w2 = (torch.randn(V, d, generator=g) * 0.02).requires_grad_()
        params += [w1, b1, w2]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        for k in range(K):
            w1, b1, w2 = params[3 * k: 3 * k + 3]
            h = hidden + F.silu(F.linear(hidden, w1, b1))
            loss = loss + (0.8 ** k) * F.cross_entropy(F.linear(h, w2), labels[k])
        loss.backward()
        opt.step()
    return best(step, reps)


class Llama(torch.nn.Module):
    def __init__(self, V=16384, d=640, L=8, H=10, KV=5, ff=1792):
        super().__init__()
        self.d, self.H, self.KV, self.hd = d, H, KV, d // H
        g = torch.Generator().manual_seed(1)
        r = lambda *s: torch.randn(*s, generator=g) * 0.02
        self.emb = r(V, d)
        self.layers = [dict(wq=r(d, d), wk=r(d, KV * self.hd), wv=r(d, KV * self.hd), wo=r(d, d), wg=r(d, ff), wu=r(d, ff), wd=r(ff, d),
                            n1=torch.ones(d), n2=torch.ones(d)) for _ in range(L)]
        self.norm = torch.ones(d)
        self.lm = r(d, V)
        inv = 1.0 / (10000 ** (torch.arange(0, self.hd, 2).float() / self.hd))
        self.inv = inv

    def rms(self, x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    def rope(self, x, pos):
        f = pos[:, None].float() * self.inv[None, :]
        cos, sin = torch.cat([f.cos(), f.cos()], -1), torch.cat([f.sin(), f.sin()], -1)
        x1, x2 = x[..., : self.hd // 2], x[..., self.hd // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    @torch.no_grad()
    def forward(self, ids, cache):
        T = ids.shape[0]
        S = cache[0][0].shape[1] if cache[0] is not None else 0
        pos = torch.arange(S, S + T)
        x = self.emb[ids]
        for i, l in enumerate(self.layers):
            h = self.rms(x, l['n1'])
            q = (h @ l['wq']).view(T, self.H, self.hd).transpose(0, 1)
            k = (h @ l['wk']).view(T, self.KV, self.hd).transpose(0, 1)
            v = (h @ l['wv']).view(T, self.KV, self.hd).transpose(0, 1)
            q, k = self.rope(q, pos), self.rope(k, pos)
            if cache[i] is not None:
                k = torch.cat([cache[i][0], k], 1)
                v = torch.cat([cache[i][1], v], 1)
            cache[i] = (k, v)
            rep = self.H // self.KV
            k2, v2 = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
            scores = (q @ k2.transpose(1, 2)) / math.sqrt(self.hd)  # [H, T, S+T]
            if T > 1:
                scores = scores + torch.triu(torch.full((T, S + T), float('-inf')), diagonal=S + 1)
            att = scores.softmax(-1) @ v2  # [H, T, hd]
            x = x + att.transpose(0, 1).reshape(T, self.d) @ l['wo']
            h = self.rms(x, l['n2'])
            x = x + (F.silu(h @ l['wg']) * (h @ l['wu'])) @ l['wd']
        return self.rms(x[-1:], self.norm) @ self.lm


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--reps', type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = {'torch': torch.__version__, 'threads': a.threads}
    out['heads_step_big'] = heads_step(512, 32000, 3, 2048, a.reps)
    out['heads_step_tiny'] = heads_step(64, 512, 3, 2048, a.reps)
    m = Llama()
    ids = torch.randint(0, 16384, (512,), generator=torch.Generator().manual_seed(2))
    out['prefill_512'] = best(lambda: m.forward(ids, [None] * 8), a.reps)

    def decode():
        cache = [None] * 8
        logits = m.forward(ids[:32], cache)
        for _ in range(128):
            nxt = logits.argmax(-1)
            logits = m.forward(nxt, cache)
    out['decode_128'] = best(decode, a.reps)
    print(json.dumps(out))


if __name__ == '__main__':
    main()
