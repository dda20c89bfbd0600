//! `audit verify`: walk the chain and report the first broken link.

use super::{list_files, parse_line, read_head, AuditError, Head, LogFile, Parsed, GENESIS};
use serde_json::Value;
use std::fmt;
use std::path::{Path, PathBuf};

/// What kind of damage a [`Break`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakKind {
    /// The line's `hash` does not match its bytes: the record was changed.
    Edited,
    /// `seq` jumps forward: records are missing.
    Deleted,
    /// `seq` goes backwards or two records swapped places.
    Reordered,
    /// The chain ends early: a partial last line, or `head.json` names a later record.
    Truncated,
    /// A file number is missing from the sequence of files.
    MissingFile,
    /// `seq` is right but `prev` is not the previous record's hash: the previous
    /// record was replaced by one with a recomputed hash, or a record was inserted.
    LinkMismatch,
    /// The line is not an audit record at all (not JSON, or no chain fields).
    Malformed,
    /// `head.json` names the right `seq` with a different hash.
    HeadMismatch,
    /// The record an [`Anchor`] names has another hash (the log was rewritten), or
    /// is not among the files read (archived with them).
    AnchorMismatch,
}

/// A record that an earlier `verify` printed (`last good record: ... (as an anchor: S:H)`),
/// kept where the log's writer cannot change it. [`verify_from`] checks a log
/// whose older files were archived against it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    /// The record's `seq`.
    pub seq: u64,
    /// Its `hash`, 64 hex digits.
    pub hash: String,
}

impl std::str::FromStr for Anchor {
    type Err = String;

    /// `SEQ:HASH`, as in `1234:9f86d0...`.
    fn from_str(s: &str) -> Result<Anchor, String> {
        let (seq, hash) = s
            .split_once(':')
            .ok_or("an anchor is SEQ:HASH, as `audit verify` prints them")?;
        let seq = seq
            .trim()
            .parse()
            .map_err(|_| format!("anchor seq {seq:?} is not a whole number"))?;
        let hash = hash.trim().to_ascii_lowercase();
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("an anchor's hash is 64 hex digits".into());
        }
        Ok(Anchor { seq, hash })
    }
}

/// The first place where the chain does not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Break {
    /// The file where it was found.
    pub file: PathBuf,
    /// 1-based line in that file (for a missing file: the first line of the file
    /// after the gap; for a cut tail: one past the last line).
    pub line: u64,
    /// The `seq` on that line, when it could be read; else the `seq` expected there.
    pub seq: Option<u64>,
    /// What kind of damage.
    pub kind: BreakKind,
    /// A sentence for people.
    pub detail: String,
}

/// The result of [`verify`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Log files read.
    pub files: usize,
    /// Records read (up to the first break, all of them when clean).
    pub records: u64,
    /// The first broken link, `None` when the chain holds.
    pub first_break: Option<Break>,
    /// `seq` and `hash` of the last record read: copy them somewhere safe to detect
    /// a later rewrite of the whole log.
    pub last: Option<(u64, String)>,
    /// Things worth knowing that are not breaks: crash recoveries recorded in the
    /// chain, an unreadable head file.
    pub notices: Vec<String>,
}

impl fmt::Display for BreakKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BreakKind::Edited => "edited",
            BreakKind::Deleted => "deleted",
            BreakKind::Reordered => "reordered",
            BreakKind::Truncated => "truncated",
            BreakKind::MissingFile => "missing file",
            BreakKind::LinkMismatch => "broken link",
            BreakKind::Malformed => "malformed",
            BreakKind::HeadMismatch => "head mismatch",
            BreakKind::AnchorMismatch => "anchor mismatch",
        })
    }
}

impl fmt::Display for Break {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at {} line {}",
            self.kind,
            self.file.display(),
            self.line
        )?;
        if let Some(seq) = self.seq {
            write!(f, " (seq {seq})")?;
        }
        write!(f, ": {}", self.detail)
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.first_break {
            None => write!(
                f,
                "audit chain OK: {} files, {} records",
                self.files, self.records
            )?,
            Some(b) => write!(
                f,
                "audit chain BROKEN after {} good records: {b}",
                self.records
            )?,
        }
        if let Some((seq, hash)) = &self.last {
            write!(
                f,
                "\nlast good record: seq {seq} hash {hash} (as an anchor: {seq}:{hash})"
            )?;
        }
        for n in &self.notices {
            write!(f, "\nnote: {n}")?;
        }
        Ok(())
    }
}

/// Check the chain in `path`: an audit directory (every file, file numbers from 1,
/// the first record linking to 64 zeros, and `head.json`), or a single file (its
/// records among themselves). Files are read whole, one at a time.
pub fn verify(path: &Path) -> Result<VerifyReport, AuditError> {
    verify_from(path, None)
}

/// [`verify`], or with an `anchor` the part of a log that is left after its older
/// files were archived: the directory's files may then start at any number (with
/// no gaps after it), the chain is checked from its first record on, and the
/// anchor's record must be in it with the anchor's hash. So the files kept prove
/// to continue the chain the anchor was taken from, unchanged.
pub fn verify_from(path: &Path, anchor: Option<&Anchor>) -> Result<VerifyReport, AuditError> {
    let meta = std::fs::metadata(path).map_err(|e| AuditError::io(path, e))?;
    let mut v = Verifier {
        anchor: anchor.cloned(),
        ..Verifier::default()
    };
    if meta.is_dir() {
        let files = list_files(path)?;
        let first_number = match (anchor, files.first()) {
            (Some(_), Some(f)) => f.number,
            _ => {
                v.whole_log = true;
                v.expected_seq = Some(1);
                v.prev = Some(GENESIS.to_string());
                1
            }
        };
        // Read once: a live writer moves it while we walk.
        let head = read_head(path);
        if let Some(Ok(h)) = &head {
            v.head_seq = Some(h.seq);
        }
        for (i, f) in files.iter().enumerate() {
            let expected_number = first_number + i as u64;
            if f.number != expected_number {
                let missing = f.number > expected_number;
                v.set_break(Break {
                    file: f.path.clone(),
                    line: 1,
                    seq: v.expected_seq,
                    kind: if missing {
                        BreakKind::MissingFile
                    } else {
                        BreakKind::Reordered
                    },
                    detail: if missing {
                        format!(
                            "file number {expected_number:06} is missing before {}",
                            f.name
                        )
                    } else {
                        format!("two files carry number {:06}", f.number)
                    },
                });
                break;
            }
            v.file(f)?;
            if v.report.first_break.is_some() {
                break;
            }
        }
        v.finish();
        if v.report.first_break.is_none() {
            v.check_head(path, head, files.last());
        }
        v.check_anchor(path, files.first());
    } else {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let f = LogFile {
            path: path.to_path_buf(),
            name,
            day: chrono::NaiveDate::default(),
            number: 0,
        };
        v.file(&f)?;
        v.finish();
        v.check_anchor(path, Some(&f));
    }
    Ok(v.report)
}

/// `chuzhan-gate audit verify [--anchor SEQ:HASH] [PATH]`: print the report; 0
/// clean, 1 broken, 2 error.
pub fn verify_cmd(path: &Path, anchor: Option<&Anchor>) -> i32 {
    match verify_from(path, anchor) {
        Ok(report) => {
            println!("{report}");
            if report.first_break.is_none() {
                0
            } else {
                1
            }
        }
        Err(e) => {
            eprintln!("audit verify: {e}");
            2
        }
    }
}

#[derive(Default)]
struct Verifier {
    report: VerifyReport,
    whole_log: bool,
    expected_seq: Option<u64>,
    prev: Option<String>,
    /// A partial line at the end of the previous file: (file, line, bytes).
    partial: Option<(PathBuf, u64, u64, String)>,
    /// Where the last record sat, for a break "after the end".
    last_pos: Option<(PathBuf, u64)>,
    /// Hashes are not kept; only that of the record `head.json` names.
    head_seq: Option<u64>,
    head_hash_seen: Option<String>,
    anchor: Option<Anchor>,
    /// Whether the anchor's record was read, with the anchor's hash.
    anchor_seen: bool,
    /// The `seq` of the first record read.
    first_seq: Option<u64>,
}

impl Verifier {
    fn set_break(&mut self, b: Break) {
        if self.report.first_break.is_none() {
            self.report.first_break = Some(b);
        }
    }

    fn file(&mut self, f: &LogFile) -> Result<(), AuditError> {
        self.report.files += 1;
        let bytes = std::fs::read(&f.path).map_err(|e| AuditError::io(&f.path, e))?;
        let lines: Vec<&[u8]> = bytes.split_inclusive(|b| *b == b'\n').collect();
        let parsed: Vec<Option<Result<Parsed, String>>> = lines
            .iter()
            .map(|l| l.strip_suffix(b"\n").map(parse_line))
            .collect();
        for (i, p) in parsed.iter().enumerate() {
            let line_no = i as u64 + 1;
            let Some(p) = p else {
                // No newline: only the last bytes of a file can be like this.
                self.partial = Some((
                    f.path.clone(),
                    line_no,
                    lines[i].len() as u64,
                    f.name.clone(),
                ));
                break;
            };
            let next_seq = parsed
                .get(i + 1)
                .and_then(|n| n.as_ref())
                .and_then(|n| n.as_ref().ok())
                .map(|n| n.seq);
            self.record(f, line_no, p, next_seq);
            if self.report.first_break.is_some() {
                return Ok(());
            }
        }
        Ok(())
    }

    fn record(
        &mut self,
        f: &LogFile,
        line: u64,
        p: &Result<Parsed, String>,
        next_seq: Option<u64>,
    ) {
        let brk = |seq, kind, detail: String| Break {
            file: f.path.clone(),
            line,
            seq,
            kind,
            detail,
        };
        let p = match p {
            Ok(p) => p,
            Err(detail) => {
                self.set_break(brk(self.expected_seq, BreakKind::Malformed, detail.clone()));
                return;
            }
        };
        if let Some((pfile, pline, bytes, pname)) = self.partial.take() {
            let explained = p.value.get("event").and_then(Value::as_str)
                == Some("recovered_partial_line")
                && p.value.get("file").and_then(Value::as_str) == Some(pname.as_str())
                && p.value.get("bytes").and_then(Value::as_u64) == Some(bytes);
            if !explained {
                self.set_break(Break {
                    file: pfile,
                    line: pline,
                    seq: self.expected_seq,
                    kind: BreakKind::Truncated,
                    detail: format!(
                        "the last line of the file is incomplete ({bytes} bytes) and the next record does not record a crash recovery"
                    ),
                });
                return;
            }
        }
        if !p.hash_ok {
            self.set_break(brk(
                Some(p.seq),
                BreakKind::Edited,
                "the record's hash does not match its content".into(),
            ));
            return;
        }
        match self.expected_seq {
            Some(expected) if p.seq > expected => {
                let (kind, detail) = if next_seq == Some(expected) {
                    (
                        BreakKind::Reordered,
                        format!("seq {} comes before seq {expected}", p.seq),
                    )
                } else if expected == 1 && self.whole_log {
                    (
                        BreakKind::Deleted,
                        format!(
                            "the log starts at seq {}: earlier records were removed",
                            p.seq
                        ),
                    )
                } else {
                    (
                        BreakKind::Deleted,
                        format!(
                            "seq jumps from {} to {}: {} record(s) missing",
                            expected - 1,
                            p.seq,
                            p.seq - expected
                        ),
                    )
                };
                self.set_break(brk(Some(p.seq), kind, detail));
                return;
            }
            Some(expected) if p.seq < expected => {
                self.set_break(brk(
                    Some(p.seq),
                    BreakKind::Reordered,
                    format!("seq goes back from {} to {}", expected - 1, p.seq),
                ));
                return;
            }
            _ => {}
        }
        let expected_prev = match (&self.prev, p.seq) {
            (Some(prev), _) => Some(prev.as_str()),
            (None, 1) => Some(GENESIS),
            (None, _) => None,
        };
        if let Some(prev) = expected_prev {
            if p.prev != prev {
                self.set_break(brk(
                    Some(p.seq),
                    BreakKind::LinkMismatch,
                    "prev is not the hash of the previous record: that record was replaced (with a recomputed hash) or this one was inserted".into(),
                ));
                return;
            }
        }
        match p.value.get("event").and_then(Value::as_str) {
            Some("recovered_partial_line") => self.report.notices.push(format!(
                "seq {}: the writer restarted after a crash that left a partial line in {}",
                p.seq,
                p.value.get("file").and_then(Value::as_str).unwrap_or("?")
            )),
            Some("head_mismatch") => self.report.notices.push(format!(
                "seq {}: at restart head.json named seq {} but the files ended at seq {}: records after that were lost or removed while the gate was down",
                p.seq,
                p.value.get("head_seq").and_then(Value::as_u64).unwrap_or(0),
                p.value.get("found_seq").and_then(Value::as_u64).unwrap_or(0),
            )),
            _ => {}
        }
        if let Some(a) = self.anchor.as_ref().filter(|a| a.seq == p.seq) {
            if a.hash != p.hash {
                let detail = format!(
                    "the anchor gives seq {} the hash {}, the chain has {}: the log was rewritten",
                    a.seq, a.hash, p.hash
                );
                self.set_break(brk(Some(p.seq), BreakKind::AnchorMismatch, detail));
                return;
            }
            self.anchor_seen = true;
        }
        if self.head_seq == Some(p.seq) {
            self.head_hash_seen = Some(p.hash.clone());
        }
        self.first_seq.get_or_insert(p.seq);
        self.expected_seq = Some(p.seq + 1);
        self.prev = Some(p.hash.clone());
        self.report.records += 1;
        self.report.last = Some((p.seq, p.hash.clone()));
        self.last_pos = Some((f.path.clone(), line));
    }

    fn finish(&mut self) {
        if let Some((file, line, bytes, _)) = self.partial.take() {
            self.set_break(Break {
                file,
                line,
                seq: self.expected_seq,
                kind: BreakKind::Truncated,
                detail: format!(
                    "the last line is incomplete ({bytes} bytes): cut, or a crash mid-write (the writer records the recovery when it restarts); on a live log, a line being written"
                ),
            });
        }
    }

    /// The `seq` the chain read ends at (0 when it has no record).
    fn end_seq(&self) -> u64 {
        self.report.last.as_ref().map_or(0, |(s, _)| *s)
    }

    /// Where a break found after the chain's end is reported: the line after the
    /// last record read, else the first line of `file`, else `dir` itself.
    fn past_end(&self, dir: &Path, file: Option<&LogFile>) -> (PathBuf, u64) {
        match (&self.last_pos, file) {
            (Some((f, l)), _) => (f.clone(), l + 1),
            (None, Some(f)) => (f.path.clone(), 1),
            (None, None) => (dir.to_path_buf(), 0),
        }
    }

    /// With an anchor: say where the check started, and break when the anchor's
    /// record was not read (archived, or past the end of the chain).
    fn check_anchor(&mut self, path: &Path, first_file: Option<&LogFile>) {
        let Some(a) = self.anchor.clone() else {
            return;
        };
        if self.report.first_break.is_some() {
            return;
        }
        if let (Some(first), Some(f)) = (self.first_seq, first_file) {
            self.report.notices.push(format!(
                "checked from seq {first} in {} on; records before it were not read",
                f.name
            ));
        }
        if self.anchor_seen {
            self.report
                .notices
                .push(format!("seq {} has the anchor's hash", a.seq));
            return;
        }
        let end = self.end_seq();
        let (file, line) = self.past_end(path, first_file);
        let detail = match self.first_seq {
            Some(first) if a.seq < first => format!(
                "the anchor's seq {} is before the first record here (seq {first}): it was archived; take an anchor from these files, or verify them with the archive beside them",
                a.seq
            ),
            _ => format!(
                "the anchor names seq {}, but the chain ends at seq {end}: the log was cut, or the anchor is from another log",
                a.seq
            ),
        };
        self.set_break(Break {
            file,
            line,
            seq: Some(a.seq),
            kind: BreakKind::AnchorMismatch,
            detail,
        });
    }

    fn check_head(
        &mut self,
        dir: &Path,
        head: Option<Result<Head, String>>,
        last_file: Option<&LogFile>,
    ) {
        let head = match head {
            None => return,
            Some(Err(e)) => {
                self.report.notices.push(format!("head.json ignored: {e}"));
                return;
            }
            Some(Ok(h)) => h,
        };
        let end = self.end_seq();
        let (file, line) = self.past_end(dir, last_file);
        if head.seq > end {
            self.set_break(Break {
                file,
                line,
                seq: Some(end + 1),
                kind: BreakKind::Truncated,
                detail: format!(
                    "head.json says the log reached seq {} (in {}), but the chain ends at seq {end}",
                    head.seq, head.file
                ),
            });
            return;
        }
        // The head may lag the log (it moves after each sync); where it points, it
        // must agree. The walk noted the hash of the record it names.
        if self.head_hash_seen.as_deref() != Some(head.hash.as_str()) {
            self.set_break(Break {
                file,
                line,
                seq: Some(head.seq),
                kind: BreakKind::HeadMismatch,
                detail: format!(
                    "head.json gives seq {} the hash {}, the chain has {}",
                    head.seq,
                    head.hash,
                    self.head_hash_seen.as_deref().unwrap_or("nothing")
                ),
            });
        }
    }
}
