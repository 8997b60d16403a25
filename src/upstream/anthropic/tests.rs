use std::sync::Arc;

use futures::TryStreamExt;

use super::*;
use crate::batch::ingest::parse_line;
use crate::store::Outcome;

const PREFIX: &str = "f0123456789abcdef-7-";

fn line(request: u64, text: &str) -> String {
    json!({"custom_id": format!("ferry-{request}"), "method": "POST", "url": "/v1/messages",
        "body": {"model": "claude-haiku-4-5", "max_tokens": 16,
                 "messages": [{"role": "user", "content": text}]}})
    .to_string()
}

#[test]
fn custom_ids_carry_instance_and_batch_within_the_limits() {
    let longest = format!(
        "{}{}",
        custom_id_prefix("0123456789abcdef", u64::MAX),
        u64::MAX
    );
    assert!(crate::anthropic::valid_custom_id(&longest), "{longest}");
    let item = request_item(line(42, "hi").as_bytes(), PREFIX).unwrap();
    let v: Value = serde_json::from_slice(&item).unwrap();
    assert_eq!(v["custom_id"], format!("{PREFIX}42"));
    assert_eq!(v["params"]["max_tokens"], 16);
    assert!(request_item(br#"{"custom_id":"x","body":{}}"#, PREFIX).is_err());
}

/// The queue counts each request's bytes as its OpenAI input line
/// (`store::line_len`, written before any batch number exists); the create
/// body puts each in `{"custom_id":"<prefix><id>","params":<body>},`, 22
/// bytes less the batch number's digits shorter, inside 15 bytes of
/// `{"requests":[`...`]}` less the last comma. So a claim of two or more
/// requests within `max_bytes` builds a create body within it, for any
/// batch number below 10^15 (a lone request is taken whatever its size).
#[tokio::test]
async fn the_queues_byte_count_covers_the_create_body() {
    use crate::endpoint::Endpoint::Messages;
    use crate::store::line_len;
    let instance = "0123456789abcdef";
    for batch in [1, 7_777, 999_999_999_999_999] {
        for (n, first_id) in [(2u64, 9u64), (3, 1), (7, 99_998), (50, 1_000_000)] {
            let ids = first_id..first_id + n;
            let lines: String = ids
                .clone()
                .map(|id| format!("{}\n", line(id, "x")))
                .collect();
            let estimate: u64 = ids
                .map(|id| {
                    let body =
                        serde_json::from_str::<Value>(&line(id, "x")).unwrap()["body"].to_string();
                    line_len(Messages, id, body.len() as u64)
                })
                .sum();
            assert_eq!(
                estimate,
                lines.len() as u64,
                "the estimate is the JSONL's length"
            );
            let chunks = futures::stream::iter(vec![Ok(Bytes::from(lines))]);
            let prefix = custom_id_prefix(instance, batch);
            let body: Vec<Bytes> = requests_body(chunks, prefix).try_collect().await.unwrap();
            let sent = body.concat().len() as u64;
            assert!(
                sent <= estimate,
                "batch {batch}, {n} requests: a {sent}-byte create body over the {estimate} counted"
            );
        }
    }
}

#[tokio::test]
async fn the_create_body_is_built_chunk_by_chunk() {
    let chunks = vec![
        Ok(Bytes::from(format!("{}\n{}\n", line(1, "a"), line(2, "b")))),
        Ok(Bytes::from(format!("{}\n", line(3, "c")))),
    ];
    let body: Vec<Bytes> = requests_body(futures::stream::iter(chunks), PREFIX.into())
        .try_collect()
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&body.concat()).unwrap();
    let ids: Vec<&str> = body["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            format!("{PREFIX}1"),
            format!("{PREFIX}2"),
            format!("{PREFIX}3")
        ]
    );
}

#[test]
fn message_batches_read_as_batch_objects() {
    let batch = |status: &str, cancel: Option<&str>, expired: u64| MessageBatch {
        id: "msgbatch_1".into(),
        processing_status: status.into(),
        request_counts: RequestCounts {
            expired,
            ..Default::default()
        },
        cancel_initiated_at: cancel.map(str::to_owned),
        results_url: None,
        created_at: Some("2024-08-20T18:37:24.100435Z".into()),
    };
    let o = batch_object(&batch("in_progress", None, 0));
    assert_eq!((o.status.as_str(), o.output_file()), ("in_progress", None));
    assert_eq!(o.created_at, Some(1_724_179_044));
    assert_eq!(
        batch_object(&batch("canceling", Some("t"), 0)).status,
        "cancelling"
    );
    assert_eq!(
        batch_object(&batch("ended", Some("t"), 0)).status,
        "cancelled"
    );
    assert_eq!(batch_object(&batch("ended", None, 2)).status, "expired");
    let done = batch_object(&batch("ended", None, 0));
    assert!(done.is_terminal());
    assert_eq!(
        (done.status.as_str(), done.output_file()),
        ("completed", Some("msgbatch_1"))
    );
}

#[test]
fn result_lines_become_output_lines_ingestion_reads() {
    let parse = |result: Value| {
        let l = output_line(
            &json!({"custom_id": format!("{PREFIX}9"), "result": result}),
            PREFIX,
        )
        .unwrap();
        parse_line(l.to_string().as_bytes()).unwrap()
    };
    let (id, ok) = parse(json!({"type": "succeeded", "message": {"type": "message"}}));
    assert_eq!(id, 9);
    assert!(matches!(ok, Outcome::Completed(r) if r.status_code == 200));
    let (_, errored) = parse(json!({"type": "errored", "error": {"type": "error",
        "error": {"type": "rate_limit_error", "message": "slow"}}}));
    assert!(
        matches!(errored, Outcome::Completed(r) if r.status_code == 429
        && r.body_value()["error"]["type"] == "rate_limit_error")
    );
    assert!(matches!(
        parse(json!({"type": "canceled"})).1,
        Outcome::Cancelled(_)
    ));
    assert!(matches!(
        parse(json!({"type": "expired"})).1,
        Outcome::Expired(_)
    ));
    // Another batch's (or another client's) line is not this batch's.
    let other = json!({"custom_id": "f0123456789abcdef-8-9", "result": {"type": "canceled"}});
    assert_eq!(output_line(&other, PREFIX), None);
}

#[tokio::test]
async fn results_split_anywhere_are_read_whole() {
    let a = json!({"custom_id": format!("{PREFIX}1"), "result": {"type": "canceled"}}).to_string();
    let b = json!({"custom_id": format!("{PREFIX}2"), "result": {"type": "expired"}}).to_string();
    let text = format!("{a}\n{b}");
    let (x, y) = text.split_at(a.len() - 3);
    let chunks = vec![Ok(Bytes::from(x.to_owned())), Ok(Bytes::from(y.to_owned()))];
    let out: Vec<Bytes> = output_lines(futures::stream::iter(chunks), PREFIX.into())
        .try_collect()
        .await
        .unwrap();
    let out = out.concat();
    let lines: Vec<&[u8]> = out
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(parse_line(lines[1]).unwrap().0, 2);
}

/// Create, poll and read results against the emulator's Anthropic profile:
/// the whole round trip the driver makes, in the driver's shapes.
#[tokio::test]
async fn a_round_trip_through_the_emulator() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = crate::emulator::EmulatorConfig {
        api_key: "k".into(),
        ..Default::default()
    };
    tokio::spawn(crate::emulator::serve(
        listener,
        config,
        std::future::pending(),
    ));
    let client = BatchClient::new(
        "claude",
        &format!("http://{addr}/v1"),
        "k",
        100,
        100,
        None,
        Arc::new(crate::metrics::Metrics::new()),
    )
    .unwrap()
    .for_anthropic(crate::anthropic::DEFAULT_VERSION);
    let lines = format!(
        "{}\n{}\n",
        line(1, "hello"),
        line(2, "no [emulator:status=429]")
    );
    let stream = futures::stream::iter(vec![Ok(Bytes::from(lines))]);
    let created = client
        .create_message_batch(stream, PREFIX.into())
        .await
        .unwrap();
    assert!(created.id.starts_with("msgbatch_"));
    assert_eq!(created.status, "in_progress");
    let got = client.get_message_batch(&created.id).await.unwrap();
    assert_eq!(got.request_counts.total(), 2);
    let obj = batch_object(&got);
    assert_eq!(obj.status, "completed");
    let (listed, _) = client.list_message_batches(None, 10).await.unwrap();
    assert_eq!(listed[0].id, created.id);
    let results: Vec<Bytes> = client
        .message_batch_results(obj.output_file().unwrap(), PREFIX.into())
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let results = results.concat();
    let mut outcomes: Vec<(u64, Outcome)> = results
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| parse_line(l).unwrap())
        .collect();
    outcomes.sort_by_key(|(id, _)| *id);
    assert!(
        matches!(&outcomes[0].1, Outcome::Completed(r) if r.status_code == 200
        && r.body_value()["content"][0]["text"] == "echo: hello")
    );
    assert!(matches!(&outcomes[1].1, Outcome::Completed(r) if r.status_code == 429));
    // Upstream errors are read in Anthropic's shape.
    let err = client.get_message_batch("msgbatch_nope").await.unwrap_err();
    assert!(
        matches!(&err, UpstreamError::Status { status: 404, code: Some(c), .. } if c == "not_found_error"),
        "{err}"
    );
}

/// A synchronous call on an Anthropic upstream (a request escalated for its
/// deadline) carries the key as Anthropic reads it, like the batch calls:
/// `x-api-key` and `anthropic-version`, never `Authorization`.
#[tokio::test]
async fn a_synchronous_call_authenticates_as_anthropic_expects() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "the client hung up before its headers ended");
            head.extend_from_slice(&buf[..n]);
        }
        conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}")
            .await
            .unwrap();
        String::from_utf8_lossy(&head).to_lowercase()
    });
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let client = BatchClient::new(
        "claude",
        &format!("http://{addr}/v1"),
        "sk-ant-upstream",
        1000,
        1000,
        None,
        metrics,
    )
    .unwrap()
    .for_anthropic("2023-06-01");
    let (status, _) = client
        .respond(
            "respond_standard",
            crate::endpoint::Endpoint::Messages,
            b"{}".to_vec(),
            std::time::Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(status, 200);
    let head = seen.await.unwrap();
    assert!(head.starts_with("post /v1/messages "), "{head}");
    assert!(head.contains("x-api-key: sk-ant-upstream\r\n"), "{head}");
    assert!(head.contains("anthropic-version: 2023-06-01\r\n"), "{head}");
    assert!(!head.contains("authorization:"), "{head}");
}
