//! The embedded ledger's key records, read a page at a time on a read-only
//! connection of their own.
//!
//! Why a connection of its own: loading 100,000 keys at start, a replica-style
//! reload or an operator paging through them reads the whole `keys` table, and
//! that must neither hold one of the request path's reader connections for
//! that long nor fill their page caches with key records. Why pages: the
//! caller never needs every record in memory at once (the key cache keeps a
//! compact form of each), and 100,000 records as JSON text and as parsed
//! `KeyRecord`s cost some 70 MB together.

use super::LedgerError;
use crate::keys::KeyRecord;
use crate::points::KeyId;
use rusqlite::{params, Connection};
use std::sync::Mutex;

/// Page cache of this connection, in KiB: scans pass through once, so a small
/// cache does as well as a large one.
const CACHE_KIB: i64 = 256;

/// A read-only connection for paging through the `keys` table.
pub(super) struct KeyPages {
    /// A plain `std::sync::Mutex`: a page is one short query, done inline and
    /// never held across an `.await`.
    conn: Mutex<Connection>,
}

fn storage(e: impl std::fmt::Display) -> LedgerError {
    LedgerError::Storage(e.to_string())
}

impl KeyPages {
    /// Opens the connection; the ledger (and so the `keys` table) must already
    /// exist at `path`.
    pub(super) fn open(path: &std::path::Path) -> Result<KeyPages, LedgerError> {
        let conn = Connection::open(path).map_err(storage)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(storage)?;
        conn.pragma_update(None, "query_only", "ON")
            .map_err(storage)?;
        conn.pragma_update(None, "cache_size", -CACHE_KIB)
            .map_err(storage)?;
        Ok(KeyPages {
            conn: Mutex::new(conn),
        })
    }

    /// At most `limit` key records in id order, after `after` (from the first
    /// when `None`).
    pub(super) fn page(
        &self,
        after: Option<&KeyId>,
        limit: usize,
    ) -> Result<Vec<KeyRecord>, LedgerError> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| LedgerError::Storage("key page connection poisoned".into()))?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        // Every id sorts after '' (ids are never empty), so one statement
        // serves the first page too.
        let after = after.map_or("", |k| k.as_str());
        let mut stmt = conn
            .prepare_cached("SELECT record FROM keys WHERE id > ?1 ORDER BY id LIMIT ?2")
            .map_err(storage)?;
        let mut rows = stmt.query(params![after, limit]).map_err(storage)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(storage)? {
            let json = row.get_ref(0).map_err(storage)?.as_str().map_err(storage)?;
            out.push(super::sqlite::parse_key(json)?);
        }
        Ok(out)
    }
}
