//! The official `anthropic` Python SDK as Ferry's client, on one stack
//! (Ferry with its embedded emulator serving both API families): passthrough,
//! errors, cancel, a held deferred call returning a `Message`, a streamed
//! held call, the `202` path with lookup and an errored line. Every case runs
//! in one script so the stack starts once.

mod common;

use common::Stack;

/// A second upstream, Anthropic, on the same embedded emulator.
const CLAUDE: &str = "\n[[upstreams]]\nname = \"claude\"\nkind = \"anthropic\"\nemulator = true\npoll_interval_secs = 0.05\nmax_wait_secs = 3600";

#[test]
fn the_anthropic_sdk_works_through_ferry_unchanged() {
    let s = Stack::start_embedded("", CLAUDE, "sse_keepalive_secs = 0.1");
    let out = common::run_python(
        "ferry_anthropic.py",
        &[
            ("FERRY_URL", s.url("")),
            ("FERRY_KEY", "alice-key".to_owned()),
            ("FERRY_ADMIN", s.admin("")),
        ],
        "",
    );
    for step in [
        "passthrough ok",
        "streaming passthrough ok",
        "count_tokens and models ok",
        "own batches ok",
        "errors ok",
        "cancel ok",
        "deferred with wait ok",
        "streaming replay ok",
        "ticket and lookup ok",
        "errored line ok",
    ] {
        assert!(out.contains(step), "missing `{step}` in:\n{out}");
    }
}
