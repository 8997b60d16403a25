//! PostgreSQL, against a real server: the URL of a throwaway one is in
//! `FERRY_TEST_PG_URL` (`.ci/run` starts it). Without it these tests fail;
//! they never skip. Each test works in a database of its own.

use ferry::store::pg::{self, PgError, migrate};
use tokio_postgres::NoTls;

/// A new, empty database on the test server; its config.
async fn fresh_database() -> tokio_postgres::Config {
    let url = std::env::var("FERRY_TEST_PG_URL").unwrap_or_else(|_| {
        panic!(
            "FERRY_TEST_PG_URL is not set: these tests need a PostgreSQL server. \
             `bash .ci/run` starts one; by hand: `bash .ci/postgres --keep` and export the URL it prints"
        )
    });
    let admin = pg::parse_url(&url).expect("FERRY_TEST_PG_URL");
    let (client, conn) = admin
        .connect(NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot reach PostgreSQL at FERRY_TEST_PG_URL: {e}"));
    tokio::spawn(conn);
    let name = format!("ferry_test_{}", rand::random::<u64>());
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
    let mut config = admin;
    config.dbname(&name);
    config
}

#[tokio::test]
async fn migrations_run_once_even_when_nodes_start_together() {
    let pool = pg::pool(fresh_database().await, 8).unwrap();
    // Four nodes starting at once: one applies the schema, the others wait
    // on the advisory lock and find it done.
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut client = pool.get().await.unwrap();
                migrate::migrate(&mut client).await
            })
        })
        .collect();
    let mut applied = Vec::new();
    for r in runs {
        applied.push(r.await.unwrap().unwrap().applied);
    }
    let known = migrate::known_version();
    let all: Vec<i32> = (1..=known).collect();
    assert_eq!(
        applied.iter().filter(|a| **a == all).count(),
        1,
        "{applied:?}"
    );
    assert_eq!(
        applied.iter().filter(|a| a.is_empty()).count(),
        3,
        "{applied:?}"
    );

    let client = pool.get().await.unwrap();
    let versions: Vec<i32> = client
        .query("SELECT version FROM ferry_schema ORDER BY version", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, all);
    for table in [
        "requests",
        "bodies",
        "results",
        "queue",
        "queue_counters",
        "batches",
        "members",
        "outbox",
        "leases",
    ] {
        let n: i64 = client
            .query_one(
                "SELECT count(*) FROM information_schema.tables WHERE table_name = $1",
                &[&table],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "table {table}");
    }
    // Starting again is a no-op.
    let mut client = pool.get().await.unwrap();
    let again = migrate::migrate(&mut client).await.unwrap();
    assert_eq!((again.from, again.applied), (known, vec![]));
}

#[tokio::test]
async fn a_schema_newer_than_this_build_is_refused() {
    let pool = pg::pool(fresh_database().await, 2).unwrap();
    let mut client = pool.get().await.unwrap();
    // A newer build ran first and added a migration this one does not know.
    let mut newer: Vec<(i32, &str)> = migrate::MIGRATIONS.to_vec();
    let next = migrate::known_version() + 1;
    newer.push((next, "CREATE TABLE from_the_future (x int)"));
    migrate::migrate_with(&mut client, &newer).await.unwrap();
    let err = migrate::migrate(&mut client).await.unwrap_err();
    assert!(
        matches!(err, PgError::SchemaTooNew { found, known } if found == next && known == next - 1),
        "{err}"
    );
    assert!(
        err.to_string().contains("newer than this Ferry knows"),
        "{err}"
    );
}

#[tokio::test]
async fn a_bad_url_is_refused_without_echoing_it() {
    let err = pg::parse_url("postgres://user:s3cret@host:notaport/db").unwrap_err();
    assert!(!err.to_string().contains("s3cret"), "{err}");
}
