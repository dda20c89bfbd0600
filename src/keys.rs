//! Client keys: the record the ledger's store keeps for each key. Budgets are not
//! here; they are ledger accounts, moved only by transfers.

use crate::points::KeyId;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// What the gate knows about one client key. The secret itself is never stored:
/// `secret_hash` is the hex SHA-256 of the whole secret (`czg_...`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// Public id, `key_` + 16 hex digits.
    pub id: KeyId,
    /// Human name (shown to the client as `companyName`).
    pub name: String,
    /// Hex SHA-256 of the secret.
    pub secret_hash: String,
    /// The first characters of the secret (`czg_ab12`), to recognise it in lists.
    pub secret_prefix: String,
    /// What the client pays per upstream point, in thousandths (1000 = 1.0).
    pub rate_milli: u64,
    /// Tasks in flight at most; `None` = no limit.
    pub concurrency: Option<u32>,
    /// Submits per second; `None` = no limit.
    pub rps: Option<u32>,
    /// Token-bucket burst for `rps`; `None` = same as `rps`.
    pub burst: Option<u32>,
    /// A disabled key is refused with 1001; its history stays.
    pub disabled: bool,
    /// After this time the key is refused with 1001.
    pub expires_at: Option<DateTime<Utc>>,
    /// Free text for operators.
    pub note: String,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}
