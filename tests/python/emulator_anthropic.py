#!/usr/bin/env python3
"""Drive the emulator's Anthropic profile with the official `anthropic` Python
SDK and check that every answer parses into the SDK's own types.

Run by tests/emulator_sdk.rs with ANTHROPIC_BASE_URL=http://ADDR,
ANTHROPIC_API_KEY and EMULATOR_URL=http://ADDR (the script moves the
emulator's clock through POST /_emulator/clock instead of waiting).

Exit status: 0 when every check passed, 1 on a failed check, 3 when the
`anthropic` package is missing.
"""

import json
import os
import sys
import urllib.request

try:
    import anthropic
    from anthropic.types import Message
    from anthropic.types.messages import MessageBatch, DeletedMessageBatch
except ImportError as e:  # pragma: no cover - the message is the point
    print(f"cannot import the anthropic SDK ({e}): run `pip install anthropic`", file=sys.stderr)
    sys.exit(3)

EMULATOR = os.environ["EMULATOR_URL"]
MODEL = "claude-haiku-4-5"
client = anthropic.Anthropic(max_retries=0)


def log(*args):
    print(*args, flush=True)


def check(condition, message):
    if not condition:
        raise AssertionError(message)


def advance(seconds):
    request = urllib.request.Request(
        EMULATOR + "/_emulator/clock",
        data=json.dumps({"advance_seconds": seconds}).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()


def user(text):
    return [{"role": "user", "content": text}]


def request(custom_id, text):
    return {"custom_id": custom_id, "params": {"model": MODEL, "max_tokens": 64, "messages": user(text)}}


def real_time():
    m = client.messages.create(model=MODEL, max_tokens=64, messages=user("hello there"))
    check(isinstance(m, Message), f"messages.create gave {type(m)}")
    check(m.content[0].text == "echo: hello there", f"text {m.content[0].text!r}")
    check(m.stop_reason == "end_turn" and m.usage.output_tokens == 3, f"{m}")
    with client.messages.stream(model=MODEL, max_tokens=64, messages=user("a b c")) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    check(text == "echo: a b c", f"streamed text {text!r}")
    check(final.content[0].text == "echo: a b c" and final.usage.output_tokens == 4, f"{final}")
    count = client.messages.count_tokens(model=MODEL, messages=user("one two three"))
    check(count.input_tokens == 3, f"count_tokens {count}")
    models = client.models.list()
    check(any(m.id == MODEL for m in models.data), f"models {models}")
    log("real time: ok")


def errors():
    try:
        client.messages.create(model="claude-nope", max_tokens=8, messages=user("x"))
        check(False, "an unknown model was accepted")
    except anthropic.NotFoundError as e:
        check(e.body["error"]["type"] == "not_found_error", f"{e.body}")
    try:
        client.messages.create(model=MODEL, messages=user("x"), max_tokens=0)
        check(False, "max_tokens 0 was accepted")
    except anthropic.BadRequestError as e:
        check(e.body["type"] == "error", f"{e.body}")
    bad = anthropic.Anthropic(base_url=client.base_url, api_key="wrong", max_retries=0)
    try:
        bad.messages.create(model=MODEL, max_tokens=8, messages=user("x"))
        check(False, "a wrong key was accepted")
    except anthropic.AuthenticationError as e:
        check(e.body["error"]["type"] == "authentication_error", f"{e.body}")
    try:
        client.messages.create(model=MODEL, max_tokens=8, messages=user("[emulator:status=529]"))
        check(False, "the injected 529 did not fail")
    except anthropic.APIStatusError as e:
        check(e.status_code == 529 and e.body["error"]["type"] == "overloaded_error", f"{e.body}")
    for requests in (
        [request("same", "a"), request("same", "b")],
        [request("bad.id", "a")],
        [{"custom_id": "s", "params": {**request("s", "a")["params"], "stream": True}}],
    ):
        try:
            client.messages.batches.create(requests=requests)
            check(False, f"a bad batch was accepted: {requests}")
        except anthropic.BadRequestError as e:
            check(e.body["error"]["type"] == "invalid_request_error", f"{e.body}")
    log("errors: ok")


def batches():
    b = client.messages.batches.create(
        requests=[request("r-1", "first"), request("r-2", "second [emulator:status=429]"), request("r-3", "third")]
    )
    check(isinstance(b, MessageBatch), f"batches.create gave {type(b)}")
    check(b.id.startswith("msgbatch_") and b.processing_status == "in_progress", f"{b}")
    check(b.request_counts.processing == 3 and b.results_url is None, f"{b.request_counts}")
    advance(10)  # validating (5 s) and one request (5 s)
    b = client.messages.batches.retrieve(b.id)
    check(b.processing_status == "in_progress", f"{b.processing_status}")
    check(b.request_counts.succeeded == 1 and b.request_counts.processing == 2, f"{b.request_counts}")
    advance(20)
    b = client.messages.batches.retrieve(b.id)
    check(b.processing_status == "ended" and b.ended_at is not None, f"{b}")
    check(b.request_counts.succeeded == 2 and b.request_counts.errored == 1, f"{b.request_counts}")
    results = {r.custom_id: r.result for r in client.messages.batches.results(b.id)}
    check(set(results) == {"r-1", "r-2", "r-3"}, f"results {results}")
    check(results["r-1"].type == "succeeded" and results["r-1"].message.content[0].text == "echo: first", f"{results['r-1']}")
    check(results["r-2"].type == "errored" and results["r-2"].error.error.type == "rate_limit_error", f"{results['r-2']}")

    c = client.messages.batches.create(requests=[request("c-1", "one"), request("c-2", "two")])
    c = client.messages.batches.cancel(c.id)
    check(c.processing_status == "canceling" and c.cancel_initiated_at is not None, f"{c}")
    try:
        client.messages.batches.delete(c.id)
        check(False, "an unfinished batch was deleted")
    except anthropic.BadRequestError:
        pass
    advance(10)
    c = client.messages.batches.retrieve(c.id)
    check(c.processing_status == "ended", f"{c.processing_status}")
    check(c.request_counts.canceled == 2, f"{c.request_counts}")
    kinds = sorted(r.result.type for r in client.messages.batches.results(c.id))
    check(kinds == ["canceled", "canceled"], f"canceled results {kinds}")

    page = client.messages.batches.list(limit=1)
    check([x.id for x in page.data] == [c.id] and page.has_more, f"first page {page}")
    ids = [x.id for x in client.messages.batches.list(limit=1)]  # auto-pagination
    check(ids == [c.id, b.id], f"all batches newest first: {ids}")
    older = client.messages.batches.list(after_id=c.id)
    check([x.id for x in older.data] == [b.id] and not older.has_more, f"after_id {older}")
    newer = client.messages.batches.list(before_id=b.id)
    check([x.id for x in newer.data] == [c.id], f"before_id {newer}")

    d = client.messages.batches.delete(c.id)
    check(isinstance(d, DeletedMessageBatch) and d.id == c.id and d.type == "message_batch_deleted", f"{d}")
    try:
        client.messages.batches.retrieve(c.id)
        check(False, "a deleted batch was found")
    except anthropic.NotFoundError:
        pass
    log("batches: ok")


real_time()
errors()
batches()
print("all checks passed")
