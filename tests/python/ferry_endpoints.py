"""Drives Ferry's deferral of every batchable endpoint with the official
`openai` Python SDK: embeddings, completions, moderations and responses.

env: FERRY_BASE_URL (http://host:port/v1), FERRY_KEY, FERRY_STEP (held|mixed).

`held`: per endpoint a held call (Prefer: respond-async, wait=N) returns the
SDK's own response type with the expected content; a streamed responses call
replays as the Responses API's event stream; the 202 ticket of an embeddings
call and its /result read back as a CreateEmbeddingResponse.
`mixed`: queues three chat completions and three embeddings for one model
(202 tickets, custom ids mixed-chat-N / mixed-emb-N) and prints `queued`.
Each check raises on failure; the script exits 0 only if all pass.
"""
import os
import sys

try:
    import openai
    from openai.types import Completion, CreateEmbeddingResponse, ModerationCreateResponse
    from openai.types.responses import Response
except ImportError as e:  # the test must fail, not skip
    print(f"the openai SDK is not installed: {e}; run `pip install openai`", file=sys.stderr)
    sys.exit(3)

client = openai.OpenAI(base_url=os.environ["FERRY_BASE_URL"], api_key=os.environ["FERRY_KEY"], timeout=120, max_retries=0)
HOLD = {"Prefer": "respond-async, wait=600"}


def held():
    # Embeddings: the SDK asks for base64 and decodes it; the held answer
    # equals the real-time one for the same inputs (the model is deterministic).
    live = client.embeddings.create(model="text-embedding-3-small", input=["alpha", "beta"], dimensions=4)
    r = client.embeddings.create(
        model="text-embedding-3-small", input=["alpha", "beta"], dimensions=4, extra_headers=HOLD
    )
    assert isinstance(r, CreateEmbeddingResponse), type(r)
    assert [d.index for d in r.data] == [0, 1], r
    assert all(len(d.embedding) == 4 for d in r.data), r
    assert [d.embedding for d in r.data] == [d.embedding for d in live.data], (r, live)
    assert r.usage.prompt_tokens == 2 and r.model == "text-embedding-3-small", r
    print("embeddings held ok")

    r = client.completions.create(model="gpt-4o-mini", prompt="say hi", extra_headers=HOLD)
    assert isinstance(r, Completion), type(r)
    assert r.object == "text_completion" and r.choices[0].text == "echo: say hi", r
    print("completions held ok")

    chunks = list(client.completions.create(model="gpt-4o-mini", prompt="stream it", stream=True, extra_headers=HOLD))
    assert chunks and all(isinstance(c, Completion) for c in chunks), chunks
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == "echo: stream it", text
    assert any(c.choices and c.choices[0].finish_reason == "stop" for c in chunks), chunks
    print("completions stream replay ok")

    # No model: queued and sent as the upstream's default moderation model.
    r = client.moderations.create(input=["plan an attack", "hello"], extra_headers=HOLD)
    assert isinstance(r, ModerationCreateResponse), type(r)
    assert r.model == "omni-moderation-latest", r
    assert [x.flagged for x in r.results] == [True, False], r
    assert r.results[0].categories.violence is True, r
    print("moderations held ok")

    r = client.responses.create(model="gpt-4o-mini", input="hello there", extra_headers=HOLD)
    assert isinstance(r, Response), type(r)
    assert r.status == "completed" and r.output_text == "echo: hello there", r
    print("responses held ok")

    events = list(client.responses.create(model="gpt-4o-mini", input="stream me", stream=True, extra_headers=HOLD))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
    assert [e.sequence_number for e in events] == list(range(len(events))), events
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == "echo: stream me", deltas
    assert events[-1].response.output_text == "echo: stream me", events[-1]
    print("responses stream replay ok")

    # The 202 ticket, then /result long-polled and parsed as the SDK's type.
    raw = client.embeddings.with_raw_response.create(
        model="text-embedding-3-small",
        input="ticketed",
        extra_headers={"Prefer": "respond-async", "X-Ferry-Custom-Id": "emb-ticket"},
    )
    assert raw.status_code == 202, raw.status_code
    assert raw.headers["location"] == "/v1/ferry/requests/emb-ticket"
    ticket = raw.http_response.json()
    assert ticket["status"] == "queued" and ticket["id"] == "emb-ticket", ticket
    r = client.get(
        "/ferry/requests/emb-ticket/result",
        cast_to=CreateEmbeddingResponse,
        options={"params": {"wait": 600}},
    )
    assert isinstance(r, CreateEmbeddingResponse) and len(r.data) == 1, r
    status = client.get("/ferry/requests/emb-ticket", cast_to=object)
    assert status["status"] == "completed" and status["result"]["status_code"] == 200, status
    assert status["endpoint"] == "/v1/embeddings", status
    print("embeddings ticket and lookup ok")


def mixed():
    for n in range(3):
        for kind, call in (
            ("chat", lambda: client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"chat {n}"}],
                extra_headers={"Prefer": "respond-async", "X-Ferry-Custom-Id": f"mixed-chat-{n}"})),
            ("emb", lambda: client.embeddings.with_raw_response.create(
                model="gpt-4o-mini", input=[f"emb {n}", "more"],
                extra_headers={"Prefer": "respond-async", "X-Ferry-Custom-Id": f"mixed-emb-{n}"})),
        ):
            raw = call()
            assert raw.status_code == 202, (kind, raw.status_code, raw.http_response.text)
    print("queued")


{"held": held, "mixed": mixed}[os.environ["FERRY_STEP"]]()
