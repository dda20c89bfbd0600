//! Reading the log: `query`, `tail`, and a follower for `tail -f`.
//!
//! Readers only ever look at complete lines (ending in `\n`); a partial last line is
//! either being written or was torn by a crash, and is skipped. Readers do not check
//! the chain: that is `verify`'s job.

use super::{list_files, AuditError, LogFile};
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::collections::VecDeque;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Which records [`query`] returns. All conditions must hold.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// The record's `key_id` equals this.
    pub key: Option<String>,
    /// `ts >= since`.
    pub since: Option<DateTime<Utc>>,
    /// `ts < until`.
    pub until: Option<DateTime<Utc>>,
    /// The record's `decision` equals this.
    pub decision: Option<String>,
    /// Only the newest N matches (still returned oldest first).
    pub limit: Option<usize>,
}

impl Filter {
    fn matches(&self, rec: &Value) -> bool {
        let field = |name: &str| rec.get(name).and_then(Value::as_str);
        if let Some(key) = &self.key {
            if field("key_id") != Some(key.as_str()) {
                return false;
            }
        }
        if let Some(decision) = &self.decision {
            if field("decision") != Some(decision.as_str()) {
                return false;
            }
        }
        if self.since.is_some() || self.until.is_some() {
            let Some(ts) = field("ts")
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&Utc))
            else {
                return false;
            };
            if self.since.is_some_and(|s| ts < s) || self.until.is_some_and(|u| ts >= u) {
                return false;
            }
        }
        true
    }
}

/// The records in `dir` that match `filter`, in log order. Reads every file (the
/// time bounds are checked per record, so a clock that jumped back cannot hide
/// anything); lines that are not JSON are skipped.
pub fn query(dir: &Path, filter: &Filter) -> Result<Vec<Value>, AuditError> {
    if filter.limit == Some(0) {
        return Ok(Vec::new());
    }
    let mut out: VecDeque<Value> = VecDeque::new();
    for f in list_files(dir)? {
        let bytes = std::fs::read(&f.path).map_err(|e| AuditError::io(&f.path, e))?;
        for line in complete_lines(&bytes) {
            let Ok(rec) = serde_json::from_slice::<Value>(line) else {
                continue;
            };
            if !filter.matches(&rec) {
                continue;
            }
            out.push_back(rec);
            if filter.limit.is_some_and(|n| out.len() > n) {
                out.pop_front();
            }
        }
    }
    Ok(out.into())
}

/// Whether the log in `dir` holds a `ledger` record of `transition` for
/// `request_id`. Files last written before `written_after` cannot hold it and are
/// not read; the others are searched for the id before any line is parsed, so
/// the cost is one read of the recent files.
pub fn has_ledger_record(
    dir: &Path,
    request_id: &str,
    transition: &str,
    written_after: std::time::SystemTime,
) -> Result<bool, AuditError> {
    for f in list_files(dir)? {
        let meta = std::fs::metadata(&f.path).map_err(|e| AuditError::io(&f.path, e))?;
        if meta.modified().is_ok_and(|m| m < written_after) {
            continue;
        }
        let bytes = std::fs::read(&f.path).map_err(|e| AuditError::io(&f.path, e))?;
        let text = String::from_utf8_lossy(&bytes);
        if !text.contains(request_id) {
            continue;
        }
        for line in complete_lines(&bytes) {
            let Ok(rec) = serde_json::from_slice::<Value>(line) else {
                continue;
            };
            let field = |name: &str| rec.get(name).and_then(Value::as_str);
            if field("event") == Some("ledger")
                && field("request_id") == Some(request_id)
                && field("transition") == Some(transition)
            {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// The last `n` complete lines across the files of `dir`, oldest first, without
/// their newlines. Reads files backwards in blocks, so it is cheap on large logs.
pub fn tail(dir: &Path, n: usize) -> Result<Vec<String>, AuditError> {
    let mut out: Vec<String> = Vec::new();
    if n == 0 {
        return Ok(out);
    }
    for f in list_files(dir)?.iter().rev() {
        let need = n - out.len();
        let mut lines = last_lines(&f.path, need)?;
        lines.reverse();
        out.extend(lines);
        if out.len() >= n {
            break;
        }
    }
    out.truncate(n);
    out.reverse();
    Ok(out)
}

/// Up to `n` last complete lines of one file, oldest first.
fn last_lines(path: &Path, n: usize) -> Result<Vec<String>, AuditError> {
    const BLOCK: u64 = 64 * 1024;
    let io = |e| AuditError::io(path, e);
    let mut file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let mut start = len;
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let newlines = buf.iter().filter(|b| **b == b'\n').count();
        // n complete lines need n+1 newlines in view (or the start of the file).
        if newlines > n || start == 0 {
            break;
        }
        let from = start.saturating_sub(BLOCK);
        let mut block = vec![0u8; (start - from) as usize];
        file.seek(SeekFrom::Start(from)).map_err(io)?;
        file.read_exact(&mut block).map_err(io)?;
        block.extend_from_slice(&buf);
        buf = block;
        start = from;
    }
    let mut lines: Vec<&[u8]> = complete_lines(&buf).collect();
    if start > 0 && !lines.is_empty() {
        // The first piece may begin mid-line.
        lines.remove(0);
    }
    let skip = lines.len().saturating_sub(n);
    Ok(lines[skip..]
        .iter()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect())
}

/// Complete lines (without `\n`) of `bytes`; a trailing partial line is left out.
fn complete_lines(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    bytes
        .split_inclusive(|b| *b == b'\n')
        .filter_map(|l| l.strip_suffix(b"\n"))
}

/// Follows the log like `tail -f`: each [`Follower::poll`] returns the complete
/// lines appended since the previous one, moving on to newer files as the writer
/// rotates. Polling is the caller's business (the admin API sleeps between polls).
#[derive(Debug)]
pub struct Follower {
    dir: PathBuf,
    /// File number and byte offset of the next unread line; `None` before any file.
    at: Option<(u64, u64)>,
}

impl Follower {
    /// Start at the current end of the log: only lines written later are returned.
    pub fn from_end(dir: &Path) -> Result<Follower, AuditError> {
        let at = match list_files(dir)?.last() {
            None => None,
            Some(f) => {
                let bytes = std::fs::read(&f.path).map_err(|e| AuditError::io(&f.path, e))?;
                let complete = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1);
                Some((f.number, complete as u64))
            }
        };
        Ok(Follower {
            dir: dir.to_path_buf(),
            at,
        })
    }

    /// Complete lines appended since the last poll, oldest first.
    pub fn poll(&mut self) -> Result<Vec<String>, AuditError> {
        let files = list_files(&self.dir)?;
        let mut out = Vec::new();
        let todo: Vec<&LogFile> = match self.at {
            None => files.iter().collect(),
            Some((number, _)) => files.iter().filter(|f| f.number >= number).collect(),
        };
        for f in todo {
            let offset = match self.at {
                Some((number, offset)) if number == f.number => offset,
                _ => 0,
            };
            let io = |e| AuditError::io(&f.path, e);
            let mut file = std::fs::File::open(&f.path).map_err(io)?;
            file.seek(SeekFrom::Start(offset)).map_err(io)?;
            let mut buf = Vec::new();
            file.read_to_end(&mut buf).map_err(io)?;
            let complete = buf.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1);
            out.extend(
                complete_lines(&buf[..complete]).map(|l| String::from_utf8_lossy(l).into_owned()),
            );
            // A partial tail stays unread; in a file that is not the newest it was
            // torn by a crash and the next file takes over.
            self.at = Some((f.number, offset + complete as u64));
        }
        Ok(out)
    }
}
