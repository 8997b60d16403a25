//! Events between the nodes of a cluster, over PostgreSQL's LISTEN/NOTIFY.
//!
//! A node that stores something another node may be waiting for publishes
//! an event after the transaction commits: the requests of an ingested
//! slice that reached a terminal status (one notification per slice, never
//! one per request, never from an intake transaction), a queue that gained
//! requests, a manual flush, webhook deliveries that became due. Every node
//! listens on one dedicated connection and hands what it hears to its own
//! waiters and loops.
//!
//! NOTIFY is not a durable queue: a listener that reconnects has missed
//! whatever was sent meanwhile. So each (re)connection is reported as
//! [`Event::Resync`], on which a node re-reads every caller it holds; and
//! held callers re-read on a slow safety timer besides. A lost notification
//! delays an answer by seconds at worst, never loses it.

use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{broadcast, watch};
use tokio_postgres::{AsyncMessage, NoTls};

use super::PgError;

/// The one channel every node listens on.
pub const CHANNEL: &str = "ferry_events";

/// PostgreSQL refuses payloads of 8,000 bytes or more; a little margin.
const MAX_PAYLOAD: usize = 7_900;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Requests that reached a terminal status: their waiters re-read them.
    Terminal(Vec<u64>),
    /// A queue of this upstream gained requests: its flush loop re-checks
    /// the thresholds.
    Queued(String),
    /// An operator asked for a flush (`None`: every upstream).
    Flush(Option<String>),
    /// Webhook deliveries became due.
    Outbox,
    /// This node's listener (re)connected and may have missed events: every
    /// local waiter re-reads its request.
    Resync,
}

/// The payloads that carry `event`, each under PostgreSQL's limit: a long
/// list of terminal requests is split, anything else is one payload.
/// `Resync` is local to a node and never sent.
pub fn encode(event: &Event) -> Vec<String> {
    match event {
        Event::Terminal(ids) => {
            let mut out = Vec::new();
            let mut cur = String::from("t");
            for id in ids {
                let id = id.to_string();
                if cur.len() + id.len() + 1 > MAX_PAYLOAD {
                    out.push(std::mem::replace(&mut cur, String::from("t")));
                }
                if cur.len() > 1 {
                    cur.push(',');
                }
                cur.push_str(&id);
            }
            if cur.len() > 1 {
                out.push(cur);
            }
            out
        }
        Event::Queued(upstream) => vec![format!("q{upstream}")],
        Event::Flush(Some(upstream)) => vec![format!("f{upstream}")],
        Event::Flush(None) => vec!["F".to_owned()],
        Event::Outbox => vec!["o".to_owned()],
        Event::Resync => Vec::new(),
    }
}

/// Reads a payload back; `None` for one this build does not know (sent by a
/// newer node during an upgrade), which is ignored.
pub fn decode(payload: &str) -> Option<Event> {
    let mut chars = payload.chars();
    let kind = chars.next()?;
    let rest = chars.as_str();
    match kind {
        't' => rest
            .split(',')
            .map(|id| id.parse().ok())
            .collect::<Option<Vec<u64>>>()
            .map(Event::Terminal),
        'q' if !rest.is_empty() => Some(Event::Queued(rest.to_owned())),
        'f' if !rest.is_empty() => Some(Event::Flush(Some(rest.to_owned()))),
        'F' if rest.is_empty() => Some(Event::Flush(None)),
        'o' if rest.is_empty() => Some(Event::Outbox),
        _ => None,
    }
}

/// Sends `event` to every listening node (this one included). Call it after
/// the transaction that stored what it announces has committed: a
/// notification sent inside one is delivered only at its commit, and would
/// make every intake transaction wait on the notification queue's lock.
pub async fn publish(client: &tokio_postgres::Client, event: &Event) -> Result<(), PgError> {
    for payload in encode(event) {
        client
            .execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload])
            .await?;
    }
    Ok(())
}

/// Listens on [`CHANNEL`] until `shutdown`, on a connection of its own
/// (LISTEN is per session, so a pooled one would not do), and sends every
/// event heard to `tx`. A lost connection is made again with backoff; each
/// connection, the first included, is announced as [`Event::Resync`].
pub async fn listen(
    config: tokio_postgres::Config,
    tx: broadcast::Sender<Event>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut failures = 0u32;
    loop {
        let session = async {
            let (client, mut conn) = config.connect(NoTls).await?;
            let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx)).boxed();
            // The connection is driven by polling `messages`, so the LISTEN
            // runs beside it.
            let statement = format!("LISTEN {CHANNEL}");
            {
                let listen = client.batch_execute(&statement);
                tokio::pin!(listen);
                loop {
                    tokio::select! {
                        r = &mut listen => { r?; break; }
                        m = messages.next() => match m {
                            Some(Ok(m)) => forward(&tx, m),
                            Some(Err(e)) => return Err(PgError::from(e)),
                            None => return Err(PgError::Closed),
                        },
                    }
                }
            }
            failures = 0;
            tracing::info!(channel = CHANNEL, "listening for cluster events");
            let _ = tx.send(Event::Resync);
            // `client` lives as long as the session: dropping it would close
            // the connection.
            while let Some(m) = messages.next().await {
                forward(&tx, m?);
            }
            drop(client);
            Err::<(), PgError>(PgError::Closed)
        };
        let outcome = tokio::select! {
            r = session => r,
            _ = shutdown.changed() => return,
        };
        let wait = crate::upstream::backoff(
            failures,
            Duration::from_millis(200),
            Duration::from_secs(10),
            rand::random(),
        );
        failures = failures.saturating_add(1);
        if let Err(e) = outcome {
            tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "the cluster event listener lost its connection; held callers re-read on reconnect");
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
    }
}

fn forward(tx: &broadcast::Sender<Event>, message: AsyncMessage) {
    if let AsyncMessage::Notification(n) = message
        && n.channel() == CHANNEL
    {
        match decode(n.payload()) {
            // No receiver yet (start-up) is not an error.
            Some(event) => drop(tx.send(event)),
            None => tracing::debug!(payload = n.payload(), "an unknown cluster event; ignored"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip() {
        for e in [
            Event::Terminal(vec![1, 2, u64::MAX]),
            Event::Queued("openai".into()),
            Event::Flush(Some("kimi".into())),
            Event::Flush(None),
            Event::Outbox,
        ] {
            let payloads = encode(&e);
            assert_eq!(payloads.len(), 1, "{e:?}");
            assert_eq!(decode(&payloads[0]), Some(e));
        }
        assert!(encode(&Event::Resync).is_empty());
        assert!(encode(&Event::Terminal(Vec::new())).is_empty());
    }

    #[test]
    fn a_long_terminal_list_is_split_under_the_payload_limit() {
        let ids: Vec<u64> = (u64::MAX - 5_000..u64::MAX).collect();
        let payloads = encode(&Event::Terminal(ids.clone()));
        assert!(payloads.len() > 1);
        let mut back = Vec::new();
        for p in &payloads {
            assert!(p.len() <= MAX_PAYLOAD, "{}", p.len());
            match decode(p) {
                Some(Event::Terminal(part)) => back.extend(part),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(back, ids);
    }

    #[test]
    fn unknown_or_malformed_payloads_are_not_events() {
        for p in ["", "x", "t", "t1,,2", "t-1", "q", "o1", "Fx", "f"] {
            assert_eq!(decode(p), None, "{p:?}");
        }
    }
}
