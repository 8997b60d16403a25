//! The official `openai` Python SDK as Ferry's client: passthrough, a
//! deferred call held until its `ChatCompletion`, the SSE replay of a
//! deferred `stream=True` call (after keep-alives), and the 202 ticket.

mod common;

use common::Stack;

#[test]
fn the_openai_sdk_works_through_ferry_unchanged() {
    // Queues flush 0.3 s after their first request; keep-alives every 0.1 s,
    // so the streamed call sees comment lines before its replay.
    let s = Stack::start("max_wait_secs = 0.3", "sse_keepalive_secs = 0.1");
    let out = common::run_python(
        "ferry_sdk.py",
        &[
            ("FERRY_BASE_URL", s.url("/v1")),
            ("FERRY_KEY", "alice-key".to_owned()),
        ],
        "",
    );
    for step in [
        "passthrough ok",
        "deferred with wait ok",
        "streaming replay ok",
        "ticket ok",
        "stream without wait refused ok",
    ] {
        assert!(out.contains(step), "missing `{step}` in:\n{out}");
    }
}
