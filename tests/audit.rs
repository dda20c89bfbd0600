//! The audit log against real files in a temporary directory.

use chrono::{DateTime, TimeZone, Utc};
use chuzhan_gate::audit::{
    self, query, tail, verify, verify_cmd, verify_from, Anchor, Audit, AuditConfig, AuditError,
    AuditWriter, BreakKind, Filter, Follower,
};
use chuzhan_gate::clock::{ManualClock, SharedClock};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 23, 20, 0, 0)
        .single()
        .unwrap_or_default()
}

fn cfg(dir: &Path) -> AuditConfig {
    AuditConfig {
        dir: Some(dir.to_path_buf()),
        ..AuditConfig::default()
    }
}

async fn open(cfg: &AuditConfig, clock: &ManualClock) -> (Audit, AuditWriter) {
    let shared: SharedClock = Arc::new(clock.clone());
    match Audit::open(cfg, shared).await {
        Ok(pair) => pair,
        Err(e) => panic!("open failed: {e}"),
    }
}

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

fn decision(i: usize) -> Map<String, Value> {
    obj(json!({
        "kind": "decision",
        "key_id": format!("k{}", i % 3),
        "decision": if i % 2 == 0 { "admitted" } else { "rejected" },
        "endpoint": "/aiapi/v1/draw/txt2img",
        "points": i,
    }))
}

async fn write_n(audit: &Audit, from: usize, n: usize) {
    for i in from..from + n {
        audit.record(decision(i)).await.expect("record");
    }
}

/// Checks that the log in `dir` verifies clean and holds exactly the records
/// with `points` 0..`total`, in order; returns the report.
fn assert_points_in_order(dir: &Path, total: u64) -> audit::VerifyReport {
    let report = verify(dir).unwrap();
    assert_eq!(
        (report.records, &report.first_break),
        (total, &None),
        "{report}"
    );
    let points: Vec<u64> = query(dir, &Filter::default())
        .unwrap()
        .iter()
        .map(|r| r["points"].as_u64().unwrap())
        .collect();
    assert_eq!(points, (0..total).collect::<Vec<u64>>());
    report
}

/// The log files in chain order.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read_dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("audit-"))
        })
        .collect();
    v.sort();
    v
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .expect("read")
        .lines()
        .map(str::to_string)
        .collect()
}

/// The lines of a file a live writer may be appending to: a last line without
/// its newline is a record still being written, and is left out.
fn complete_lines(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).expect("read");
    let done = text.rfind('\n').map_or(0, |i| i + 1);
    text[..done].lines().map(str::to_string).collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut s = lines.join("\n");
    s.push('\n');
    std::fs::write(path, s).expect("write");
}

fn field(line: &str, name: &str) -> Value {
    let v: Value = serde_json::from_str(line).expect("json line");
    v.get(name).cloned().unwrap_or(Value::Null)
}

/// A log of `n` records in one file, writer shut down.
async fn one_file_log(n: usize) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(start());
    let (audit, writer) = open(&cfg(tmp.path()), &clock).await;
    write_n(&audit, 0, n).await;
    writer.shutdown().await;
    let f = files(tmp.path());
    assert_eq!(f.len(), 1);
    let path = f[0].clone();
    (tmp, path)
}

fn first_break(dir: &Path) -> audit::Break {
    break_in(verify(dir).expect("verify"))
}

fn break_in(report: audit::VerifyReport) -> audit::Break {
    match report.first_break {
        Some(b) => b,
        None => panic!("expected a break, got a clean report: {report}"),
    }
}

#[tokio::test]
async fn chain_verifies_clean_across_size_and_day_rotations() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 11, 23, 23, 0, 0).unwrap());
    let c = AuditConfig {
        max_file_bytes: 1200,
        ..cfg(tmp.path())
    };
    let (audit, writer) = open(&c, &clock).await;
    write_n(&audit, 0, 20).await;
    audit.flush().await.expect("flush");
    clock.advance(chrono::Duration::hours(2));
    write_n(&audit, 20, 20).await;
    writer.shutdown().await;

    let f = files(tmp.path());
    assert!(f.len() >= 4, "expected several size rotations, got {f:?}");
    let names: Vec<String> = f
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(names[0].starts_with("audit-20261123-000001"));
    assert!(names.last().unwrap().starts_with("audit-20261124-"));
    for (i, p) in f.iter().enumerate() {
        let ls = lines(p);
        assert!(!ls.is_empty());
        let size = std::fs::metadata(p).unwrap().len();
        assert!(size <= 1200 || ls.len() == 1, "{p:?} is {size} bytes");
        // One UTC day per file, the day of the name.
        let day = &names[i][6..14];
        for l in &ls {
            let ts = field(l, "ts");
            let ts = ts.as_str().unwrap().replace('-', "");
            assert_eq!(&ts[..8], day, "{l}");
        }
        if i > 0 {
            let before = lines(&f[i - 1]);
            assert_eq!(
                field(&ls[0], "prev"),
                field(before.last().unwrap(), "hash"),
                "file {i} does not link to the file before it"
            );
        }
    }
    // `tail -F current.jsonl` follows the active file.
    let link = std::fs::read_link(tmp.path().join(audit::CURRENT_LINK)).expect("current link");
    assert_eq!(link, PathBuf::from(names.last().unwrap()));
    let report = verify(tmp.path()).expect("verify");
    assert_eq!(report.first_break, None, "{report}");
    assert_eq!(report.records, 40);
    assert_eq!(report.files, f.len());
    assert_eq!(report.last.as_ref().map(|l| l.0), Some(40));
}

#[tokio::test]
async fn verify_reports_an_edited_line() {
    let (tmp, path) = one_file_log(10).await;
    let mut ls = lines(&path);
    assert!(ls[4].contains("\"decision\":\"admitted\""));
    ls[4] = ls[4].replace("\"decision\":\"admitted\"", "\"decision\":\"rejected\"");
    write_lines(&path, &ls);
    let b = first_break(tmp.path());
    assert_eq!((b.kind, b.line, b.seq), (BreakKind::Edited, 5, Some(5)));
    assert_eq!(b.file, path);
}

#[tokio::test]
async fn verify_reports_a_line_edited_and_rehashed_as_a_broken_link() {
    let (tmp, path) = one_file_log(10).await;
    let mut ls = lines(&path);
    // Recompute the hash of the edited line the way the writer does: the link from
    // the next record still names the old hash.
    let edited = ls[4].replace("\"points\":4", "\"points\":40");
    let cut = edited.len() - (9 + 64 + 2);
    let body = &edited[..cut];
    use sha2::{Digest, Sha256};
    let hash = hex::encode(Sha256::digest(format!("{body}}}").as_bytes()));
    ls[4] = format!("{body},\"hash\":\"{hash}\"}}");
    write_lines(&path, &ls);
    let b = first_break(tmp.path());
    assert_eq!(
        (b.kind, b.line, b.seq),
        (BreakKind::LinkMismatch, 6, Some(6))
    );
}

#[tokio::test]
async fn verify_reports_a_deleted_line() {
    let (tmp, path) = one_file_log(10).await;
    let mut ls = lines(&path);
    ls.remove(3);
    write_lines(&path, &ls);
    let b = first_break(tmp.path());
    assert_eq!((b.kind, b.line, b.seq), (BreakKind::Deleted, 4, Some(5)));
}

#[tokio::test]
async fn verify_reports_a_reordered_pair() {
    let (tmp, path) = one_file_log(10).await;
    let mut ls = lines(&path);
    ls.swap(2, 3);
    write_lines(&path, &ls);
    let b = first_break(tmp.path());
    assert_eq!((b.kind, b.line, b.seq), (BreakKind::Reordered, 3, Some(4)));
}

#[tokio::test]
async fn verify_reports_a_truncated_last_line() {
    let (tmp, path) = one_file_log(10).await;
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 20]).unwrap();
    let b = first_break(tmp.path());
    assert_eq!(
        (b.kind, b.line, b.seq),
        (BreakKind::Truncated, 10, Some(10))
    );
}

#[tokio::test]
async fn verify_reports_a_tail_cut_at_a_line_boundary_from_the_head_file() {
    let (tmp, path) = one_file_log(10).await;
    let mut ls = lines(&path);
    ls.truncate(8);
    write_lines(&path, &ls);
    let b = first_break(tmp.path());
    assert_eq!((b.kind, b.line, b.seq), (BreakKind::Truncated, 9, Some(9)));
    assert!(b.detail.contains("seq 10"), "{}", b.detail);
}

#[tokio::test]
async fn verify_reports_a_deleted_middle_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(start());
    let c = AuditConfig {
        max_file_bytes: 800,
        ..cfg(tmp.path())
    };
    let (audit, writer) = open(&c, &clock).await;
    write_n(&audit, 0, 30).await;
    writer.shutdown().await;
    let f = files(tmp.path());
    assert!(f.len() >= 3);
    assert_eq!(verify(tmp.path()).unwrap().first_break, None);
    std::fs::remove_file(&f[1]).unwrap();
    let b = first_break(tmp.path());
    assert_eq!(b.kind, BreakKind::MissingFile);
    assert_eq!(b.file, f[2]);
    assert_eq!(b.line, 1);
    // Each remaining file is still consistent on its own.
    for p in [&f[0], &f[2]] {
        let r = verify(p).expect("verify file");
        assert_eq!(r.first_break, None, "{r}");
    }
}

#[tokio::test]
async fn verify_reports_a_deleted_first_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(start());
    let c = AuditConfig {
        max_file_bytes: 800,
        ..cfg(tmp.path())
    };
    let (audit, writer) = open(&c, &clock).await;
    write_n(&audit, 0, 20).await;
    writer.shutdown().await;
    let f = files(tmp.path());
    std::fs::remove_file(&f[0]).unwrap();
    let b = first_break(tmp.path());
    assert_eq!((b.kind, b.file), (BreakKind::MissingFile, f[1].clone()));
}

/// The break `verify_from` reports with `anchor`.
fn anchored_break(dir: &Path, anchor: &Anchor) -> audit::Break {
    break_in(verify_from(dir, Some(anchor)).expect("verify"))
}

#[tokio::test]
async fn verify_with_an_anchor_checks_the_files_left_after_archiving() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("audit");
    let clock = ManualClock::new(start());
    let c = AuditConfig {
        max_file_bytes: 800,
        ..cfg(&dir)
    };
    let (audit, writer) = open(&c, &clock).await;
    write_n(&audit, 0, 20).await;
    writer.shutdown().await;
    let report = verify(&dir).expect("verify");
    assert!(report.first_break.is_none(), "{report}");
    let (seq, hash) = report.last.clone().expect("a last record");
    let anchor: Anchor = format!("{seq}:{hash}").parse().expect("anchor");
    let f = files(&dir);
    assert!(f.len() >= 5, "{f:?}");
    let first_seq = field(&lines(&f[0])[0], "seq");

    // Archive the two oldest files: alone, the rest no longer start at file 1.
    let archive = tmp.path().join("archive");
    std::fs::create_dir(&archive).expect("mkdir");
    for old in &f[..2] {
        std::fs::rename(old, archive.join(old.file_name().expect("name"))).expect("move");
    }
    assert_eq!(first_break(&dir).kind, BreakKind::MissingFile);
    let left = verify_from(&dir, Some(&anchor)).expect("verify");
    assert!(left.first_break.is_none(), "{left}");
    assert_eq!(left.files, f.len() - 2);
    assert_eq!(left.last, report.last);
    let kept_from = field(&lines(&f[2])[0], "seq");
    assert_eq!(
        left.records,
        20 - kept_from.as_u64().expect("seq") + 1,
        "{left}"
    );
    assert!(
        left.notices
            .iter()
            .any(|n| n.contains(&format!("checked from seq {kept_from}"))),
        "{left}"
    );
    assert_eq!(verify_cmd(&dir, Some(&anchor)), 0);
    assert_eq!(verify_cmd(&dir, None), 1);

    // Another hash at the anchor's seq: the log was rewritten.
    let other = Anchor {
        seq,
        hash: "0".repeat(64),
    };
    let b = anchored_break(&dir, &other);
    assert_eq!((b.kind, b.seq), (BreakKind::AnchorMismatch, Some(seq)));
    // An anchor inside the archived files cannot be checked here.
    let early = Anchor {
        seq: first_seq.as_u64().expect("seq"),
        hash: field(
            &lines(&archive.join(f[0].file_name().expect("name")))[0],
            "hash",
        )
        .as_str()
        .expect("hash")
        .to_string(),
    };
    let b = anchored_break(&dir, &early);
    assert_eq!(b.kind, BreakKind::AnchorMismatch);
    assert!(b.detail.contains("archived"), "{}", b.detail);
    // An anchor past the end: the tail was cut.
    let later = Anchor {
        seq: seq + 3,
        hash: hash.clone(),
    };
    let b = anchored_break(&dir, &later);
    assert_eq!(b.kind, BreakKind::AnchorMismatch);
    assert!(
        b.detail.contains(&format!("ends at seq {seq}")),
        "{}",
        b.detail
    );

    // The anchor does not excuse damage in the files it covers.
    let mut ls = lines(&f[3]);
    ls[0] = ls[0].replace("\"kind\":\"decision\"", "\"kind\":\"altered\"");
    assert_ne!(ls[0], lines(&f[3])[0], "the edit changed nothing");
    write_lines(&f[3], &ls);
    assert_eq!(anchored_break(&dir, &anchor).kind, BreakKind::Edited);
    std::fs::remove_file(&f[3]).expect("remove");
    assert_eq!(anchored_break(&dir, &anchor).kind, BreakKind::MissingFile);

    // Bad anchors are refused with a reason.
    for bad in ["12", "x:ab", &format!("{seq}:{}", "g".repeat(64)), "3:abc"] {
        assert!(bad.parse::<Anchor>().is_err(), "{bad}");
    }
    let upper: Anchor = format!("{seq}:{}", hash.to_uppercase())
        .parse()
        .expect("anchor");
    assert_eq!(upper, Anchor { seq, hash });
}

#[tokio::test]
async fn verify_reports_a_deleted_newest_file_from_the_head_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(start());
    let c = AuditConfig {
        max_file_bytes: 800,
        ..cfg(tmp.path())
    };
    let (audit, writer) = open(&c, &clock).await;
    write_n(&audit, 0, 20).await;
    writer.shutdown().await;
    let f = files(tmp.path());
    let kept = lines(&f[f.len() - 2]);
    std::fs::remove_file(&f[f.len() - 1]).unwrap();
    let b = first_break(tmp.path());
    assert_eq!(b.kind, BreakKind::Truncated);
    assert_eq!(
        (b.file.clone(), b.line),
        (f[f.len() - 2].clone(), kept.len() as u64 + 1)
    );
    assert!(b.detail.contains("seq 20"), "{}", b.detail);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_produce_a_gap_free_chain() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(start());
    let c = AuditConfig {
        queue: 16,
        max_file_bytes: 64 * 1024,
        ..cfg(tmp.path())
    };
    let (audit, writer) = open(&c, &clock).await;
    let mut tasks = Vec::new();
    for t in 0..16u64 {
        let audit = audit.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..200u64 {
                let rec = obj(json!({"task": t, "i": i}));
                audit.record(rec).await.expect("record");
                if i % 50 == 0 {
                    audit.flush().await.expect("flush");
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    writer.shutdown().await;

    let report = verify(tmp.path()).expect("verify");
    assert_eq!(report.first_break, None, "{report}");
    assert_eq!(report.records, 16 * 200);
    // Every task's records are all there, in the order that task sent them.
    let all = query(tmp.path(), &Filter::default()).expect("query");
    let mut next = [0u64; 16];
    for (n, rec) in all.iter().enumerate() {
        assert_eq!(rec["seq"].as_u64(), Some(n as u64 + 1));
        let t = rec["task"].as_u64().unwrap() as usize;
        assert_eq!(rec["i"].as_u64(), Some(next[t]));
        next[t] += 1;
    }
    assert!(next.iter().all(|n| *n == 200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_makes_record_wait_and_loses_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(start());
    let c = AuditConfig {
        queue: 1,
        ..cfg(tmp.path())
    };
    let (audit, writer) = open(&c, &clock).await;
    // With room for one record, the second send must wait until the writer takes
    // the first: record() does not return an error, it blocks.
    let mut tasks = Vec::new();
    for t in 0..4u64 {
        let audit = audit.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..250u64 {
                audit
                    .record(obj(json!({"t": t, "i": i})))
                    .await
                    .expect("record waits, never fails");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    writer.shutdown().await;
    let report = verify(tmp.path()).expect("verify");
    assert_eq!(report.first_break, None, "{report}");
    assert_eq!(report.records, 1000);
}

#[tokio::test]
async fn record_waits_while_the_writer_cannot_write_and_nothing_is_lost() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("audit");
    let clock = ManualClock::new(start());
    let c = AuditConfig {
        queue: 1,
        ..cfg(&dir)
    };
    let (audit, writer) = open(&c, &clock).await;
    // Make the first file impossible to create: the directory becomes a file.
    std::fs::remove_dir(&dir).unwrap();
    std::fs::write(&dir, b"in the way").unwrap();

    // The writer takes what is queued into a batch and then keeps retrying the
    // batch; the queue of one fills and some record() has to wait.
    let mut sent = 0usize;
    let mut waiting = loop {
        let mut fut = Box::pin(audit.record(decision(sent)));
        match tokio::time::timeout(std::time::Duration::from_millis(300), &mut fut).await {
            Ok(r) => {
                r.unwrap();
                sent += 1;
                assert!(sent < 10_000, "record() never waited");
            }
            Err(_) => break fut,
        }
    };
    // Still waiting a while later: the writer is stuck, not slow.
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(200), &mut waiting)
            .await
            .is_err()
    );

    std::fs::remove_file(&dir).unwrap();
    std::fs::create_dir(&dir).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(20), &mut waiting)
        .await
        .expect("record() resumes once the writer recovers")
        .unwrap();
    audit.flush().await.unwrap();
    writer.shutdown().await;
    assert_points_in_order(&dir, sent as u64 + 1);
}

#[tokio::test]
async fn reopening_continues_the_chain() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(start());
    let (audit, writer) = open(&cfg(tmp.path()), &clock).await;
    write_n(&audit, 0, 5).await;
    writer.shutdown().await;
    assert!(matches!(
        audit.record(decision(99)).await,
        Err(AuditError::Closed)
    ));

    clock.advance(chrono::Duration::minutes(5));
    let (audit, writer) = open(&cfg(tmp.path()), &clock).await;
    write_n(&audit, 5, 5).await;
    writer.shutdown().await;

    assert_eq!(files(tmp.path()).len(), 1, "same day, same file");
    let report = verify(tmp.path()).expect("verify");
    assert_eq!(report.first_break, None, "{report}");
    assert_eq!(report.records, 10);
    let ls = lines(&files(tmp.path())[0]);
    assert_eq!(field(&ls[5], "seq"), json!(6));
    assert_eq!(field(&ls[5], "prev"), field(&ls[4], "hash"));
    assert_eq!(field(&ls[0], "prev"), json!(audit::GENESIS));
}

#[tokio::test]
async fn reopening_after_a_partial_line_starts_a_new_file_that_records_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(start());
    let (audit, writer) = open(&cfg(tmp.path()), &clock).await;
    write_n(&audit, 0, 5).await;
    writer.shutdown().await;
    let first = files(tmp.path())[0].clone();
    // A crash mid-write leaves the start of a line.
    let torn = b"{\"ts\":\"2026-11-23T20:00:00.000Z\",\"seq\":6,\"pr";
    let mut bytes = std::fs::read(&first).unwrap();
    bytes.extend_from_slice(torn);
    std::fs::write(&first, &bytes).unwrap();
    assert_eq!(first_break(tmp.path()).kind, BreakKind::Truncated);

    let (audit, writer) = open(&cfg(tmp.path()), &clock).await;
    write_n(&audit, 5, 2).await;
    writer.shutdown().await;

    let f = files(tmp.path());
    assert_eq!(f.len(), 2);
    assert_eq!(std::fs::read(&first).unwrap(), bytes, "torn bytes kept");
    let ls = lines(&f[1]);
    assert_eq!(ls.len(), 3);
    assert_eq!(field(&ls[0], "event"), json!("recovered_partial_line"));
    assert_eq!(field(&ls[0], "bytes"), json!(torn.len()));
    assert_eq!(field(&ls[0], "seq"), json!(6));
    let report = verify(tmp.path()).expect("verify");
    assert_eq!(report.first_break, None, "{report}");
    assert_eq!(report.records, 8);
    assert_eq!(report.notices.len(), 1, "{report}");
}

#[tokio::test]
async fn reopening_after_a_torn_first_line_of_a_new_file_continues_from_the_file_before() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(start());
    let (audit, writer) = open(&cfg(tmp.path()), &clock).await;
    write_n(&audit, 0, 3).await;
    writer.shutdown().await;
    // A crash right after a rotation: the new file holds only a torn line.
    let torn_name = "audit-20261123-000002.jsonl";
    std::fs::write(tmp.path().join(torn_name), b"{\"ts\":\"2026").unwrap();

    let (audit, writer) = open(&cfg(tmp.path()), &clock).await;
    write_n(&audit, 3, 1).await;
    writer.shutdown().await;
    let f = files(tmp.path());
    assert_eq!(f.len(), 3);
    let ls = lines(&f[2]);
    assert_eq!(field(&ls[0], "event"), json!("recovered_partial_line"));
    assert_eq!(field(&ls[0], "file"), json!(torn_name));
    assert_eq!(field(&ls[0], "seq"), json!(4));
    assert_eq!(field(&ls[0], "prev"), field(&lines(&f[0])[2], "hash"));
    let report = verify(tmp.path()).expect("verify");
    assert_eq!(report.first_break, None, "{report}");
    assert_eq!(report.records, 5);
}

#[tokio::test]
async fn a_record_larger_than_max_file_bytes_gets_a_file_of_its_own() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(start());
    let c = AuditConfig {
        max_file_bytes: 100,
        ..cfg(tmp.path())
    };
    let (audit, writer) = open(&c, &clock).await;
    write_n(&audit, 0, 4).await;
    writer.shutdown().await;
    let f = files(tmp.path());
    assert_eq!(f.len(), 4);
    assert!(f.iter().all(|p| lines(p).len() == 1));
    assert_eq!(verify(tmp.path()).unwrap().first_break, None);
}

#[tokio::test]
async fn reopening_after_a_cut_tail_records_the_cut_in_the_chain() {
    let (tmp, path) = one_file_log(6).await;
    let mut ls = lines(&path);
    ls.truncate(4);
    write_lines(&path, &ls);
    let clock = ManualClock::new(start());
    let (audit, writer) = open(&cfg(tmp.path()), &clock).await;
    write_n(&audit, 6, 1).await;
    writer.shutdown().await;
    let ls = lines(&path);
    assert_eq!(field(&ls[4], "event"), json!("head_mismatch"));
    assert_eq!(field(&ls[4], "head_seq"), json!(6));
    assert_eq!(field(&ls[4], "found_seq"), json!(4));
    let report = verify(tmp.path()).expect("verify");
    assert_eq!(report.first_break, None, "{report}");
    assert!(
        report.to_string().contains("head.json named seq 6"),
        "{report}"
    );
}

#[tokio::test]
async fn query_filters_by_key_decision_time_and_limit() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(start());
    let (audit, writer) = open(&cfg(tmp.path()), &clock).await;
    // One record per minute, so times are known: record i at start + i minutes.
    for i in 0..12 {
        audit.record(decision(i)).await.unwrap();
        audit.flush().await.unwrap();
        clock.advance(chrono::Duration::minutes(1));
    }
    writer.shutdown().await;
    let points = |recs: Vec<Value>| -> Vec<u64> {
        recs.iter().map(|r| r["points"].as_u64().unwrap()).collect()
    };
    let q = |f: Filter| points(query(tmp.path(), &f).expect("query"));

    assert_eq!(q(Filter::default()).len(), 12);
    assert_eq!(
        q(Filter {
            key: Some("k1".into()),
            ..Filter::default()
        }),
        vec![1, 4, 7, 10]
    );
    assert_eq!(
        q(Filter {
            key: Some("k1".into()),
            decision: Some("rejected".into()),
            ..Filter::default()
        }),
        vec![1, 7]
    );
    let at = |m: i64| start() + chrono::Duration::minutes(m);
    assert_eq!(
        q(Filter {
            since: Some(at(3)),
            until: Some(at(6)),
            ..Filter::default()
        }),
        vec![3, 4, 5]
    );
    assert_eq!(
        q(Filter {
            decision: Some("admitted".into()),
            limit: Some(2),
            ..Filter::default()
        }),
        vec![8, 10]
    );
    assert_eq!(
        q(Filter {
            key: Some("nobody".into()),
            ..Filter::default()
        }),
        Vec::<u64>::new()
    );
}

#[tokio::test]
async fn flush_makes_records_visible_to_a_reader() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(start());
    let (audit, writer) = open(&cfg(tmp.path()), &clock).await;
    for round in 1..=3usize {
        write_n(&audit, round * 10, 4).await;
        audit.flush().await.expect("flush");
        assert_eq!(
            query(tmp.path(), &Filter::default()).unwrap().len(),
            round * 4
        );
        let report = verify(tmp.path()).unwrap();
        assert_eq!(report.first_break, None, "{report}");
    }
    writer.shutdown().await;
}

/// The `seq` that `head.json` names, if it can be read.
fn head_seq(dir: &Path) -> Option<u64> {
    let bytes = std::fs::read(dir.join("head.json")).ok()?;
    serde_json::from_slice::<Value>(&bytes).ok()?["seq"].as_u64()
}

/// `head.json` is rewritten at most every 100 ms under load, but a writer that
/// goes idle brings it up to the last record without being asked.
#[tokio::test]
async fn an_idle_writer_brings_the_head_up_to_date() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(start());
    let (audit, writer) = open(&cfg(tmp.path()), &clock).await;
    let head_seq = || head_seq(tmp.path());
    for round in 1..=3u64 {
        // Records written back to back, with no flush: the head may lag.
        write_n(&audit, 0, 50).await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let all: Vec<String> = files(tmp.path())
                .iter()
                .flat_map(|f| complete_lines(f))
                .collect();
            let last = all.last().and_then(|l| field(l, "seq").as_u64());
            if all.len() as u64 >= round * 50 && head_seq() == last {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "5 s after the last record, head.json names seq {:?}, the log ends at {last:?}",
                head_seq()
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    let report = verify(tmp.path()).unwrap();
    assert_eq!(report.first_break, None, "{report}");
    writer.shutdown().await;
}

/// Records reach the file at once, but their `fdatasync` waits up to
/// `sync_every_ms`, and `head.json` only ever names a synced record: with a long
/// window the head stays behind the written log until a flush syncs it.
#[tokio::test]
async fn records_are_written_at_once_and_synced_within_sync_every() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(start());
    let cfg = AuditConfig {
        sync_every_ms: 60_000,
        ..cfg(tmp.path())
    };
    let (audit, writer) = open(&cfg, &clock).await;
    let head_seq = || head_seq(tmp.path());
    // The first record finds no sync within the window: it is synced at once,
    // without a flush, and the head names it.
    write_n(&audit, 0, 1).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while head_seq() != Some(1) {
        assert!(
            std::time::Instant::now() < deadline,
            "the first record was not synced within 5 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    write_n(&audit, 1, 20).await;
    let written = |n: usize| {
        files(tmp.path())
            .iter()
            .flat_map(|f| complete_lines(f))
            .count()
            >= n
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !written(21) {
        assert!(
            std::time::Instant::now() < deadline,
            "records not written within 5 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // Written, idle for longer than the head's 100 ms, yet not synced: the head
    // must not name them.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(head_seq(), Some(1), "head.json named an unsynced record");
    audit.flush().await.expect("flush");
    assert_eq!(head_seq(), Some(21));
    writer.shutdown().await;
    let report = verify(tmp.path()).unwrap();
    assert_eq!(report.first_break, None, "{report}");
}

/// A burst larger than the writer keeps unsynced (1 MiB) is synced part way,
/// across rotations, and nothing is lost or written twice.
#[tokio::test]
async fn a_burst_of_several_mib_crosses_rotations_and_mid_batch_syncs_intact() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(start());
    let cfg = AuditConfig {
        sync_every_ms: 60_000,
        max_file_bytes: 700_000,
        ..cfg(tmp.path())
    };
    let (audit, writer) = open(&cfg, &clock).await;
    let pad = "p".repeat(500);
    for i in 0..6_000u64 {
        let rec = obj(json!({"kind": "decision", "points": i, "pad": pad}));
        audit.record(rec).await.expect("record");
    }
    audit.flush().await.expect("flush");
    writer.shutdown().await;
    let report = assert_points_in_order(tmp.path(), 6_000);
    assert!(report.files >= 5, "{report}");
}

#[tokio::test]
async fn records_are_single_complete_compact_lines() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(start());
    let (audit, writer) = open(&cfg(tmp.path()), &clock).await;
    audit
        .record(obj(json!({
            "endpoint": "/aiapi/v1/draw/txt2img",
            "note": "two\nlines and \"quotes\" and 汉字",
            "price": {"base": 4, "hr": [1, 2]},
        })))
        .await
        .unwrap();
    writer.shutdown().await;
    let raw = std::fs::read_to_string(&files(tmp.path())[0]).unwrap();
    assert!(raw.ends_with('\n'));
    assert_eq!(raw.matches('\n').count(), 1, "one record, one line");
    let line = raw.trim_end_matches('\n');
    assert!(line.starts_with("{\"ts\":\"2026-11-23T20:00:00.000Z\",\"seq\":1,\"prev\":\""));
    assert!(
        line.contains("\"endpoint\":\"/aiapi/v1/draw/txt2img\""),
        "{line}"
    );
    assert!(
        line.contains("\"price\":{\"base\":4,\"hr\":[1,2]}"),
        "{line}"
    );
    assert!(!line.contains(": "), "compact: {line}");
    let v: Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["note"], json!("two\nlines and \"quotes\" and 汉字"));
    let hash = v["hash"].as_str().unwrap();
    assert!(line.ends_with(&format!(",\"hash\":\"{hash}\"}}")));
}

#[tokio::test]
async fn shutdown_writes_everything_queued() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(start());
    let (audit, writer) = open(&cfg(tmp.path()), &clock).await;
    write_n(&audit, 0, 1000).await;
    writer.shutdown().await;
    let report = verify(tmp.path()).unwrap();
    assert_eq!((report.records, report.first_break), (1000, None));
    assert!(matches!(audit.flush().await, Err(AuditError::Closed)));
}

#[tokio::test]
async fn dropping_the_writer_guard_drains_the_queue() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(start());
    let (audit, writer) = open(&cfg(tmp.path()), &clock).await;
    write_n(&audit, 0, 100).await;
    drop(writer);
    // The thread drains in the background and then refuses new records.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if matches!(audit.record(decision(0)).await, Err(AuditError::Closed)) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "writer never stopped");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let report = verify(tmp.path()).unwrap();
    assert_eq!(report.first_break, None, "{report}");
    assert!(report.records >= 100);
}

#[tokio::test]
async fn a_disabled_log_accepts_and_discards() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = Audit::disabled();
    assert!(!d.is_enabled());
    assert!(!d.log_prompts());
    d.record(decision(1)).await.unwrap();
    d.flush().await.unwrap();

    let dir = tmp.path().join("audit");
    let c = AuditConfig {
        enabled: false,
        ..cfg(&dir)
    };
    let (audit, writer) = open(&c, &ManualClock::new(start())).await;
    audit.record(decision(1)).await.unwrap();
    audit.flush().await.unwrap();
    writer.shutdown().await;
    assert!(!dir.exists());
}

#[tokio::test]
async fn open_refuses_a_missing_directory_setting() {
    let c = AuditConfig::default();
    let clock: SharedClock = Arc::new(ManualClock::new(start()));
    assert!(matches!(
        Audit::open(&c, clock).await,
        Err(AuditError::Config(_))
    ));
}

#[tokio::test]
async fn prompts_are_dropped_unless_enabled_and_secrets_always() {
    let rec = || {
        obj(json!({
            "key_id": "k1",
            "key": "czg_secret",
            "request": {"prompt": "a cat", "negativePrompt": "dog", "width": 512,
                        "headers": {"Auth-Token": "up-token"}},
            "images": [{"imageUrl": "http://x/1.png"}],
        }))
    };
    for log_prompts in [false, true] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let c = AuditConfig {
            log_prompts,
            ..cfg(tmp.path())
        };
        let (audit, writer) = open(&c, &ManualClock::new(start())).await;
        assert_eq!(audit.log_prompts(), log_prompts);
        audit.record(rec()).await.unwrap();
        writer.shutdown().await;
        let raw = std::fs::read_to_string(&files(tmp.path())[0]).unwrap();
        assert!(!raw.contains("czg_secret"), "{raw}");
        assert!(!raw.contains("up-token"), "{raw}");
        assert!(raw.contains("\"width\":512"), "{raw}");
        assert!(raw.contains("\"key_id\":\"k1\""), "{raw}");
        assert_eq!(raw.contains("a cat"), log_prompts, "{raw}");
        assert_eq!(raw.contains("http://x/1.png"), log_prompts, "{raw}");
    }
}

#[tokio::test]
async fn records_may_not_set_the_chain_fields() {
    let audit = Audit::disabled();
    for f in ["ts", "seq", "prev", "hash"] {
        let mut rec = decision(0);
        rec.insert(f.into(), json!(1));
        match audit.record(rec).await {
            Err(AuditError::ReservedField(name)) => assert_eq!(name, f),
            other => panic!("{f}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn tail_and_follow_cross_file_boundaries() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(start());
    let c = AuditConfig {
        max_file_bytes: 700,
        ..cfg(tmp.path())
    };
    let (audit, writer) = open(&c, &clock).await;
    write_n(&audit, 0, 10).await;
    audit.flush().await.unwrap();
    let mut follower = Follower::from_end(tmp.path()).expect("follower");
    assert!(follower.poll().unwrap().is_empty());
    assert!(files(tmp.path()).len() >= 3);

    let last = tail(tmp.path(), 4).expect("tail");
    let seqs: Vec<Value> = last.iter().map(|l| field(l, "seq")).collect();
    assert_eq!(seqs, vec![json!(7), json!(8), json!(9), json!(10)]);
    assert_eq!(tail(tmp.path(), 100).unwrap().len(), 10);
    assert!(tail(tmp.path(), 0).unwrap().is_empty());

    write_n(&audit, 10, 6).await;
    audit.flush().await.unwrap();
    let new = follower.poll().unwrap();
    let seqs: Vec<u64> = new
        .iter()
        .map(|l| field(l, "seq").as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (11..=16).collect::<Vec<u64>>());
    assert!(follower.poll().unwrap().is_empty());
    writer.shutdown().await;
}

#[tokio::test]
async fn verify_cmd_exits_0_clean_1_broken_2_error() {
    let (tmp, path) = one_file_log(3).await;
    assert_eq!(verify_cmd(tmp.path(), None), 0);
    assert_eq!(verify_cmd(&path, None), 0);
    let mut ls = lines(&path);
    ls.remove(1);
    write_lines(&path, &ls);
    assert_eq!(verify_cmd(tmp.path(), None), 1);
    assert_eq!(verify_cmd(&tmp.path().join("nowhere"), None), 2);
}

/// One small clean log, made once: (file name, file bytes, head.json bytes).
fn sample_log() -> &'static (String, Vec<u8>, Vec<u8>) {
    static LOG: std::sync::OnceLock<(String, Vec<u8>, Vec<u8>)> = std::sync::OnceLock::new();
    LOG.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (tmp, path) = rt.block_on(one_file_log(12));
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(&path).unwrap();
        let head = std::fs::read(tmp.path().join("head.json")).unwrap();
        (name, bytes, head)
    })
}

fn verify_bytes(bytes: &[u8]) -> audit::VerifyReport {
    let (name, _, head) = sample_log();
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::write(tmp.path().join(name), bytes).unwrap();
    std::fs::write(tmp.path().join("head.json"), head).unwrap();
    verify(tmp.path()).expect("verify")
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]

    #[test]
    fn any_changed_byte_breaks_the_chain(
        pos in proptest::prelude::any::<proptest::sample::Index>(),
        byte in proptest::prelude::any::<u8>(),
    ) {
        let (_, bytes, _) = sample_log();
        proptest::prop_assert_eq!(verify_bytes(bytes).first_break, None);
        let i = pos.index(bytes.len());
        proptest::prop_assume!(bytes[i] != byte);
        let mut changed = bytes.clone();
        changed[i] = byte;
        let report = verify_bytes(&changed);
        proptest::prop_assert!(report.first_break.is_some(), "byte {} -> {}: {}", i, byte, report);
    }

    #[test]
    fn any_removed_or_duplicated_line_breaks_the_chain(
        pos in proptest::prelude::any::<proptest::sample::Index>(),
        duplicate in proptest::prelude::any::<bool>(),
    ) {
        let (_, bytes, _) = sample_log();
        let mut lines: Vec<&[u8]> = bytes.split_inclusive(|b| *b == b'\n').collect();
        let i = pos.index(lines.len());
        if duplicate {
            lines.insert(i, lines[i]);
        } else {
            lines.remove(i);
        }
        let report = verify_bytes(&lines.concat());
        proptest::prop_assert!(report.first_break.is_some(), "line {}: {}", i, report);
    }
}

/// `head.json` is advisory: when it cannot be rewritten (here its temporary
/// file's name is taken by a directory), flushes still succeed, the writer
/// stays healthy and the log verifies; once it can, the head catches up.
#[tokio::test]
async fn a_head_that_cannot_be_written_fails_no_flush() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(start());
    let blocker = tmp.path().join("head.json.tmp");
    std::fs::create_dir(&blocker).unwrap();
    let (audit, writer) = open(&cfg(tmp.path()), &clock).await;
    write_n(&audit, 0, 5).await;
    audit.flush().await.expect("a flush failed over the head");
    assert_eq!(audit.health().failing(), None);
    assert!(!tmp.path().join("head.json").exists());
    assert_points_in_order(tmp.path(), 5);

    std::fs::remove_dir(&blocker).unwrap();
    write_n(&audit, 5, 1).await;
    audit.flush().await.expect("flush");
    writer.shutdown().await;
    let head: Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("head.json")).unwrap()).unwrap();
    assert_eq!(head["seq"], 6, "{head}");
    assert_points_in_order(tmp.path(), 6);
}
