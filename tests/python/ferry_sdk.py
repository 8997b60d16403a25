"""Drives Ferry with the official `openai` Python SDK, as an existing app would.

env: FERRY_BASE_URL (http://host:port/v1), FERRY_KEY.
Each check raises on failure; the script exits 0 only if all pass.
"""
import os
import sys

try:
    import openai
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
except ImportError as e:  # the test must fail, not skip
    print(f"the openai SDK is not installed: {e}; run `pip install openai`", file=sys.stderr)
    sys.exit(3)

client = openai.OpenAI(base_url=os.environ["FERRY_BASE_URL"], api_key=os.environ["FERRY_KEY"], timeout=120, max_retries=0)
messages = lambda text: [{"role": "user", "content": text}]

# 1. A normal call passes through.
r = client.chat.completions.create(model="gpt-4o-mini", messages=messages("plain call"))
assert isinstance(r, ChatCompletion), type(r)
assert r.choices[0].message.content == "echo: plain call", r
print("passthrough ok")

# 2. One header defers it; the held connection returns a ChatCompletion.
r = client.chat.completions.create(
    model="gpt-4o-mini",
    messages=messages("deferred call"),
    extra_headers={"Prefer": "respond-async, wait=600"},
)
assert isinstance(r, ChatCompletion), type(r)
assert r.object == "chat.completion"
assert r.choices[0].message.content == "echo: deferred call", r
assert r.choices[0].finish_reason == "stop"
assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
print("deferred with wait ok")

# 3. stream=True with a wait: the finished completion replayed as SSE,
#    after keep-alive comments.
stream = client.chat.completions.create(
    model="gpt-4o-mini",
    messages=messages("streamed through a batch"),
    stream=True,
    stream_options={"include_usage": True},
    extra_headers={"Prefer": "respond-async, wait=600"},
)
chunks = list(stream)
assert chunks and all(isinstance(c, ChatCompletionChunk) for c in chunks), chunks
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert text == "echo: streamed through a batch", text
assert any(c.choices and c.choices[0].finish_reason == "stop" for c in chunks)
assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
print("streaming replay ok")

# 4. Without a wait: the 202 ticket, readable through the raw response.
raw = client.chat.completions.with_raw_response.create(
    model="gpt-4o-mini",
    messages=messages("ticket please"),
    extra_headers={"Prefer": "respond-async", "X-Ferry-Custom-Id": "sdk-ticket"},
)
assert raw.status_code == 202, raw.status_code
assert raw.headers["location"] == "/v1/ferry/requests/sdk-ticket"
ticket = raw.http_response.json()
assert ticket["status"] == "queued" and ticket["id"] == "sdk-ticket", ticket
print("ticket ok")

# 5. Streaming without a wait is refused with a clear 400.
try:
    client.chat.completions.create(
        model="gpt-4o-mini", messages=messages("x"), stream=True, extra_headers={"Prefer": "respond-async"}
    )
except openai.BadRequestError as e:
    assert e.body["param"] == "stream", e.body
    print("stream without wait refused ok")
else:
    raise AssertionError("stream without wait was accepted")
