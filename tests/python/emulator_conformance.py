#!/usr/bin/env python3
"""Drive a Batch API with the official `openai` Python SDK and check that every
answer parses into the SDK's own (strict) types.

Run by tests/emulator_sdk.rs against Ferry's emulator, with
OPENAI_BASE_URL=http://ADDR/v1, OPENAI_API_KEY and EMULATOR_URL=http://ADDR.
EMULATOR_URL is what makes it fast: the script then moves the emulator's clock
(POST /_emulator/clock) instead of waiting, and also checks the emulator's
deterministic answers and injected failures. Without EMULATOR_URL the same
script runs against the real OpenAI API (set CONFORMANCE_MODEL to a batch
model you can use; it polls every 30 s and may take hours).

Exit status: 0 when every check passed, 1 on a failed check, 3 when the
`openai` package is missing.
"""

import itertools
import json
import os
import sys
import time
import urllib.request

try:
    import openai
    from openai import OpenAI
    from openai.types import Batch, FileDeleted, FileObject
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
except ImportError as e:  # pragma: no cover - the message is the point
    print(
        f"cannot import the openai SDK ({e}): run `pip install openai`",
        file=sys.stderr,
    )
    sys.exit(3)

EMULATOR = os.environ.get("EMULATOR_URL")
MODEL = os.environ.get("CONFORMANCE_MODEL", "gpt-4o-mini")
TERMINAL = {"completed", "failed", "expired", "cancelled"}
POLL_SECONDS = 30

client = OpenAI(max_retries=0)


def log(*args):
    print(*args, flush=True)


def check(condition, message):
    if not condition:
        raise AssertionError(message)


def emulator_post(path, body):
    """POST a JSON body to the emulator's control routes (no key needed)."""
    request = urllib.request.Request(
        EMULATOR + path,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def wait(seconds):
    """Let `seconds` of batch time pass: move the emulator's clock, or sleep."""
    if EMULATOR:
        emulator_post("/_emulator/clock", {"advance_seconds": seconds})
    else:
        time.sleep(seconds)


def strict(model_type, raw, every_key=True):
    """Parse `raw` with the SDK's type in strict mode and check that it has no
    key the type does not declare and (against the emulator) every key it
    declares."""
    parsed = model_type.model_validate(raw, strict=True)
    fields = set(model_type.model_fields)
    extra = set(raw) - fields
    check(not extra, f"{model_type.__name__} has keys the SDK does not know: {extra}")
    if every_key and EMULATOR:
        missing = fields - set(raw)
        check(not missing, f"{model_type.__name__} lacks keys: {missing}")
    check(
        not parsed.model_extra,
        f"{model_type.__name__} parsed with extras: {parsed.model_extra}",
    )
    return parsed


def raw_batch(call, *args, **kwargs):
    """Call a batches method through with_raw_response; return the SDK object
    and the raw JSON, both checked."""
    response = call(*args, **kwargs)
    raw = json.loads(response.text)
    parsed = response.parse()
    check(isinstance(parsed, Batch), f"expected a Batch, got {type(parsed)}")
    strict(Batch, raw)
    check(parsed.model_dump(exclude_unset=True).keys() == raw.keys(), "model_dump keys differ from the JSON")
    return parsed, raw


def line(custom_id, text):
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": MODEL,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": 20,
        },
    }


def upload(lines, name="requests.jsonl"):
    content = "".join(json.dumps(l) + "\n" for l in lines).encode()
    file = client.files.create(file=(name, content), purpose="batch")
    check(isinstance(file, FileObject), f"files.create gave {type(file)}")
    check(file.purpose == "batch", f"purpose {file.purpose}")
    check(file.bytes == len(content), f"bytes {file.bytes} != {len(content)}")
    check(file.filename == name, f"filename {file.filename}")
    check(file.id.startswith("file-"), f"file id {file.id}")
    raw = json.loads(client.files.with_raw_response.retrieve(file.id).text)
    strict(FileObject, raw)
    return file


def create(file, metadata=None):
    batch, raw = raw_batch(
        client.batches.with_raw_response.create,
        input_file_id=file.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata=metadata,
    )
    check(batch.status == "validating", f"new batch is {batch.status}")
    check(batch.id.startswith("batch_"), f"batch id {batch.id}")
    check(raw["output_file_id"] is None, "a new batch has no output file")
    return batch


def poll(batch_id, step):
    """Retrieve until terminal; returns the final batch and the statuses seen."""
    seen = []
    for _ in range(10_000):
        batch, _ = raw_batch(client.batches.with_raw_response.retrieve, batch_id)
        if not seen or seen[-1] != batch.status:
            seen.append(batch.status)
            log(f"  {batch_id}: {batch.status} {batch.request_counts}")
        if batch.status in TERMINAL:
            return batch, seen
        check(batch.output_file_id is None, "output_file_id before the end")
        wait(step)
    raise AssertionError(f"{batch_id} never finished")


def results(file_id):
    """The lines of an output or error file, through files.content."""
    content = client.files.content(file_id)
    return [json.loads(l) for l in content.text.splitlines() if l.strip()]


def main():
    step = 5 if EMULATOR else POLL_SECONDS

    # --- upload, create, poll, download ------------------------------------
    lines = [line(f"req-{i}", f"say number {i}") for i in range(4)]
    if EMULATOR:
        lines.append(line("req-fail", "this one fails [emulator:status=500]"))
    file = upload(lines)
    listed = [f.id for f in itertools.islice(client.files.list(purpose="batch"), 1000)]
    check(file.id in listed, "the upload is not in files.list")

    batch = create(file, metadata={"suite": "conformance"})
    check(batch.metadata == {"suite": "conformance"}, f"metadata {batch.metadata}")
    batch, seen = poll(batch.id, step)
    log(f"statuses: {seen}")
    check(batch.status == "completed", f"batch ended {batch.status}: {batch.errors}")
    if EMULATOR:
        check(seen[0] == "validating" and "in_progress" in seen and "finalizing" in seen, f"statuses {seen}")
        check(batch.request_counts.total == 5, f"{batch.request_counts}")
        check(batch.request_counts.completed == 4, f"{batch.request_counts}")
        check(batch.request_counts.failed == 1, f"{batch.request_counts}")
        check(batch.usage is not None and batch.usage.total_tokens > 0, f"usage {batch.usage}")
    for stamp in ("created_at", "in_progress_at", "finalizing_at", "completed_at"):
        check(getattr(batch, stamp) is not None, f"{stamp} unset")

    output = results(batch.output_file_id)
    check(sorted(o["custom_id"] for o in output) == [f"req-{i}" for i in range(4)], "output custom_ids")
    for o in output:
        check(o["error"] is None, f"error in output line {o}")
        check(o["response"]["status_code"] == 200, f"status in {o}")
        completion = ChatCompletion.model_validate(o["response"]["body"])
        check(completion.choices[0].finish_reason in ("stop", "length"), "finish_reason")
        if EMULATOR:
            n = o["custom_id"].split("-")[1]
            check(
                completion.choices[0].message.content == f"echo: say number {n}",
                f"content {completion.choices[0].message.content!r}",
            )
    output_file = client.files.retrieve(batch.output_file_id)
    strict(FileObject, json.loads(client.files.with_raw_response.retrieve(output_file.id).text))
    check(output_file.purpose == "batch_output", f"output purpose {output_file.purpose}")
    # The deprecated retrieve_content returns the same text.
    legacy = client.files.retrieve_content(batch.output_file_id)
    check(legacy.splitlines()[0] and json.loads(legacy.splitlines()[0])["custom_id"], "retrieve_content")

    if EMULATOR:
        errors = results(batch.error_file_id)
        check(len(errors) == 1 and errors[0]["custom_id"] == "req-fail", f"errors {errors}")
        check(errors[0]["response"]["status_code"] == 500, f"{errors[0]}")
        check(errors[0]["response"]["body"]["error"]["type"] == "server_error", f"{errors[0]}")
    else:
        check(batch.error_file_id is None, "no error file expected")

    # A completed batch cannot be cancelled.
    try:
        client.batches.cancel(batch.id)
        raise AssertionError("cancel of a completed batch succeeded")
    except openai.ConflictError as e:
        check(e.status_code == 409, f"status {e.status_code}")

    # --- cancel ------------------------------------------------------------
    file2 = upload([line(f"c-{i}", f"cancel me {i}") for i in range(6)], name="cancel.jsonl")
    to_cancel = create(file2)
    if EMULATOR:
        wait(step * 3 + 1)  # validation and two lines done
    cancelled, _ = raw_batch(client.batches.with_raw_response.cancel, to_cancel.id)
    check(cancelled.status in ("cancelling", "cancelled"), f"cancel gave {cancelled.status}")
    check(cancelled.cancelling_at is not None, "cancelling_at unset")
    cancelled, seen = poll(to_cancel.id, step)
    check(cancelled.status == "cancelled", f"cancel ended {cancelled.status}")
    if EMULATOR:
        kept = sorted(o["custom_id"] for o in results(cancelled.output_file_id))
        check(kept == ["c-0", "c-1"], f"kept {kept}")
        cut = results(cancelled.error_file_id)
        check(len(cut) == 4 and all(c["error"]["code"] == "batch_cancelled" for c in cut), f"cut {cut}")
    again = client.batches.cancel(to_cancel.id)
    check(again.status == "cancelled", f"second cancel gave {again.status}")

    # --- list with pagination ----------------------------------------------
    third = create(upload([line("p-0", "page")], name="page.jsonl"))
    page = client.batches.list(limit=1)
    check(len(page.data) == 1 and page.data[0].id == third.id, "newest batch first")
    check(page.has_more is True, "has_more on the first page")
    raw_page = json.loads(client.batches.with_raw_response.list(limit=1).text)
    check(raw_page["object"] == "list", "list object")
    for item in raw_page["data"]:
        strict(Batch, item)
    second = client.batches.list(limit=1, after=page.data[0].id)
    check(second.data[0].id == to_cancel.id, f"after gave {second.data[0].id}")
    check(page.has_next_page(), "has_next_page")
    check(page.get_next_page().data[0].id == to_cancel.id, "get_next_page")
    walked = [b.id for b in itertools.islice(client.batches.list(limit=1), 3)]
    check(walked == [third.id, to_cancel.id, batch.id], f"auto-paging gave {walked}")
    poll(third.id, step)

    # --- errors --------------------------------------------------------------
    try:
        client.batches.retrieve("batch_doesnotexist")
        raise AssertionError("retrieve of an unknown batch succeeded")
    except openai.NotFoundError as e:
        check(e.status_code == 404, f"status {e.status_code}")
    try:
        client.files.create(file=("notes.txt", b"x"), purpose="batch")
        raise AssertionError("a .txt batch upload succeeded")
    except openai.BadRequestError:
        pass

    # --- delete ----------------------------------------------------------------
    for f in (file, file2):
        deleted = client.files.delete(f.id)
        check(isinstance(deleted, FileDeleted) and deleted.deleted and deleted.id == f.id, f"{deleted}")
    try:
        client.files.retrieve(file.id)
        raise AssertionError("a deleted file is still there")
    except openai.NotFoundError:
        pass

    # --- real time -------------------------------------------------------------
    chat_raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hello there"}], max_tokens=20
    )
    chat = chat_raw.parse()
    check(isinstance(chat, ChatCompletion), f"{type(chat)}")
    ChatCompletion.model_validate(json.loads(chat_raw.text), strict=True)
    check(chat.usage is not None and chat.usage.total_tokens > 0, "chat usage")
    if EMULATOR:
        check(chat.choices[0].message.content == "echo: hello there", f"{chat.choices[0].message.content!r}")
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "stream this"}],
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    check(all(isinstance(c, ChatCompletionChunk) for c in chunks), "chunk types")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    check(any(c.choices and c.choices[0].finish_reason for c in chunks), "no finish_reason")
    check(chunks[-1].usage is not None, "no usage chunk")
    if EMULATOR:
        check(text == "echo: stream this", f"streamed {text!r}")
        try:
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "[emulator:status=503]"}]
            )
            raise AssertionError("the injected 503 did not happen")
        except openai.InternalServerError as e:
            check(e.status_code == 503, f"status {e.status_code}")

    log("conformance: all checks passed")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"conformance check failed: {e}", file=sys.stderr)
        raise
