//! `chuzhan-gate price`: what a request will cost, before a client sends it.
//!
//! Reads one JSON body, prints one compact JSON line:
//! `{"points":12,"breakdown":[...],"version":"...","endpoint":"/aiapi/v1/draw"}`
//! (a free request has `"points":0,"free":true`), exit 0. A body that cannot be
//! priced, or an unknown endpoint, prints the upstream's error envelope
//! `{"code":1003,"success":false,"msg":"...","data":null}`, exit 2. An input that
//! cannot be read prints the envelope with code 1, exit 1.

use std::io::{Read, Write};
use std::path::Path;

use serde::Serialize;

use super::{price, Endpoint, PriceInputs, PriceTable, Priced};
use crate::envelope::{error_body, Code};

/// Exit code for a priced request.
pub const EXIT_OK: i32 = 0;
/// Exit code when the input could not be read.
pub const EXIT_IO: i32 = 1;
/// Exit code for a body that cannot be priced or an unknown endpoint.
pub const EXIT_INVALID: i32 = 2;

/// The default endpoint when none is given.
pub const DEFAULT_ENDPOINT: &str = "/aiapi/v1/draw";

/// Runs the command: reads the body from `input` (`None` or `-` = stdin), prints
/// the result line on stdout, returns the exit code.
pub fn run(table: &PriceTable, endpoint: Option<&str>, input: Option<&Path>) -> i32 {
    let (line, code) = match read_input(input) {
        Ok(body) => render(table, endpoint, &body),
        Err(e) => {
            let what = input.map_or_else(|| "stdin".into(), |p| p.display().to_string());
            let msg = format!("cannot read {what}: {e}");
            (
                String::from_utf8_lossy(&error_body(Code::Internal, &msg)).into_owned(),
                EXIT_IO,
            )
        }
    };
    let mut out = std::io::stdout().lock();
    // A closed stdout leaves nothing to report to; the exit code still tells.
    let _ = writeln!(out, "{line}");
    code
}

/// Reads the whole body from a file, or from stdin for `None` or `-`.
pub fn read_input(input: Option<&Path>) -> std::io::Result<Vec<u8>> {
    match input {
        Some(p) if p != Path::new("-") => std::fs::read(p),
        _ => {
            let mut buf = Vec::new();
            std::io::stdin().lock().read_to_end(&mut buf)?;
            Ok(buf)
        }
    }
}

/// Prices `body` for `endpoint` (default `/aiapi/v1/draw`) and returns the line
/// to print (without newline) and the exit code. No I/O.
pub fn render(table: &PriceTable, endpoint: Option<&str>, body: &[u8]) -> (String, i32) {
    let path = endpoint.unwrap_or(DEFAULT_ENDPOINT);
    let Some(ep) = Endpoint::from_path(path) else {
        let msg = format!("endpoint: unknown path {path:?}; the gate refuses it");
        return invalid(&msg);
    };
    match price(table, ep, body, &PriceInputs::default()) {
        Ok(Priced::Billable(q)) => {
            let out = Out {
                points: q.points.get(),
                free: None,
                breakdown: &q.breakdown,
                version: &q.version,
                endpoint: ep.path(),
            };
            (serde_json::to_string(&out).unwrap_or_default(), EXIT_OK)
        }
        Ok(Priced::Free) => {
            let out = Out {
                points: 0,
                free: Some(true),
                breakdown: &[],
                version: &table.version,
                endpoint: ep.path(),
            };
            (serde_json::to_string(&out).unwrap_or_default(), EXIT_OK)
        }
        Err(e) => invalid(&e.to_string()),
    }
}

fn invalid(msg: &str) -> (String, i32) {
    (
        String::from_utf8_lossy(&error_body(Code::Invalid, msg)).into_owned(),
        EXIT_INVALID,
    )
}

#[derive(Serialize)]
struct Out<'a> {
    points: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    free: Option<bool>,
    breakdown: &'a [super::Item],
    version: &'a str,
    endpoint: &'static str,
}
