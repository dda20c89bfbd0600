//! Settlements held back by an outage of the shared store.
//!
//! With the PostgreSQL ledger, a draw can be reserved and forwarded, and the
//! upstream can accept it, and then the store can be away when the gate comes
//! to settle it (a failover, a network cut). The upstream's answer has decided
//! the settlement (a charge and the task's registration, or a void), but the
//! store cannot take it. The gate keeps it here and writes it once the store
//! is back (`gate::settle_owed`). An idempotent submit's answer, which the
//! store could not take either, is held with it and stored after it.
//!
//! Each held settlement is also kept in `held-settlements.json` in the gate's
//! data directory, synced before the client is answered. So a gate that stops
//! or crashes before the store is back writes it at its next start, before it
//! resolves its own reservations left pending (which it spares: see
//! `Ledger::open_sparing`); without the file, `ledger.pending_policy` would
//! decide instead, charging the reservation without registering the task, or
//! voiding a draw the upstream ran. The file is rewritten whole on every
//! change (write, sync, rename, sync the directory): it holds only what an
//! outage left in flight, and it is removed when nothing is held.

use crate::ledger::{Ledger, LedgerError, Settled};
use crate::points::{KeyId, Points, TransferId};
use crate::tasks::TaskRecord;
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The file's name in the data directory.
pub const FILE: &str = "held-settlements.json";

/// The one ledger transition a settlement makes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decided {
    /// Charge `points`, registering the accepted task with it.
    Commit {
        /// What the client is charged.
        points: Points,
        /// The accepted task, registered in the same write.
        task: Option<Box<TaskRecord>>,
    },
    /// Release the reservation.
    Void,
}

impl Decided {
    /// The audit log's name for the transition.
    pub fn transition(&self) -> &'static str {
        match self {
            Decided::Commit { .. } => "commit",
            Decided::Void => "void",
        }
    }

    /// Applies the transition to the ledger's chain `id`.
    pub async fn write(&self, ledger: &Ledger, id: &TransferId) -> Result<Settled, LedgerError> {
        match self {
            Decided::Commit {
                points,
                task: Some(rec),
            } => ledger.commit_task(id, *points, rec).await,
            Decided::Commit { points, task: None } => ledger.commit(id, *points).await,
            Decided::Void => ledger.void(id).await,
        }
    }
}

/// A settlement the shared store did not take in time.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Owed {
    /// The reservation's chain.
    pub transfer: TransferId,
    /// The key it was reserved on.
    pub key: KeyId,
    /// The key's name, for the audit record written with it.
    pub key_name: String,
    /// What the upstream's answer decided.
    pub how: Decided,
    /// What the reservation holds (what a void releases).
    pub reserved: Points,
    /// The client's answer, when it sent an `Idempotency-Key` and the store
    /// could not take the answer either: stored once the settlement is
    /// written, so that a retry with the key gets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<HeldAnswer>,
    /// Whether the settlement itself is written (only the answer is left).
    #[serde(default)]
    pub written: bool,
}

/// An idempotent submit's answer, held with its settlement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeldAnswer {
    /// The client's `Idempotency-Key`.
    pub idem_key: String,
    /// HTTP status.
    pub status: u16,
    /// The body (the upstream's JSON, as the client got it).
    pub body: String,
}

/// The file's contents.
#[derive(Serialize, Deserialize)]
struct Body {
    held: Vec<Owed>,
}

/// Errors reading the file at start.
#[derive(Debug, thiserror::Error)]
pub enum HeldError {
    /// The file exists but cannot be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not what the gate writes.
    #[error("{path} is not a list of held settlements ({source}); move it away only after settling what it lists by hand")]
    Parse {
        /// The file.
        path: String,
        /// The cause.
        source: serde_json::Error,
    },
}

/// The held settlements, by transfer id, and their file.
pub struct Held {
    by_id: DashMap<TransferId, Owed>,
    file: PathBuf,
    /// Serializes rewrites of the file. A plain mutex, taken on a blocking
    /// thread only (never across an `.await`); each rewrite takes its snapshot
    /// of `by_id` under it, so the last rewrite always holds the latest state,
    /// whatever order the callers' threads run in.
    write: Mutex<()>,
}

impl Held {
    /// Opens `data_dir`'s file: what an earlier run of the gate held and did
    /// not get to write. No file: nothing held.
    pub fn open(data_dir: &Path) -> Result<Held, HeldError> {
        let file = data_dir.join(FILE);
        let by_id = DashMap::new();
        match std::fs::read(&file) {
            Ok(bytes) => {
                let body: Body =
                    serde_json::from_slice(&bytes).map_err(|source| HeldError::Parse {
                        path: file.display().to_string(),
                        source,
                    })?;
                for o in body.held {
                    by_id.insert(o.transfer.clone(), o);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(HeldError::Read {
                    path: file.display().to_string(),
                    source,
                })
            }
        }
        Ok(Held {
            by_id,
            file,
            write: Mutex::new(()),
        })
    }

    /// How many settlements are held.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The held transfers' ids, oldest first (ids sort by creation time).
    pub fn ids(&self) -> Vec<TransferId> {
        let mut ids: Vec<TransferId> = self.by_id.iter().map(|e| e.key().clone()).collect();
        ids.sort();
        ids
    }

    /// The settlement held for `id`.
    pub fn get(&self, id: &TransferId) -> Option<Owed> {
        self.by_id.get(id).map(|e| e.value().clone())
    }

    /// Holds `owed` and makes it durable. An error means it is held in memory
    /// only: a restart would leave its reservation to `pending_policy`.
    pub async fn hold(self: &Arc<Self>, owed: Owed) -> std::io::Result<()> {
        self.by_id.insert(owed.transfer.clone(), owed);
        self.persist().await
    }

    /// Adds the client's answer to `id`'s held settlement. `Ok(false)`: it is
    /// not held (any more).
    pub async fn attach_answer(
        self: &Arc<Self>,
        id: &TransferId,
        answer: HeldAnswer,
    ) -> std::io::Result<bool> {
        self.change(id, |o| o.answer = Some(answer)).await
    }

    /// Records that `id`'s settlement is written and only its answer is left.
    pub async fn mark_written(self: &Arc<Self>, id: &TransferId) -> std::io::Result<()> {
        self.change(id, |o| o.written = true).await.map(drop)
    }

    /// Changes `id`'s entry and makes that durable; `Ok(false)` if it is not held.
    async fn change(
        self: &Arc<Self>,
        id: &TransferId,
        f: impl FnOnce(&mut Owed),
    ) -> std::io::Result<bool> {
        match self.by_id.get_mut(id) {
            Some(mut o) => f(&mut o),
            None => return Ok(false),
        }
        self.persist().await.map(|()| true)
    }

    /// Forgets `id` (written, or resolved by the ledger otherwise). An error
    /// leaves it in the file: the next start tries it again, and the ledger
    /// replays or refuses a settlement it already holds.
    pub async fn release(self: &Arc<Self>, id: &TransferId) -> std::io::Result<()> {
        self.by_id.remove(id);
        self.persist().await
    }

    /// As [`Held::release`], unless an answer was attached to `id` since the
    /// caller read it (`answered`: whether it had one then): that answer is
    /// still to be stored. Returns whether it was released.
    pub async fn release_unless_answered(
        self: &Arc<Self>,
        id: &TransferId,
        answered: bool,
    ) -> std::io::Result<bool> {
        if self
            .by_id
            .remove_if(id, |_, o| o.answer.is_some() == answered)
            .is_none()
        {
            return Ok(false);
        }
        self.persist().await.map(|()| true)
    }

    async fn persist(self: &Arc<Self>) -> std::io::Result<()> {
        let me = Arc::clone(self);
        tokio::task::spawn_blocking(move || me.rewrite())
            .await
            .map_err(std::io::Error::other)?
    }

    fn rewrite(&self) -> std::io::Result<()> {
        let _one_at_a_time = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let mut held: Vec<Owed> = self.by_id.iter().map(|e| e.value().clone()).collect();
        held.sort_by(|a, b| a.transfer.cmp(&b.transfer));
        let dir = self.file.parent().unwrap_or(Path::new("."));
        if held.is_empty() {
            match std::fs::remove_file(&self.file) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            }
        } else {
            let tmp = self.file.with_extension("json.tmp");
            let bytes = serde_json::to_vec_pretty(&Body { held }).map_err(std::io::Error::other)?;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_data()?;
            drop(f);
            std::fs::rename(&tmp, &self.file)?;
        }
        // The rename (or the removal) is durable only once the directory is.
        std::fs::File::open(dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owed(id: &str, how: Decided) -> Owed {
        Owed {
            transfer: TransferId(id.into()),
            key: KeyId("k_1".into()),
            key_name: "one".into(),
            how,
            reserved: Points(12),
            answer: None,
            written: false,
        }
    }

    #[tokio::test]
    async fn what_is_held_survives_a_reopen_and_the_file_goes_when_nothing_is() {
        let dir = tempfile::tempdir().unwrap();
        let held = Arc::new(Held::open(dir.path()).unwrap());
        assert!(held.is_empty());
        held.hold(owed("b", Decided::Void)).await.unwrap();
        held.hold(owed(
            "a",
            Decided::Commit {
                points: Points(12),
                task: None,
            },
        ))
        .await
        .unwrap();
        let again = Held::open(dir.path()).unwrap();
        assert_eq!(
            again.ids(),
            [TransferId("a".into()), TransferId("b".into())]
        );
        assert!(matches!(
            again.get(&TransferId("a".into())).unwrap().how,
            Decided::Commit {
                points: Points(12),
                task: None
            }
        ));
        held.release(&TransferId("a".into())).await.unwrap();
        assert_eq!(
            Held::open(dir.path()).unwrap().ids(),
            [TransferId("b".into())]
        );
        held.release(&TransferId("b".into())).await.unwrap();
        assert!(!dir.path().join(FILE).exists());
        assert!(Held::open(dir.path()).unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_answer_attached_after_a_look_keeps_the_settlement_until_it_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let held = Arc::new(Held::open(dir.path()).unwrap());
        let id = TransferId("a".into());
        held.hold(owed("a", Decided::Void)).await.unwrap();
        let seen = held.get(&id).unwrap();
        let answer = HeldAnswer {
            idem_key: "k1".into(),
            status: 200,
            body: "{\"code\":0}".into(),
        };
        assert!(held.attach_answer(&id, answer.clone()).await.unwrap());
        held.mark_written(&id).await.unwrap();
        let again = Held::open(dir.path()).unwrap().get(&id).unwrap();
        assert!(again.written);
        assert_eq!(again.answer.unwrap().idem_key, "k1");
        // Read before the answer came: not released.
        let released = held
            .release_unless_answered(&id, seen.answer.is_some())
            .await
            .unwrap();
        assert!(!released);
        assert!(held.release_unless_answered(&id, true).await.unwrap());
        assert!(!held.attach_answer(&id, answer).await.unwrap());
        assert!(!dir.path().join(FILE).exists());
    }

    #[test]
    fn a_file_that_cannot_be_read_stops_the_start() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), b"{\"held\": [").unwrap();
        let e = Held::open(dir.path()).err().expect("refused");
        assert!(e.to_string().contains(FILE), "{e}");
    }
}
