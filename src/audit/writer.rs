//! The writer thread: recovery on open, batching, rotation, syncing, the head file.

use super::{
    canonical_hash_hex, file_name, list_files, parse_line, read_head, AuditError, Head, Health,
    LogFile, Msg, CURRENT_LINK, GENESIS, HEAD_FILE,
};
use crate::clock::SharedClock;
use chrono::{NaiveDate, SecondsFormat};
use serde_json::{Map, Value};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Messages taken from the queue per batch, at most; bounds flush latency.
const MAX_BATCH: usize = 4096;
/// Encoded bytes held (written or not) before they are written out and synced
/// mid-batch: bounds the copy of unsynced records kept to write them again.
const MAX_PENDING: usize = 1024 * 1024;
/// Attempts at a failing write once a shutdown has been asked for.
const RETRIES_WHEN_STOPPING: u32 = 3;
/// How far `head.json` may lag the synced log. Rewriting it (a new file and a
/// rename) after every batch cost more than the batch itself under load; it
/// is rewritten at most this often, on every flush, at shutdown, and once the
/// writer has been idle this long.
const HEAD_EVERY: Duration = Duration::from_millis(100);
/// The writer takes a batch at most this often (unless a flush asked for the last
/// one, or `sync_every` is 0). Records wait in the queue meanwhile; at this pace
/// the writer still takes up to `MAX_BATCH` records per batch, 2 million a second.
const BATCH_EVERY: Duration = Duration::from_millis(2);

/// What the writer needs from the config.
pub(super) struct Settings {
    pub dir: PathBuf,
    pub max_file_bytes: u64,
    pub rotate_daily: bool,
    /// Longest a written record waits for its `fdatasync` (see `AuditConfig`).
    pub sync_every: Duration,
}

/// A record's own fields as they follow `prev` in its line: `,"k":v` for each,
/// in the map's order. The writer puts them between `prev` and `hash` unchanged.
pub(super) fn encode_fields(rec: &Map<String, Value>) -> serde_json::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(256);
    for (k, v) in rec {
        out.push(b',');
        serde_json::to_writer(&mut out, k)?;
        out.push(b':');
        serde_json::to_writer(&mut out, v)?;
    }
    Ok(out)
}

/// The file being appended to.
struct Active {
    file: File,
    name: String,
    day: NaiveDate,
    /// Bytes in the file, written or not yet synced.
    len: u64,
    /// Bytes in the file that the last successful `fdatasync` covered.
    synced_len: u64,
    /// A sync failed: what follows `synced_len` may never reach the disk (Linux
    /// marks the pages it could not write clean and reports the error once, so
    /// syncing again would succeed without writing them). It is cut off and
    /// written again before the next sync.
    torn: bool,
}

/// The single owner of the log's files.
pub(super) struct Writer {
    s: Settings,
    clock: SharedClock,
    next_seq: u64,
    prev: String,
    /// `None` between a rotation and the first write to the new file.
    active: Option<Active>,
    /// Day of the file that `pending` goes to when `active` is `None`.
    next_day: Option<NaiveDate>,
    next_number: u64,
    /// Encoded whole lines not yet known to be on disk: written to the active
    /// file since its last good sync, or not written yet.
    pending: Vec<u8>,
    /// How much of `pending` is in the active file (after its `synced_len`).
    pending_written: usize,
    /// When the log was last synced.
    synced_at: Option<Instant>,
    head_written: Option<u64>,
    /// When `head.json` was last rewritten.
    head_at: Option<Instant>,
    /// Whether the last attempt to rewrite `head.json` failed (warned once).
    head_failing: bool,
    /// Whether the I/O path gave up (only after a stop was asked).
    gave_up: bool,
    /// The last `ts` written and the millisecond it names: the records of one
    /// millisecond share it.
    ts: (i64, String),
    /// The line being encoded, kept for its room.
    line: Vec<u8>,
    /// Told of every failed and successful attempt.
    health: Arc<Health>,
}

/// The newest complete record found on disk.
struct Tail {
    seq: u64,
    hash: String,
}

impl Writer {
    /// Find where the chain ends, repair a partial line by starting a new file, and
    /// note a head that promises more than the files hold.
    pub(super) fn recover(s: Settings, clock: SharedClock) -> Result<Writer, AuditError> {
        std::fs::create_dir_all(&s.dir).map_err(|e| AuditError::io(&s.dir, e))?;
        let files = list_files(&s.dir)?;
        let mut w = Writer {
            clock,
            next_seq: 1,
            prev: GENESIS.to_string(),
            active: None,
            next_day: None,
            next_number: files.last().map_or(1, |f| f.number + 1),
            pending: Vec::new(),
            pending_written: 0,
            synced_at: None,
            head_written: None,
            head_at: None,
            head_failing: false,
            gave_up: false,
            health: Arc::default(),
            ts: (i64::MIN, String::new()),
            line: Vec::new(),
            s,
        };
        let mut partial: Option<(String, u64)> = None;
        let mut tail: Option<Tail> = None;
        for (i, f) in files.iter().enumerate().rev() {
            let bytes = std::fs::read(&f.path).map_err(|e| AuditError::io(&f.path, e))?;
            let complete = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1);
            if i + 1 == files.len() && complete < bytes.len() {
                partial = Some((f.name.clone(), (bytes.len() - complete) as u64));
            }
            if let Some(t) = last_record(f, &bytes[..complete])? {
                tail = Some(t);
                break;
            }
        }
        if let Some(t) = &tail {
            w.next_seq = t.seq + 1;
            w.prev = t.hash.clone();
        }
        let mut events = Vec::new();
        if let Some(Ok(head)) = read_head(&w.s.dir) {
            let (found_seq, found_hash) = tail
                .as_ref()
                .map_or((0, GENESIS), |t| (t.seq, t.hash.as_str()));
            if head.seq > found_seq || (head.seq == found_seq && head.hash != found_hash) {
                let mut ev = Map::new();
                ev.insert("event".into(), "head_mismatch".into());
                ev.insert("head_seq".into(), head.seq.into());
                ev.insert("head_hash".into(), head.hash.into());
                ev.insert("head_file".into(), head.file.into());
                ev.insert("found_seq".into(), found_seq.into());
                ev.insert("found_hash".into(), found_hash.into());
                events.push(ev);
            }
        }
        match (&partial, files.last()) {
            (None, Some(f)) => {
                // Continue in the newest file; it is complete.
                let file = OpenOptions::new()
                    .append(true)
                    .open(&f.path)
                    .map_err(|e| AuditError::io(&f.path, e))?;
                let len = file
                    .metadata()
                    .map_err(|e| AuditError::io(&f.path, e))?
                    .len();
                point_current(&w.s.dir, &f.name);
                w.active = Some(Active {
                    file,
                    name: f.name.clone(),
                    day: f.day,
                    len,
                    synced_len: len,
                    torn: false,
                });
            }
            (Some((name, bytes)), _) => {
                // Leave the torn bytes as they are (they are evidence of the crash)
                // and continue in a fresh file whose first record explains them.
                tracing::warn!(file = %name, bytes, "audit log ends in a partial line; continuing in a new file");
                let mut ev = Map::new();
                ev.insert("event".into(), "recovered_partial_line".into());
                ev.insert("file".into(), name.clone().into());
                ev.insert("bytes".into(), (*bytes).into());
                events.insert(0, ev);
                w.next_day = Some(w.clock.now().date_naive());
            }
            (None, None) => {}
        }
        if !events.is_empty() {
            for ev in events {
                let fields = encode_fields(&ev).map_err(|e| AuditError::Write(e.to_string()))?;
                w.encode(&fields).map_err(|e| AuditError::io(&w.s.dir, e))?;
            }
            w.commit(true).map_err(|e| AuditError::io(&w.s.dir, e))?;
        }
        Ok(w)
    }

    /// Reports to `health` from now on.
    pub(super) fn with_health(mut self, health: Arc<Health>) -> Writer {
        self.health = health;
        self
    }

    /// The thread body: take batches from the queue until stopped.
    pub(super) fn run(mut self, mut rx: mpsc::Receiver<Msg>, stop: &AtomicBool) {
        let mut flushers: Vec<oneshot::Sender<Result<(), AuditError>>> = Vec::new();
        // Only for the idle timeout that syncs written records whose window is up
        // and brings a lagging head up to date.
        let timer = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build();
        loop {
            let first = match (&timer, self.idle_wait()) {
                (Ok(rt), Some(wait)) => {
                    match rt.block_on(async { tokio::time::timeout(wait, rx.recv()).await }) {
                        Ok(msg) => msg,
                        Err(_idle) => {
                            self.retry(&mut flushers, stop, |w| w.commit(false));
                            continue;
                        }
                    }
                }
                _ => rx.blocking_recv(),
            };
            let Some(first) = first else {
                break;
            };
            let batch_started = Instant::now();
            self.take(first, &mut flushers, stop);
            for _ in 1..MAX_BATCH {
                match rx.try_recv() {
                    Ok(msg) => self.take(msg, &mut flushers, stop),
                    Err(_) => break,
                }
            }
            // A flush asks for everything on disk, the head included.
            let force_head = !flushers.is_empty();
            self.retry(&mut flushers, stop, |w| w.commit(force_head));
            if self.gave_up {
                break;
            }
            answer(&mut flushers, Ok(()));
            // Let the next batch gather: a writer woken for every record or two
            // costs the request path more in wake-ups than the records cost.
            if !force_head && self.s.sync_every > Duration::ZERO {
                if let Some(rest) = BATCH_EVERY.checked_sub(batch_started.elapsed()) {
                    std::thread::sleep(rest);
                }
            }
            if stop.load(Ordering::SeqCst) {
                // Refuse new records; drain what is already queued.
                rx.close();
                while let Some(msg) = rx.blocking_recv() {
                    self.take(msg, &mut flushers, stop);
                    if self.gave_up {
                        break;
                    }
                }
                self.retry(&mut flushers, stop, |w| w.commit(true));
                if !self.gave_up {
                    answer(&mut flushers, Ok(()));
                }
                break;
            }
        }
        if self.gave_up {
            tracing::error!(
                bytes = self.pending.len(),
                "audit writer stopped after repeated I/O errors; records not synced may be lost"
            );
            answer(
                &mut flushers,
                Err(AuditError::Write("gave up after I/O errors".into())),
            );
        }
    }

    fn take(
        &mut self,
        msg: Msg,
        flushers: &mut Vec<oneshot::Sender<Result<(), AuditError>>>,
        stop: &AtomicBool,
    ) {
        match msg {
            Msg::Record(rec) => {
                if self.gave_up {
                    return;
                }
                // Encoding fails only on I/O (rotation); a retry encodes it again.
                self.retry(flushers, stop, |w| w.encode(&rec));
            }
            Msg::Flush(reply) => flushers.push(reply),
            Msg::Wake => {}
        }
    }

    /// Run `op` until it succeeds, backing off; failing flushers are told at once.
    /// Gives up (setting `gave_up`) only when a stop was asked.
    fn retry(
        &mut self,
        flushers: &mut Vec<oneshot::Sender<Result<(), AuditError>>>,
        stop: &AtomicBool,
        mut op: impl FnMut(&mut Writer) -> std::io::Result<()>,
    ) {
        let mut attempt: u32 = 0;
        let mut failed_when_stopping = 0;
        loop {
            match op(self) {
                Ok(()) => {
                    self.health.succeeded();
                    return;
                }
                Err(e) => {
                    self.health.failed(&e);
                    tracing::error!(error = %e, dir = %self.s.dir.display(), "audit write failed; retrying");
                    answer(flushers, Err(AuditError::Write(e.to_string())));
                    if stop.load(Ordering::SeqCst) {
                        failed_when_stopping += 1;
                        if failed_when_stopping >= RETRIES_WHEN_STOPPING {
                            self.gave_up = true;
                            return;
                        }
                    }
                    attempt = attempt.saturating_add(1);
                    let ms = 50u64.saturating_mul(1 << attempt.min(7)).min(5_000);
                    std::thread::sleep(Duration::from_millis(ms));
                }
            }
        }
    }

    /// Turn a record into a chained line in `pending`, rotating first if needed.
    fn encode(&mut self, fields: &[u8]) -> std::io::Result<()> {
        let now = self.clock.now();
        let day = now.date_naive();
        let millis = now.timestamp_millis();
        if self.ts.0 != millis {
            self.ts = (millis, now.to_rfc3339_opts(SecondsFormat::Millis, true));
        }

        let mut line = std::mem::take(&mut self.line);
        line.clear();
        line.extend_from_slice(b"{\"ts\":\"");
        line.extend_from_slice(self.ts.1.as_bytes());
        line.extend_from_slice(b"\",\"seq\":");
        // Writing to a Vec cannot fail.
        let _ = write!(line, "{}", self.next_seq);
        line.extend_from_slice(b",\"prev\":\"");
        line.extend_from_slice(self.prev.as_bytes());
        line.push(b'"');
        line.extend_from_slice(fields);
        let hash = canonical_hash_hex(&line);
        line.extend_from_slice(b",\"hash\":\"");
        line.extend_from_slice(&hash);
        line.extend_from_slice(b"\"}\n");

        let room = self
            .rotate_if_needed(day, line.len() as u64)
            .and_then(|()| {
                if self.pending.len() + line.len() > MAX_PENDING {
                    self.sync()?;
                }
                Ok(())
            });
        if room.is_ok() {
            self.pending.extend_from_slice(&line);
            self.prev.clear();
            self.prev
                .push_str(std::str::from_utf8(&hash).unwrap_or_default());
            self.next_seq += 1;
        }
        self.line = line;
        room
    }

    fn rotate_if_needed(&mut self, day: NaiveDate, line_len: u64) -> std::io::Result<()> {
        let (file_day, len) = match (&self.active, self.next_day) {
            (Some(a), _) => (a.day, a.len),
            (None, Some(d)) => (d, 0),
            (None, None) => {
                self.next_day = Some(day);
                return Ok(());
            }
        };
        let logical = len + (self.pending.len() - self.pending_written) as u64;
        let too_big = logical > 0 && logical + line_len > self.s.max_file_bytes;
        let new_day = self.s.rotate_daily && day != file_day;
        if too_big || new_day {
            // The old file is finished: make it durable before the chain moves on.
            self.sync()?;
            self.active = None;
            self.next_day = Some(day);
        }
        Ok(())
    }

    /// Write what `pending` holds beyond `pending_written` to the active file
    /// (creating it if needed), resuming after a partial failure. After a failed
    /// sync, first cut the file back to its last good sync and write all of
    /// `pending` again.
    fn write_pending(&mut self) -> std::io::Result<()> {
        if let Some(a) = self.active.as_mut().filter(|a| a.torn) {
            // The file is opened for appending: writes go to its new end.
            a.file.set_len(a.synced_len)?;
            a.len = a.synced_len;
            a.torn = false;
            self.pending_written = 0;
        }
        if self.pending.len() == self.pending_written {
            return Ok(());
        }
        if self.active.is_none() {
            self.open_next()?;
        }
        let Some(a) = self.active.as_mut() else {
            return Err(std::io::Error::other("no active audit file"));
        };
        while self.pending_written < self.pending.len() {
            let n = a.file.write(&self.pending[self.pending_written..])?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            self.pending_written += n;
            a.len += n as u64;
        }
        Ok(())
    }

    fn open_next(&mut self) -> std::io::Result<()> {
        let day = self
            .next_day
            .unwrap_or_else(|| self.clock.now().date_naive());
        let name = file_name(day, self.next_number);
        let path = self.s.dir.join(&name);
        let file = match OpenOptions::new().append(true).create_new(true).open(&path) {
            Ok(f) => f,
            // Left empty by an attempt that failed after creating it: ours to use.
            // A non-empty one belongs to someone else; never append to it.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let f = OpenOptions::new().append(true).open(&path)?;
                if f.metadata()?.len() != 0 {
                    return Err(e);
                }
                f
            }
            Err(e) => return Err(e),
        };
        // The new name must survive a crash, or the chain would lose a file.
        File::open(&self.s.dir)?.sync_all()?;
        point_current(&self.s.dir, &name);
        self.next_number += 1;
        self.next_day = None;
        self.active = Some(Active {
            file,
            name,
            day,
            len: 0,
            synced_len: 0,
            torn: false,
        });
        Ok(())
    }

    /// Write out `pending` and `fdatasync` the active file; on success the
    /// written bytes are on disk and leave `pending`.
    fn sync(&mut self) -> std::io::Result<()> {
        self.write_pending()?;
        if !self.unsynced() {
            return Ok(());
        }
        if let Some(a) = self.active.as_mut() {
            if let Err(e) = a.file.sync_data() {
                a.torn = true;
                return Err(e);
            }
            a.synced_len = a.len;
        }
        self.pending.drain(..self.pending_written);
        self.pending_written = 0;
        if self.pending.capacity() > 2 * MAX_PENDING {
            self.pending.shrink_to(MAX_PENDING);
        }
        self.synced_at = Some(Instant::now());
        Ok(())
    }

    /// Whether bytes were written to the active file since its last good sync.
    fn unsynced(&self) -> bool {
        self.pending_written > 0
    }

    /// End of a batch: everything encoded is written; it is synced when `force`
    /// or when the last sync is `sync_every` old (under load one `fdatasync` then
    /// covers many batches, and the disk is left to the ledger, whose writes
    /// callers wait for). The head moves when `force` or when it was last moved
    /// `HEAD_EVERY` ago, and only ever to a synced record.
    fn commit(&mut self, force: bool) -> std::io::Result<()> {
        self.write_pending()?;
        if force || self.sync_lag().is_some_and(|d| d.is_zero()) {
            self.sync()?;
        }
        if !self.unsynced() && (force || self.head_at.is_none_or(|at| at.elapsed() >= HEAD_EVERY)) {
            // The records are durable without the head (verify's check for a
            // tail cut at a line boundary), so failing to rewrite it fails no
            // flush: it is tried again `HEAD_EVERY` later, or at a flush.
            match self.write_head() {
                Ok(()) => self.head_failing = false,
                Err(e) => {
                    self.head_at = Some(Instant::now());
                    if !std::mem::replace(&mut self.head_failing, true) {
                        tracing::warn!(error = %e, dir = %self.s.dir.display(), "cannot rewrite the audit log's head.json; trying again every 100 ms");
                    }
                }
            }
        }
        Ok(())
    }

    /// How long written records may still wait for their sync; `None` when
    /// everything written is synced.
    fn sync_lag(&self) -> Option<Duration> {
        if !self.unsynced() {
            return None;
        }
        let since = self.synced_at.map_or(self.s.sync_every, |at| at.elapsed());
        Some(self.s.sync_every.saturating_sub(since))
    }

    /// How long to wait for more records before the writer must act on its own:
    /// sync records whose window is up, or bring a lagging head up to date.
    /// `None` when everything is synced and the head names the last record.
    fn idle_wait(&self) -> Option<Duration> {
        if let Some(wait) = self.sync_lag() {
            return Some(wait);
        }
        let (seq, _) = self.last()?;
        if self.head_written == Some(seq) || !self.pending.is_empty() {
            return None;
        }
        let since = self.head_at.map_or(HEAD_EVERY, |at| at.elapsed());
        Some(HEAD_EVERY.saturating_sub(since))
    }

    fn write_head(&mut self) -> std::io::Result<()> {
        let (Some((seq, hash)), Some(a)) = (self.last(), &self.active) else {
            return Ok(());
        };
        if self.head_written == Some(seq) {
            return Ok(());
        }
        let head = Head {
            seq,
            hash: hash.to_owned(),
            file: a.name.clone(),
        };
        let tmp = self.s.dir.join(format!("{HEAD_FILE}.tmp"));
        let bytes = serde_json::to_vec(&head).map_err(std::io::Error::other)?;
        // Synced before the rename, so that after a power cut the name holds
        // the old head or the new one, never a torn one (a file system may
        // make the rename durable before the bytes); the directory after it,
        // so that the rename is durable too: without a journal (ext4 without
        // one) a rename waits for a sync of its directory, and a cut would
        // leave the head of the last rotation, or none. Two syncs per
        // `HEAD_EVERY` at most. A cut between them leaves the old head: the
        // head only ever lags the synced log.
        let mut file = File::create(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_data()?;
        std::fs::rename(&tmp, self.s.dir.join(HEAD_FILE))?;
        File::open(&self.s.dir)?.sync_all()?;
        self.head_written = Some(seq);
        self.head_at = Some(Instant::now());
        Ok(())
    }

    /// `seq` and `hash` of the last record in `pending` or the file (the head
    /// file's record), if the log has one: the chain's `prev` is its hash.
    fn last(&self) -> Option<(u64, &str)> {
        let seq = self.next_seq.checked_sub(1).filter(|s| *s > 0)?;
        Some((seq, &self.prev))
    }
}

/// Point `current.jsonl` at the active file, so that `tail -F current.jsonl`
/// follows the log across rotations. A convenience only: failures are logged.
fn point_current(dir: &Path, name: &str) {
    #[cfg(unix)]
    {
        let tmp = dir.join(format!("{CURRENT_LINK}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        let result = std::os::unix::fs::symlink(name, &tmp)
            .and_then(|()| std::fs::rename(&tmp, dir.join(CURRENT_LINK)));
        if let Err(e) = result {
            tracing::warn!(error = %e, "cannot point {CURRENT_LINK} at {name}");
        }
    }
    #[cfg(not(unix))]
    let _ = (dir, name);
}

fn answer(
    flushers: &mut Vec<oneshot::Sender<Result<(), AuditError>>>,
    result: Result<(), AuditError>,
) {
    for f in flushers.drain(..) {
        let r = match &result {
            Ok(()) => Ok(()),
            Err(e) => Err(AuditError::Write(e.to_string())),
        };
        let _ = f.send(r);
    }
}

/// The last complete record of a file's complete lines, if any.
fn last_record(f: &LogFile, complete: &[u8]) -> Result<Option<Tail>, AuditError> {
    let body = complete.strip_suffix(b"\n").unwrap_or(complete);
    if body.is_empty() {
        return Ok(None);
    }
    let (line, text) = match body.iter().rposition(|b| *b == b'\n') {
        Some(p) => (count_lines(&body[..=p]) + 1, &body[p + 1..]),
        None => (1, body),
    };
    let p = parse_line(text).map_err(|detail| AuditError::Corrupt {
        path: f.path.clone(),
        line,
        detail,
    })?;
    Ok(Some(Tail {
        seq: p.seq,
        hash: p.hash,
    }))
}

fn count_lines(bytes: &[u8]) -> u64 {
    bytes.iter().filter(|b| **b == b'\n').count() as u64
}
