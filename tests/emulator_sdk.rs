//! Conformance with the official `openai` Python SDK: starts the emulator
//! in-process on 127.0.0.1:0 and runs tests/python/emulator_conformance.py
//! against it with the Python `common::python()` picks (`$FERRY_TEST_PYTHON`,
//! else the venv `.ci/run` makes, else `python3`). The SDK's strict
//! models parse every object the emulator sends; a missing SDK fails the test
//! (never skips it). The second test does the same for the Anthropic profile
//! with the official `anthropic` SDK (tests/python/emulator_anthropic.py).

mod common;

use std::process::Stdio;
use std::time::Duration;

use ferry::emulator::EmulatorConfig;

/// Exit status of a script when its SDK's import fails.
const MISSING_SDK: i32 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_sdk_conformance() {
    conformance(
        "openai",
        "emulator_conformance.py",
        |addr, key| {
            vec![
                ("OPENAI_BASE_URL", format!("http://{addr}/v1")),
                ("OPENAI_API_KEY", key.to_owned()),
            ]
        },
        &["OPENAI_ORG_ID", "OPENAI_PROJECT_ID"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_python_sdk_conformance() {
    conformance(
        "anthropic",
        "emulator_anthropic.py",
        |addr, key| {
            vec![
                ("ANTHROPIC_BASE_URL", format!("http://{addr}")),
                ("ANTHROPIC_API_KEY", key.to_owned()),
            ]
        },
        &["ANTHROPIC_AUTH_TOKEN"],
    )
    .await;
}

/// Runs `tests/python/<script>` with the `sdk` package against an emulator
/// in this process: `env` gives the SDK's own variables for the emulator's
/// address and key, `unset` the ones that would change how it calls.
async fn conformance(
    sdk: &str,
    script: &str,
    env: impl Fn(std::net::SocketAddr, &str) -> Vec<(&'static str, String)>,
    unset: &[&str],
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let key = "sdk-test-key";
    // Non-zero delays so the script sees every status while it moves the clock.
    let config = EmulatorConfig {
        api_key: key.to_owned(),
        validating_seconds: 5.0,
        per_request_seconds: 5.0,
        finalizing_seconds: 5.0,
        cancel_seconds: 5.0,
        ..Default::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(ferry::emulator::serve(listener, config, async {
        let _ = stopped.await;
    }));

    let python = common::python();
    let path = format!("{}/tests/python/{script}", env!("CARGO_MANIFEST_DIR"));
    let mut cmd = tokio::process::Command::new(&python);
    cmd.arg(path).env("EMULATOR_URL", format!("http://{addr}"));
    for (k, v) in env(addr, key) {
        cmd.env(k, v);
    }
    for k in unset {
        cmd.env_remove(k);
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run `{python}` ({e}): install Python 3 and `pip install {sdk}`, or set FERRY_TEST_PYTHON")
        });
    let output = tokio::time::timeout(Duration::from_secs(300), child.wait_with_output())
        .await
        .expect("the conformance script did not finish within 300 s")
        .unwrap();
    let _ = stop.send(());
    let _ = server.await;

    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.code() == Some(MISSING_SDK) {
        panic!(
            "the `{sdk}` Python package is not installed for `{python}`: run `pip install {sdk}` \
             (or point FERRY_TEST_PYTHON at a Python that has it)\n{stderr}"
        );
    }
    assert!(
        output.status.success(),
        "the conformance script failed ({})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        output.status
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
    eprintln!("{stdout}");
}
