"""Drives Ferry with the official `anthropic` Python SDK, as an existing app
would: base URL and key changed, nothing else.

env: FERRY_URL (http://host:port, no /v1: the SDK adds it), FERRY_KEY.
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

URL = os.environ["FERRY_URL"]
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
# Deferring is refused in Anthropic's shape until Ferry can batch Claude calls.
try:
    client.messages.create(model=MODEL, max_tokens=8, messages=user("x"), extra_headers={"Prefer": "respond-async, wait=60"})
    raise AssertionError("a deferral Ferry cannot make was accepted")
except anthropic.BadRequestError as e:
    assert e.body["error"]["type"] == "invalid_request_error", e.body
print("errors ok")
