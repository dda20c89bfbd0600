//! Key changes pushed by the shared store: each replica keeps one connection
//! that `LISTEN`s on [`CHANNEL`], and a trigger on `keys` (schema v6) notifies
//! it when any replica, or an operator's `psql`, changes a key. The gate's key
//! sync (`server::key_sync`) then reads what changed at once instead of at its
//! next poll, so that a disabled key's free reads, a new rate or new limits
//! apply on every replica within milliseconds.
//!
//! The push only makes the cache quicker; it is never needed for correctness:
//! the poll goes on beside it and catches anything sent while the connection
//! was down (a pooler in transaction mode, for one, does not pass `LISTEN`
//! through). Every (re)connection wakes the key sync once for that reason.

use super::KeyWatch;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio_postgres::{AsyncMessage, NoTls};

/// The notification channel. The payload is the schema of the `keys` table
/// that changed, so that gates in other schemas of the same database ignore it.
pub(super) const CHANNEL: &str = "chuzhan_gate_keys";

/// Backoff between attempts to get the listening connection back.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Listens for key changes for as long as the returned future runs,
/// reconnecting after any failure. Each change in this gate's schema, and each
/// (re)connection, wakes `watch.changed`.
pub(super) async fn listen(mut cfg: tokio_postgres::Config, instance: String, watch: &KeyWatch) {
    // Named so that operators (and the tests) can find it in pg_stat_activity.
    cfg.application_name(format!("chuzhan-gate keys {instance}"));
    // A dead peer is noticed within about a minute even when nothing is sent;
    // the poll covers the gap meanwhile.
    cfg.keepalives(true);
    cfg.keepalives_idle(Duration::from_secs(30));
    let mut retry = RETRY_MIN;
    loop {
        let outcome = listen_once(&cfg, watch, &mut retry).await;
        watch.connected.store(false, Relaxed);
        match outcome {
            Ok(()) => tracing::warn!("key change listener: the server closed the connection"),
            Err(e) => tracing::warn!(
                error = %e,
                retry_ms = retry.as_millis() as u64,
                "key change listener lost its connection; key changes from other replicas \
                 arrive by the poll until it is back"
            ),
        }
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(RETRY_MAX);
    }
}

/// One connection's life: connect, `LISTEN`, pass notifications on until the
/// connection fails. `retry` is reset once listening.
async fn listen_once(
    cfg: &tokio_postgres::Config,
    watch: &KeyWatch,
    retry: &mut Duration,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut conn) = cfg.connect(NoTls).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    // The connection is driven here; the client's queries below are answered
    // through it, and notifications come out of it.
    let drive = async move {
        loop {
            match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    let _ = tx.send(n.payload().to_owned());
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            }
        }
    };
    let work = async {
        let schema: Option<String> = client
            .query_one("SELECT current_schema()", &[])
            .await?
            .try_get(0)?;
        client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
        watch.connected.store(true, Relaxed);
        watch.connections.fetch_add(1, Relaxed);
        *retry = RETRY_MIN;
        // Whatever changed while this replica was not listening.
        watch.changed.notify_one();
        while let Some(payload) = rx.recv().await {
            if schema.as_deref() == Some(payload.as_str()) {
                watch.notifications.fetch_add(1, Relaxed);
                watch.changed.notify_one();
            }
        }
        Ok(())
    };
    tokio::select! {
        r = drive => r,
        r = work => r,
    }
}

#[cfg(test)]
mod tests {
    use super::CHANNEL;

    #[test]
    fn the_trigger_notifies_the_channel_the_listener_listens_on() {
        let trigger = super::super::postgres::MIGRATIONS
            .iter()
            .find(|m| m.contains("pg_notify"))
            .expect("a migration that makes the key-change trigger");
        assert!(trigger.contains(&format!("pg_notify('{CHANNEL}', TG_TABLE_SCHEMA)")));
    }
}
