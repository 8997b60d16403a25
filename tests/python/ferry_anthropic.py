"""Drives Ferry with the official `anthropic` Python SDK, as an existing app
would: base URL and key changed, nothing else.

env: FERRY_URL (http://host:port, no /v1: the SDK adds it), FERRY_KEY,
FERRY_ADMIN (the admin port's URL: queues flush only when the script says,
so a cancel is never too late and a held call never waits on a timer).
Each check raises on failure; the script exits 0 only if all pass.
"""
import os
import sys

try:
    import anthropic
    from anthropic.types import Message
    from anthropic.types.messages import MessageBatch
except ImportError as e:  # the test must fail, not skip
    print(f"the anthropic SDK is not installed: {e}; run `pip install anthropic`", file=sys.stderr)
    sys.exit(3)

import json
import threading
import time
import urllib.request

URL = os.environ["FERRY_URL"]
ADMIN = os.environ["FERRY_ADMIN"]
client = anthropic.Anthropic(base_url=URL, api_key=os.environ["FERRY_KEY"], timeout=120, max_retries=0)
MODEL = "claude-haiku-4-5"
user = lambda text: [{"role": "user", "content": text}]

# 1. A plain call passes through to the Anthropic upstream.
m = client.messages.create(model=MODEL, max_tokens=64, messages=user("plain call"))
assert isinstance(m, Message), type(m)
assert m.content[0].text == "echo: plain call", m
print("passthrough ok")

# 2. A streamed call passes through; the SDK's stream helper reads it to the end.
with client.messages.stream(model=MODEL, max_tokens=64, messages=user("streamed call")) as s:
    text = "".join(s.text_stream)
    final = s.get_final_message()
assert text == "echo: streamed call", text
assert final.stop_reason == "end_turn", final
print("streaming passthrough ok")

# 3. count_tokens and models, both Anthropic-shaped.
assert client.messages.count_tokens(model=MODEL, messages=user("a b c")).input_tokens == 3
assert any(x.id == MODEL for x in client.models.list().data)
print("count_tokens and models ok")

# 4. The caller's own Message Batches pass through.
b = client.messages.batches.create(requests=[{"custom_id": "mine-1", "params": {"model": MODEL, "max_tokens": 8, "messages": user("x")}}])
assert isinstance(b, MessageBatch) and b.id.startswith("msgbatch_"), b
assert client.messages.batches.retrieve(b.id).id == b.id
assert b.id in [x.id for x in client.messages.batches.list(limit=5).data]
# Its results come through Ferry too: results_url names Ferry, not the
# upstream (whose address would refuse the Ferry key). The emulator ends a
# batch at once unless told otherwise.
ended = client.messages.batches.retrieve(b.id)
assert ended.processing_status == "ended", ended
assert ended.results_url == f"{URL}/v1/messages/batches/{b.id}/results", (ended.results_url, URL)
results = list(client.messages.batches.results(b.id))
assert [r.custom_id for r in results] == ["mine-1"], results
assert results[0].result.type == "succeeded", results
assert results[0].result.message.content[0].text == "echo: x", results
print("own batches ok")

# 5. Errors: Ferry's own (an unknown key) and the upstream's (an unknown
#    model) both reach the SDK as its own exception types.
bad = anthropic.Anthropic(base_url=URL, api_key="not-a-ferry-key", max_retries=0)
try:
    bad.messages.create(model=MODEL, max_tokens=8, messages=user("x"))
    raise AssertionError("an unknown key was accepted")
except anthropic.AuthenticationError as e:
    assert e.body["error"]["type"] == "authentication_error", e.body
try:
    client.messages.create(model="claude-nope", max_tokens=8, messages=user("x"))
    raise AssertionError("an unknown model was accepted")
except anthropic.NotFoundError as e:
    assert e.body["type"] == "error", e.body
print("errors ok")

DEFER = {"Prefer": "respond-async, wait=600"}


def http(method, path, body=None, headers=None):
    req = urllib.request.Request(URL + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"x-api-key": os.environ["FERRY_KEY"], "content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def flush():
    urllib.request.urlopen(urllib.request.Request(ADMIN + "/admin/flush", method="POST"), timeout=30).read()


def held(call):
    """Runs a held call in a thread, flushing the queues until it returns
    (the flush may come before the call is queued: then again)."""
    out = {}

    def run():
        try:
            out["value"] = call()
        except Exception as e:  # re-raised in the main thread
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 120
    while t.is_alive() and time.monotonic() < deadline:
        flush()
        t.join(0.1)
    assert not t.is_alive(), "the held call did not return within 120 s"
    if "error" in out:
        raise out["error"]
    return out["value"]


# 6. Cancel: a queued request is cancelled (nothing flushes it first).
status, ticket = http("POST", "/v1/messages", {"model": MODEL, "max_tokens": 8, "messages": user("never sent")},
                      {"Prefer": "respond-async", "X-Ferry-Custom-Id": "claude-cancel-1"})
assert status == 202 and ticket["status"] == "queued", (status, ticket)
status, cancelled = http("DELETE", "/v1/ferry/requests/claude-cancel-1")
assert status == 200 and cancelled["status"] == "cancelled", (status, cancelled)
print("cancel ok")

# 7. One header defers a call; the held connection returns a Message.
m = held(lambda: client.messages.create(model=MODEL, max_tokens=64, messages=user("deferred call"), extra_headers=DEFER))
assert isinstance(m, Message), type(m)
assert m.content[0].text == "echo: deferred call" and m.stop_reason == "end_turn", m
print("deferred with wait ok")


# 8. A streamed held call: pings while it waits, then the finished message
#    replayed as Anthropic's event stream, read to the end by the SDK.
def streamed():
    with client.messages.stream(model=MODEL, max_tokens=64, messages=user("streamed through a batch"), extra_headers=DEFER) as s:
        return "".join(s.text_stream), s.get_final_message()


text, final = held(streamed)
assert text == "echo: streamed through a batch", text
assert final.content[0].text == text and final.usage.output_tokens == 5, final
print("streaming replay ok")

# 9. The 202 path: a ticket, then the Message by lookup.
status, ticket = http("POST", "/v1/messages", {"model": MODEL, "max_tokens": 8, "messages": user("by lookup")},
                      {"Prefer": "respond-async", "X-Ferry-Custom-Id": "claude-lookup-1"})
assert status == 202 and ticket["id"] == "claude-lookup-1", (status, ticket)
flush()
status, result = http("GET", "/v1/ferry/requests/claude-lookup-1/result?wait=60")
assert status == 200, (status, result)
assert Message.model_validate(result).content[0].text == "echo: by lookup", result
print("ticket and lookup ok")

# 10. An errored line is the upstream's error, raised as the SDK's own type.
try:
    held(lambda: client.messages.create(model=MODEL, max_tokens=8, messages=user("[emulator:status=429]"), extra_headers=DEFER))
    raise AssertionError("an errored line was answered")
except anthropic.RateLimitError as e:
    assert e.body["error"]["type"] == "rate_limit_error", e.body
print("errored line ok")
