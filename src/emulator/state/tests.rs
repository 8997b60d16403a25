//! The durable emulator across restarts, driven without HTTP: state is
//! dropped (as a kill drops it: nothing is written at drop) and reopened on
//! the same directory.

use serde_json::{Value, json};

use super::*;

fn slow() -> EmulatorConfig {
    EmulatorConfig {
        validating_seconds: 10.0,
        per_request_seconds: 5.0,
        finalizing_seconds: 10.0,
        ..EmulatorConfig::default()
    }
}

fn input(n: usize) -> Bytes {
    let mut text = String::new();
    for i in 0..n {
        let line = json!({"custom_id": format!("r-{i}"), "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": format!("hello {i}")}]}});
        text.push_str(&line.to_string());
        text.push('\n');
    }
    Bytes::from(text)
}

fn upload(e: &Emulator, content: Bytes) -> String {
    let f = e
        .add_file("in.jsonl".into(), "batch".into(), content, None)
        .unwrap();
    f["id"].as_str().unwrap().to_owned()
}

fn create(e: &Emulator, file: &str) -> String {
    let b = e
        .create_batch(
            &json!({"input_file_id": file, "endpoint": "/v1/chat/completions",
            "completion_window": "24h", "metadata": {"k": "v"}}),
        )
        .unwrap();
    b["id"].as_str().unwrap().to_owned()
}

fn content(e: &Emulator, id: &Value) -> Vec<Value> {
    let file = e.file(id.as_str().unwrap()).unwrap();
    std::str::from_utf8(&file.bytes)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_batch_in_progress_survives_a_restart_and_finishes_once() {
    let dir = tempfile::tempdir().unwrap();
    let (file, batch, offset) = {
        let e = Emulator::open(slow(), dir.path()).unwrap();
        let file = upload(&e, input(4));
        let other = e
            .add_file(
                "notes.txt".into(),
                "user_data".into(),
                Bytes::from_static(b"keep me"),
                None,
            )
            .unwrap();
        let batch = create(&e, &file);
        // Validation ends at +10 s, line k runs at +10+5k: two lines by +21.
        e.advance_clock(21.0).unwrap();
        let b = e.get_batch(&batch).unwrap();
        assert_eq!(b["status"], "in_progress");
        assert_eq!(
            b["request_counts"],
            json!({"total": 4, "completed": 2, "failed": 0})
        );
        // Ferry may delete the input while the batch runs.
        e.delete_file(&file).unwrap();
        assert_eq!(
            e.file(other["id"].as_str().unwrap()).unwrap().bytes,
            "keep me"
        );
        let offset = e.clock_json()["offset_seconds"].as_f64().unwrap();
        (other["id"].as_str().unwrap().to_owned(), batch, offset)
    };

    let e = Emulator::open(slow(), dir.path()).unwrap();
    assert_eq!(e.clock_json()["offset_seconds"].as_f64().unwrap(), offset);
    assert_eq!(e.file(&file).unwrap().bytes, "keep me");
    let b = e.get_batch(&batch).unwrap();
    assert_eq!(b["status"], "in_progress");
    assert_eq!(b["metadata"], json!({"k": "v"}));
    assert_eq!(
        b["request_counts"],
        json!({"total": 4, "completed": 2, "failed": 0})
    );
    let stats = e.stats().unwrap();
    assert_eq!(stats["executed_lines"], 2);
    assert_eq!(stats["files_uploaded"], 2);
    assert_eq!(stats["lines_submitted"], 4);

    // Another restart, then the rest of the batch.
    drop(e);
    let e = Emulator::open(slow(), dir.path()).unwrap();
    e.advance_clock(30.0).unwrap();
    let b = e.get_batch(&batch).unwrap();
    assert_eq!(b["status"], "completed");
    assert_eq!(
        b["request_counts"],
        json!({"total": 4, "completed": 4, "failed": 0})
    );
    let mut ids: Vec<String> = content(&e, &b["output_file_id"])
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    assert_eq!(ids, ["r-0", "r-1", "r-2", "r-3"]);
    let stats = e.stats().unwrap();
    assert_eq!(stats["executed_lines"], 4);
    assert_eq!(stats["executed_more_than_once"], 0);
    assert_eq!(stats["distinct_custom_ids"], 4);
    assert_eq!(stats["batches_by_status"]["completed"], 1);
    let out = b["output_file_id"].clone();

    // A finished batch and its output come back as they were.
    drop(e);
    let e = Emulator::open(slow(), dir.path()).unwrap();
    let again = e.get_batch(&batch).unwrap();
    assert_eq!(again, b);
    assert_eq!(content(&e, &out).len(), 4);
    assert_eq!(e.stats().unwrap()["executed_more_than_once"], 0);
}

#[test]
fn deletes_cancels_and_the_clock_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (gone, cancelled, now) = {
        let e = Emulator::open(slow(), dir.path()).unwrap();
        let gone = upload(&e, input(1));
        e.delete_file(&gone).unwrap();
        let file = upload(&e, input(3));
        let cancelled = create(&e, &file);
        e.advance_clock(16.0).unwrap();
        let b = e.cancel_batch(&cancelled).unwrap();
        assert_eq!(b["status"], "cancelling");
        (gone, cancelled, e.now())
    };
    let e = Emulator::open(slow(), dir.path()).unwrap();
    assert!(e.now() >= now, "time went back across the restart");
    assert!(e.file(&gone).is_err());
    let b = e.get_batch(&cancelled).unwrap();
    assert_eq!(b["status"], "cancelled");
    assert_eq!(b["request_counts"]["completed"], 1);
    let errors = content(&e, &b["error_file_id"]);
    assert_eq!(errors.len(), 2, "the two lines cut off by the cancel");
    assert_eq!(e.stats().unwrap()["files_present"], 3);
}

#[test]
fn in_memory_writes_nothing() {
    let e = Emulator::new(slow());
    let file = upload(&e, input(2));
    create(&e, &file);
    assert!(e.journal.is_none());
    assert_eq!(e.stats().unwrap()["batches"], 1);
}

#[test]
fn time_never_goes_back_behind_the_floor() {
    // The system clock now reads 100; the previous run wrote down 150 with
    // an offset of 20: the new offset makes now() read 150.
    assert_eq!(resumed_offset(100.0, 20.0, 150.0), 50.0);
    // Normal case: real time moved on, the offset stays.
    assert_eq!(resumed_offset(200.0, 20.0, 150.0), 20.0);
}

fn message_input(prefix: &str, n: usize) -> crate::emulator::anthropic::batches::Input {
    let requests: Vec<Value> = (0..n)
        .map(|i| {
            json!({"custom_id": format!("{prefix}-{i}"), "params": {"model": "claude-haiku-4-5",
            "max_tokens": 16, "messages": [{"role": "user", "content": format!("hello {i}")}]}})
        })
        .collect();
    crate::emulator::anthropic::batches::parse_create(
        &json!({ "requests": requests }),
        100,
        &|_| true,
    )
    .unwrap()
}

#[test]
fn a_message_batch_survives_a_restart_and_its_deletion_too() {
    let dir = tempfile::tempdir().unwrap();
    let (running, ended) = {
        let e = Emulator::open(slow(), dir.path()).unwrap();
        let running = e.create_message_batch(message_input("run", 3)).unwrap().id;
        let ended = e.create_message_batch(message_input("end", 1)).unwrap().id;
        e.advance_clock(100.0).unwrap();
        assert!(e.message_batch(&ended).unwrap().status.is_terminal());
        e.delete_message_batch(&ended).unwrap();
        // The OpenAI side does not see Message Batches.
        assert!(e.get_batch(&running).is_err());
        assert_eq!(e.list_batches(20, None).unwrap()["data"], json!([]));
        (running, ended)
    };
    let e = Emulator::open(slow(), dir.path()).unwrap();
    assert!(
        e.message_batch(&ended).is_err(),
        "a deleted batch came back"
    );
    let view = e.message_batch(&running).unwrap();
    assert!(view.status.is_terminal(), "{view:?}");
    assert_eq!((view.requests, view.succeeded), (3, 3));
    let results = e.message_batch_results(&running).unwrap().unwrap();
    let lines: Vec<Value> = std::str::from_utf8(&results)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert!(lines.iter().all(|l| l["result"]["type"] == "succeeded"));
    assert_eq!(
        e.stats().unwrap()["executed_more_than_once"],
        0,
        "a request ran twice"
    );
}

/// The list pages as Anthropic's does: newest first, `after_id` to older
/// batches, `before_id` to newer ones, `has_more` in the direction paged.
#[test]
fn message_batches_page_both_ways_newest_first() {
    let e = Emulator::new(slow());
    let made: Vec<String> = (0..5)
        .map(|i| {
            e.create_message_batch(message_input(&format!("b{i}"), 1))
                .unwrap()
                .id
        })
        .collect();
    let newest_first: Vec<&String> = made.iter().rev().collect();
    let ids = |(page, more): (Vec<crate::emulator::anthropic::batches::View>, bool)| {
        (page.into_iter().map(|v| v.id).collect::<Vec<_>>(), more)
    };
    let page = ids(e.list_message_batches(2, None, None).unwrap());
    assert_eq!(
        page,
        (vec![newest_first[0].clone(), newest_first[1].clone()], true)
    );
    let page = ids(e
        .list_message_batches(2, None, Some(newest_first[1]))
        .unwrap());
    assert_eq!(
        page,
        (vec![newest_first[2].clone(), newest_first[3].clone()], true)
    );
    let page = ids(e
        .list_message_batches(2, None, Some(newest_first[3]))
        .unwrap());
    assert_eq!(page, (vec![newest_first[4].clone()], false));
    let page = ids(e
        .list_message_batches(2, Some(newest_first[4]), None)
        .unwrap());
    assert_eq!(
        page,
        (vec![newest_first[2].clone(), newest_first[3].clone()], true)
    );
    let page = ids(e
        .list_message_batches(2, Some(newest_first[2]), None)
        .unwrap());
    assert_eq!(
        page,
        (
            vec![newest_first[0].clone(), newest_first[1].clone()],
            false
        )
    );
    let page = ids(e
        .list_message_batches(2, None, Some("msgbatch_unknown"))
        .unwrap());
    assert_eq!(page, (vec![], false));
}
