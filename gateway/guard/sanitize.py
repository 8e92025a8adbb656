"""Neutralise chat-template control tokens in text bound for the guard.

vLLM renders the guard's chat template and then tokenises the whole prompt with special
tokens enabled, so a user who writes `<|im_end|><|im_start|>assistant ...` could close the
guard's user turn and write the guard's answer for it. We rewrite such tokens into look-alikes
that no tokenizer maps to a control token, keeping the text readable for the guard.
"""

from __future__ import annotations

import re

# Part of the guard's identity (so of every cache key): bump it when the rewriting below changes,
# since the same user text then reaches the guard differently.
SANITIZER_VERSION = 2

# Angle-bracket control tokens of the common chat templates:
#   <|im_start|> <|im_end|> <|endoftext|>                     Qwen / ChatML
#   <|begin_of_text|> <|start_header_id|> <|eot_id|> ...      Llama 3
#   <｜begin▁of▁sentence｜> <｜Assistant｜>                        DeepSeek (full-width bars)
#   <s> </s> <unk> <pad> <bos> <eos>                          Llama 2 / Mistral / Gemma
#   <think> </think> <tool_call> </tool_call> ...             Qwen3 added tokens
#   <start_of_turn> <end_of_turn>                             Gemma
#   <<SYS>> <</SYS>>                                          Llama 2 system block
_ANGLE_TOKEN = re.compile(
    r"<\|[^<>|\n]{0,64}\|>"
    r"|<｜[^<>｜\n]{0,64}｜>"
    r"|</?(?:s|unk|pad|bos|eos|mask|think|tool_call|tool_response|tools|start_of_turn|end_of_turn)>"
    r"|<</?SYS>>"
    # The guards' own framing (BingoGuard): a forged end of the conversation it is asked about.
    r"|<(?:BEGIN|END) (?:CONVERSATION|UNSAFE CONTENT CATEGORIES)>",
    re.IGNORECASE,
)
# Square-bracket instruction markers of Llama 2 / Mistral: [INST] [/INST] [SYSTEM_PROMPT] ..., and the speaker
# labels of the guards' own templates ([User]: … [Assistant]: … [Agent]: … [Response]: …), so that a user
# cannot forge a turn inside the text the guard classifies.
_SQUARE_TOKEN = re.compile(r"\[/?(?:INST|SYSTEM_PROMPT|AVAILABLE_TOOLS|TOOL_CALLS|TOOL_RESULTS"
                           r"|User|Assistant|Agent|Response)\]", re.IGNORECASE)

_ANGLE_SWAP = str.maketrans({"<": "‹", ">": "›"})
_SQUARE_SWAP = str.maketrans({"[": "⁅", "]": "⁆"})


def neutralise_special_tokens(text: str) -> str:
    """`<|im_end|>` becomes `‹|im_end|›`, `[INST]` becomes `⁅INST⁆`; other text is unchanged."""
    if "<" in text:
        text = _ANGLE_TOKEN.sub(lambda m: m.group(0).translate(_ANGLE_SWAP), text)
    if "[" in text:
        text = _SQUARE_TOKEN.sub(lambda m: m.group(0).translate(_SQUARE_SWAP), text)
    return text
