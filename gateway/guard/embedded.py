"""`embedded`: a CPU guard that needs no server and no download at run time.

A small multilingual classifier: the first layers of multilingual-e5-small (XLM-R vocabulary, about 100
languages), fine-tuned to score harm per token, exported to ONNX with int8 weights, run on onnxruntime.
A text is read in overlapping chunks; each token gets a harm logit; the riskiest run of WINDOW tokens
decides, so benign text around a harmful sentence cannot dilute it. An answer is read after its question.
Trained by scripts/train_embedded_guard.py; evaluation in docs/embedded_guard.md. Run-time dependencies:
numpy, onnxruntime, tokenizers. No torch, no network.

The one risk scale: risk = round(100 * P(harmful)), P calibrated on a validation split for a 50/50
prior, so the policy thresholds 20/40/60 are probabilities 0.2/0.4/0.6. Categories: SAFE below
CATEGORY_FLOOR, else the most likely harm category of the deciding window plus any other at least half
as likely (see `verdict_from_probs`).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gateway import metrics
from gateway.guard.base import HARM_CATEGORIES, SAFE, GuardError, GuardInput, Verdict

HERE = Path(__file__).resolve().parent
# The shipped files and the sha256 of their bytes, checked at load: a damaged or replaced file refuses
# to start instead of scoring wrongly. Written by scripts/train_embedded_guard.py.
MODEL_FILES = {
    "encoder": ("embedded_encoder.onnx", "2cce918264a808331935605dc68fa67b6086548b9f754ced3477ef91655eb30d"),
    "vocab": ("embedded_vocab.npz", "38c997f4a5a78855a987c8cbf840ba4ef1bfd5df68563e4f0f51276f7cd14f29"),
    "tokenizer": ("embedded_tokenizer.json.gz", "46fd7470e51a69a6ee9f2a9273f2bd6e710d510ae08f7b81f89130163a50f6dd"),
    "head": ("embedded_head.npz", "5554cd8a21d3dc75e62e63fa555e3385d56cc2f9fbf0532b2a7e3d512e3ea9d7"),
}
ENCODER_ID = "multilingual-e5-small-l4-ft"

CHUNK_TOKENS = 128  # one encoder input, special tokens included
CHUNK_OVERLAP = 16  # a phrase cut by a chunk edge is whole in the next chunk
QUESTION_TOKENS = 48  # of the question read before each answer chunk (its first and last halves)
WINDOW = 16  # tokens whose mean logit is one window's score; the riskiest window decides
WINDOW_STRIDE = 8
BATCH_TOKENS = 2048  # padded tokens per onnxruntime run: bounds memory and the time one job holds the thread
# Work per text is bounded: a text longer than this is read on MAX_CHUNKS chunks spread evenly over it
# (first and last included); `score_with_coverage` says so, and the cascade sends such texts on.
MAX_CHUNKS = 64
FULL_COVER_CHARS = 20_000  # at most this many characters are always read whole
SPAN_CHARS = 600  # characters read around each spread chunk of a longer text

BOS, PAD, EOS, UNK = 0, 1, 2, 3

# Categories are named from this risk up, so per-category thresholds down to 10 mean something;
# below it the verdict is SAFE (a per-category threshold under 10 therefore acts as 10).
CATEGORY_FLOOR = 10
# A second category is named when it is at least this fraction as likely as the first.
SECOND_CATEGORY_RATIO = 0.5
NOTHING_TO_SCORE = Verdict(risk=0, categories=(SAFE,))


def verdict_from_probs(p_harm: float, category_probs: Sequence[float]) -> Verdict:
    """Map P(harmful) and P(category | harmful) (in HARM_CATEGORIES order) to a Verdict."""
    risk = int(round(100.0 * min(max(float(p_harm), 0.0), 1.0)))
    if risk < CATEGORY_FLOOR:
        return Verdict(risk=risk, categories=(SAFE,))
    probs = np.asarray(category_probs, dtype=np.float64)
    top = float(probs.max())
    named = tuple(c for c, p in zip(HARM_CATEGORIES, probs) if p >= SECOND_CATEGORY_RATIO * top)
    return Verdict(risk=risk, categories=named)


@dataclass(frozen=True, slots=True)
class Chunk:
    """One encoder input: token ids, and the [start, end) positions whose windows are scored."""

    owner: int  # index of the text it belongs to
    ids: tuple[int, ...]
    start: int
    end: int


def _question_part(question: Sequence[int]) -> list[int]:
    if len(question) <= QUESTION_TOKENS:
        return list(question)
    half = QUESTION_TOKENS // 2
    return list(question[:half]) + list(question[-half:])


def plan_chunks(owner: int, text_ids: Sequence[int], question_ids: Sequence[int] | None = None) -> list[Chunk]:
    """Cut one text into overlapping chunks. A prompt chunk is `<s> text </s>`; an answer chunk is
    `<s> question </s></s> answer </s>`, and only the answer's tokens are scored."""
    prefix = [BOS] if question_ids is None else [BOS, *_question_part(question_ids), EOS, EOS]
    room = CHUNK_TOKENS - len(prefix) - 1
    out = []
    pos = 0
    while True:
        piece = list(text_ids[pos:pos + room])
        out.append(Chunk(owner, tuple(prefix + piece + [EOS]), len(prefix), len(prefix) + len(piece)))
        if pos + room >= len(text_ids):
            return out
        pos += room - CHUNK_OVERLAP


def window_scores(z: np.ndarray, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean logit of each window of z[start:end] and each window's first position (a span shorter
    than WINDOW is one window)."""
    span = z[start:end]
    n = len(span)
    if n <= WINDOW:
        return np.array([span.mean()]), np.array([start])
    firsts = np.arange(0, n - WINDOW + 1, WINDOW_STRIDE)
    if firsts[-1] != n - WINDOW:
        firsts = np.append(firsts, n - WINDOW)
    csum = np.concatenate([[0.0], np.cumsum(span, dtype=np.float64)])
    return (csum[firsts + WINDOW] - csum[firsts]) / WINDOW, firsts + start


def spread_spans(length: int) -> list[tuple[int, int]]:
    """Character spans of a text read on MAX_CHUNKS chunks: evenly spread, first and last included."""
    starts = np.linspace(0, max(length - SPAN_CHARS, 0), MAX_CHUNKS).round().astype(int)
    return [(int(s), int(s) + SPAN_CHARS) for s in starts]


def dequantize_rows(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Q4_0 rows (as multilingual-e5-small's 4-bit file stores them): (n, nb, 16) nibble bytes and
    (n, nb) scales to (n, nb * 32) float32; byte j holds weight j (low nibble) and j + 16 (high)."""
    lo = (blocks & 0x0F).astype(np.int8) - 8
    hi = (blocks >> 4).astype(np.int8) - 8
    q = np.concatenate([lo, hi], axis=-1).astype(np.float32)
    return (q * scales[..., None].astype(np.float32)).reshape(len(blocks), -1)


def _read_checked(name: str, expected: str, folder: Path) -> bytes:
    path = folder / name
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RuntimeError(f"embedded guard: cannot read {path} ({e.strerror}); reinstall GuardGate") from None
    got = hashlib.sha256(data).hexdigest()
    if got != expected:
        raise RuntimeError(f"embedded guard: {path} has sha256 {got}, expected {expected}: the file is damaged "
                           "or was replaced; reinstall GuardGate or retrain (scripts/train_embedded_guard.py)")
    return data


class Model:
    """The shipped files, loaded and checked: tokenizer, word vectors, encoder and calibration."""

    def __init__(self, *, threads: int = 1, folder: Path = HERE) -> None:
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ImportError as e:  # say exactly what to install
            raise RuntimeError(f"embedded guard needs onnxruntime and tokenizers ({e.name} is missing)") from None
        raw = {key: _read_checked(name, sha, folder) for key, (name, sha) in MODEL_FILES.items()}
        self.sha256 = hashlib.sha256(b"".join(hashlib.sha256(raw[k]).digest() for k in sorted(raw))).hexdigest()
        self.tokenizer = Tokenizer.from_str(gzip.decompress(raw["tokenizer"]).decode("utf-8"))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        with np.load(io.BytesIO(raw["vocab"]), allow_pickle=False) as z:
            self.index = z["index"]  # tokenizer id -> row (ids not kept share the <unk> row)
            self.blocks = z["blocks"]  # (rows, nb, 16) uint8
            self.scales = z["scales"]  # (rows, nb) float16
        with np.load(io.BytesIO(raw["head"]), allow_pickle=False) as z:
            if tuple(str(c) for c in z["categories"]) != HARM_CATEGORIES:
                raise RuntimeError(f"embedded head: categories {list(z['categories'])} are not {list(HARM_CATEGORIES)}")
            self.version = str(z["version"])
            self.platt = {"prompt": (float(z["prompt_a"]), float(z["prompt_c"])),
                          "response": (float(z["response_a"]), float(z["response_c"]))}
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # Idle worker threads must not spin: the gateway's event loop shares these cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(raw["encoder"], sess_options=options, providers=["CPUExecutionProvider"])

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        rows = self.index[ids.reshape(-1)]
        return dequantize_rows(self.blocks[rows], self.scales[rows]).reshape(*ids.shape, -1)

    def run(self, chunks: Sequence[Chunk]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per chunk: prompt-head logits, answer-head logits (T,) and category logits (T, 7)."""
        width = max(len(c.ids) for c in chunks)
        ids = np.full((len(chunks), width), PAD, dtype=np.int64)
        mask = np.zeros((len(chunks), width), dtype=np.float32)
        for row, c in enumerate(chunks):
            ids[row, : len(c.ids)] = c.ids
            mask[row, : len(c.ids)] = 1.0
        zp, zr, zc = self.session.run(None, {"emb": self.vectors(ids), "mask": mask})
        return [(zp[i], zr[i], zc[i]) for i in range(len(chunks))]


@dataclass
class _Text:
    stage: str
    chunks: list[Chunk]
    best: float = -np.inf
    best_cat: np.ndarray | None = None


def prepare(model: Model, inputs: Sequence[GuardInput]) -> tuple[list[_Text | None], list[bool]]:
    """Tokenize and cut every input into chunks; empty texts need no model. Also says, per input,
    whether the whole text is read."""
    texts: list[_Text | None] = []
    covered = []
    for i, inp in enumerate(inputs):
        text = inp.user if inp.stage == "prompt" else (inp.assistant or "")
        if not text.strip():
            texts.append(None)
            covered.append(True)
            continue
        question = model.token_ids([inp.user[:FULL_COVER_CHARS]])[0] if inp.stage == "response" else None
        if len(text) <= FULL_COVER_CHARS:
            chunks = plan_chunks(i, model.token_ids([text])[0], question)
            covered.append(len(chunks) <= MAX_CHUNKS)
        else:
            covered.append(False)
            spans = model.token_ids([text[a:b] for a, b in spread_spans(len(text))])
            chunks = [c for ids in spans for c in plan_chunks(i, ids, question)[:1]]
        texts.append(_Text(inp.stage, thin(chunks, MAX_CHUNKS)))
    return texts, covered


def thin(chunks: list[Chunk], limit: int) -> list[Chunk]:
    """At most `limit` chunks, spread evenly over the text, first and last included."""
    if len(chunks) <= limit:
        return chunks
    keep = np.linspace(0, len(chunks) - 1, limit).round().astype(int)
    return [chunks[k] for k in sorted(set(keep.tolist()))]


def batches(chunks: Sequence[Chunk]) -> list[list[Chunk]]:
    """Chunks grouped by text, then by length, at most BATCH_TOKENS padded tokens a group. Never two texts in
    one group: the int8 model quantizes its activations per batch, so a text's score must not depend on
    what else was scored with it (a verdict is cached as a function of the text alone)."""
    out: list[list[Chunk]] = []
    for c in sorted(chunks, key=lambda c: (c.owner, len(c.ids), c.start, c.ids)):
        if out and out[-1][0].owner == c.owner and (len(out[-1]) + 1) * len(c.ids) <= BATCH_TOKENS:
            out[-1].append(c)
        else:
            out.append([c])
    return out


def absorb(texts: Sequence[_Text | None], chunks: Sequence[Chunk], outputs: Sequence[tuple]) -> None:
    """Fold one batch's logits into each text's riskiest window so far."""
    for c, (zp, zr, zc) in zip(chunks, outputs):
        t = texts[c.owner]
        assert t is not None
        scores, firsts = window_scores(zp if t.stage == "prompt" else zr, c.start, c.end)
        k = int(np.argmax(scores))
        if scores[k] > t.best:
            t.best = float(scores[k])
            t.best_cat = zc[firsts[k]:min(firsts[k] + WINDOW, c.end)].mean(axis=0)


def verdicts(model: Model, texts: Sequence[_Text | None]) -> list[Verdict]:
    out = []
    for t in texts:
        if t is None:
            out.append(NOTHING_TO_SCORE)
            continue
        a, c = model.platt[t.stage]
        p = 1.0 / (1.0 + np.exp(-(a * t.best + c)))
        z = np.asarray(t.best_cat, dtype=np.float64)
        e = np.exp(z - z.max())
        out.append(verdict_from_probs(p, e / e.sum()))
    return out


def read(model: Model, inputs: Sequence[GuardInput]) -> list[_Text | None]:
    """Every input's riskiest window, in one go on this thread (the training script and tests use it)."""
    texts, _ = prepare(model, inputs)
    for group in batches([c for t in texts if t for c in t.chunks]):
        absorb(texts, group, model.run(group))
    return texts


def score_sync(model: Model, inputs: Sequence[GuardInput]) -> list[Verdict]:
    return verdicts(model, read(model, inputs))


class EmbeddedGuard:
    """Scores texts on this machine's CPU. Loads the model at construction (under a second); inference
    runs on one worker thread so the event loop never waits on it, one batch of at most BATCH_TOKENS
    per job, so a long text never holds the thread while other requests wait for more than one batch.
    """

    def __init__(self, *, threads: int | None = None, timeout_s: float = 30.0,
                 folder: Path | str | None = None) -> None:
        threads = threads if threads is not None else min(2, os.cpu_count() or 1)
        self.model = Model(threads=threads, folder=Path(folder) if folder else HERE)
        self.timeout_s = timeout_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedded-guard")
        self._identity = f"embedded|{ENCODER_ID}|v{self.model.version}:{self.model.sha256[:12]}"

    @property
    def identity(self) -> str:
        return self._identity

    def score_sync(self, inputs: Sequence[GuardInput]) -> list[Verdict]:
        return score_sync(self.model, inputs)

    def _start(self, inputs: Sequence[GuardInput]) -> tuple[list[_Text | None], list[bool], list[list[Chunk]]]:
        """The first job: cut the texts and run the first batch (all there is, for most calls)."""
        texts, covered = prepare(self.model, inputs)
        groups = batches([c for t in texts if t for c in t.chunks])
        if groups:
            absorb(texts, groups[0], self.model.run(groups[0]))
        return texts, covered, groups[1:]

    async def _score(self, inputs: Sequence[GuardInput]) -> tuple[list[Verdict], list[bool]]:
        loop = asyncio.get_running_loop()
        texts, covered, rest = await loop.run_in_executor(self._executor, self._start, inputs)
        for group in rest:
            # One job per batch: other requests' jobs queue between them (the executor is FIFO).
            outputs = await loop.run_in_executor(self._executor, self.model.run, group)
            absorb(texts, group, outputs)
        return verdicts(self.model, texts), covered

    async def score(self, inputs: Sequence[GuardInput]) -> list[Verdict]:
        return (await self.score_with_coverage(inputs))[0]

    async def score_with_coverage(self, inputs: Sequence[GuardInput]) -> tuple[list[Verdict], list[bool]]:
        """Verdicts, and per input whether all of its text was read (a text over FULL_COVER_CHARS, or
        over MAX_CHUNKS chunks, is read on chunks spread over it: the cascade sends it on)."""
        if not inputs:
            return [], []
        started, result = time.perf_counter(), "ok"
        try:
            return await asyncio.wait_for(self._score(list(inputs)), self.timeout_s)
        except TimeoutError:
            result = "timeout"
            raise GuardError("timeout", f"embedded guard took over {self.timeout_s:g}s") from None
        except Exception as e:  # a model failure is a guard error, never SAFE
            result = "unparsable"
            raise GuardError("unparsable", f"embedded guard failed ({type(e).__name__})") from None
        finally:
            metrics.observe_guard_call("embedded", "in-process", time.perf_counter() - started, result)

    async def ready(self) -> tuple[bool, str]:
        return True, f"embedded model loaded ({ENCODER_ID}, v{self.model.version})"

    async def aclose(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
