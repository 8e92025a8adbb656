"""SSE reading and the rewrite that withholds blocked choices."""

from __future__ import annotations

import orjson
import pytest

from gateway.streaming import ChoiceTexts, SSEParser, StreamProtocolError, withhold_choices


def chunk(choices, **extra) -> bytes:
    return b"data: " + orjson.dumps({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                                     "choices": choices, **extra}) + b"\n\n"


def delta(i, **d):
    return {"index": i, "delta": d, "logprobs": None, "finish_reason": None}


STREAM = (chunk([delta(0, role="assistant", content="")]) + chunk([delta(1, role="assistant", content="")])
          + b": keep-alive\n\n"
          + chunk([delta(0, content="Hello "), delta(1, content="bad ")])
          + chunk([delta(0, content="world"), delta(1, content="words")])
          + chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"},
                   {"index": 1, "delta": {}, "logprobs": None, "finish_reason": "stop"}])
          + chunk([], usage={"total_tokens": 3})
          + b"data: [DONE]\n\n")


def parse_all(data: bytes, step: int):
    parser, events = SSEParser(), []
    for i in range(0, len(data), step):
        events += parser.feed(data[i:i + step])
    return events + parser.close()


@pytest.mark.parametrize("step", [1, 7, 64, 100000])
def test_events_survive_any_chunking(step):
    events = parse_all(STREAM, step)
    assert b"".join(e.raw for e in events) == STREAM
    texts = ChoiceTexts()
    for e in events:
        texts.add(e)
    assert texts.texts() == {0: "Hello world", 1: "bad words"}
    assert events[-1].is_done and events[2].data is None  # the comment is kept as a comment


def test_crlf_and_final_event_without_blank_line():
    events = parse_all(b'data: {"choices": []}\r\n\r\ndata: [DONE]', 5)
    assert [e.is_done for e in events] == [False, True]


def test_non_json_data_is_a_protocol_error():
    with pytest.raises(StreamProtocolError):
        SSEParser().feed(b"data: not json\n\n")


def test_tool_call_arguments_and_refusals_are_collected():
    texts = ChoiceTexts()
    for e in parse_all(
            chunk([delta(0, tool_calls=[{"index": 0, "id": "a", "function": {"name": "run", "arguments": '{"x'}}])])
            + chunk([delta(0, tool_calls=[{"index": 0, "function": {"arguments": '": 1}'}}])])
            + chunk([delta(0, refusal="I won't")]), 1000):
        texts.add(e)
    assert texts.texts() == {0: 'I won\'t\nrun({"x": 1})'}


def test_withholding_keeps_other_choices_byte_for_byte():
    events = parse_all(STREAM, 1000)
    out = b"".join(withhold_choices(events, {1}))
    assert b"bad" not in out and b"words" not in out
    # Chunks that also carried choice 1 come out as the same chunk without it.
    assert chunk([delta(0, content="Hello ")]) in out and chunk([delta(0, content="world")]) in out
    assert chunk([delta(0, role="assistant", content="")]) in out  # untouched: byte for byte
    assert b": keep-alive\n\n" in out and chunk([], usage={"total_tokens": 3}) in out
    finishes = [c for line in out.split(b"\n\n") if line.startswith(b"data: {")
                for c in orjson.loads(line[6:])["choices"] if c["finish_reason"]]
    assert finishes == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"},
                        {"index": 1, "delta": {}, "logprobs": None, "finish_reason": "content_filter"}]
    assert out.endswith(b"data: [DONE]\n\n")


def test_a_blocked_choice_that_never_finished_still_ends_with_content_filter():
    events = parse_all(chunk([delta(0, role="assistant", content="")]) + chunk([delta(0, content="bad")]), 1000)
    out = b"".join(withhold_choices(events, {0}))
    lines = [l for l in out.split(b"\n\n") if l]
    assert orjson.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "content_filter"
    assert lines[-1] == b"data: [DONE]" and b"bad" not in out


def test_an_approved_window_is_released_up_to_its_last_sentence_end():
    from gateway.streaming import release_point

    text = "Plants need light. Now mix the blea"
    assert text[:release_point(text, len(text))] == "Plants need light."
    assert release_point("One line\nNow mix", 16) == len("One line\n")
    assert release_point("这是第一句。然后", 8) == len("这是第一句。")
    assert release_point("no sentence end here but spaces", 31) == len("no sentence end here but ")
    assert release_point("unbroken", 8) == 8
