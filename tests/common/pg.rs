//! PostgreSQL for the integration tests: a fresh database per stack on the
//! server in `FERRY_TEST_PG_URL` (`.ci/run` starts one). Without it the
//! tests that need it fail; they never skip.

use std::time::Duration;

/// The variable the test server's URL is read from.
pub const SERVER_ENV: &str = "FERRY_TEST_PG_URL";
/// The variable a Ferry under test reads its database URL from
/// (`storage.url_env`).
pub const DB_ENV: &str = "FERRY_TEST_DATABASE_URL";

/// The test server's URL; panics with what to do when it is not set.
pub fn server_url() -> String {
    std::env::var(SERVER_ENV).unwrap_or_else(|_| {
        panic!(
            "{SERVER_ENV} is not set: these tests need a PostgreSQL server. \
             `bash .ci/run` starts one; by hand: `bash .ci/postgres --keep` and export the URL it prints"
        )
    })
}

/// Creates an empty database on the test server; returns its URL.
pub fn fresh_database() -> String {
    let url = server_url();
    let name = format!("ferry_test_{:016x}", rand::random::<u64>());
    let admin = url.clone();
    let create = format!("CREATE DATABASE {name}");
    // Tests are sync and async alike: a runtime of its own, on a thread.
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let (client, conn) = tokio::time::timeout(
                Duration::from_secs(30),
                admin
                    .parse::<tokio_postgres::Config>()
                    .expect("FERRY_TEST_PG_URL")
                    .connect(tokio_postgres::NoTls),
            )
            .await
            .expect("PostgreSQL did not answer within 30 s")
            .unwrap_or_else(|e| panic!("cannot reach PostgreSQL at {SERVER_ENV}: {e}"));
            let conn = tokio::spawn(conn);
            client
                .batch_execute(&create)
                .await
                .expect("create database");
            drop(client);
            let _ = conn.await;
        });
    })
    .join()
    .expect("create database");
    with_dbname(&url, &name)
}

/// `url` with its database replaced by `name`.
fn with_dbname(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    let base = match base[after_scheme..].find('/') {
        Some(i) => &base[..after_scheme + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}
