//! Any bytes, as a request or answer body: the gate's byte-exact JSON editing and
//! pricing must never panic, for every endpoint.
//!
//! Properties checked:
//! - `price` answers (a quote or a rejection) for each of `Endpoint::ALL`;
//! - when `find_path` finds a span, it lies inside the body, and splicing the same
//!   bytes back is the identity;
//! - on a body serde_json accepts, the edit the gate makes on submit answers
//!   (`data.used` replaced in place, or inserted when absent) yields JSON that
//!   still parses and reads back the new value, with every other member unchanged.

#![no_main]

use chuzhan_gate::json_edit::{find_path, insert_member, splice};
use chuzhan_gate::pricing::{price, Endpoint, PriceInputs, PriceTable};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// Paths the gate reads or writes (answers' `data.used` / `data.balance`, request
/// fields pricing looks at), plus a few a client might nest.
const PATHS: &[&[&str]] = &[
    &["data"],
    &["data", "used"],
    &["data", "balance"],
    &["data", "paintingSign"],
    &["code"],
    &["prompt"],
    &["seed"],
    &["a", "b", "c"],
];

fuzz_target!(|body: &[u8]| {
    check(body);
    // Bodies shaped like the upstream's submit answers, so the rewrite below is
    // reached often: the input as `data`, and as members of `data`.
    let mut as_data = b"{\"code\":0,\"data\":".to_vec();
    as_data.extend_from_slice(body);
    as_data.push(b'}');
    check(&as_data);
    let mut as_members = b"{\"code\":0,\"data\":{\"paintingSign\":\"t\",".to_vec();
    as_members.extend_from_slice(body);
    as_members.extend_from_slice(b"}}");
    check(&as_members);
});

fn check(body: &[u8]) {
    let table = PriceTable::default();
    let inputs = PriceInputs::default();
    for ep in Endpoint::ALL {
        let _ = price(&table, ep, body, &inputs);
    }
    for path in PATHS {
        if let Some(m) = find_path(body, path) {
            assert!(m.value.start <= m.value.end && m.value.end <= body.len());
            let same = splice(
                body,
                vec![(m.value.clone(), body[m.value.clone()].to_vec())],
            );
            assert_eq!(
                same, body,
                "splicing a span's own bytes back changed the body"
            );
        }
    }
    // The gate's submit rewrite, on bodies that are valid JSON objects.
    let Ok(Value::Object(before)) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    let Some(Value::Object(_)) = before.get("data") else {
        return;
    };
    let edited = match (
        find_path(body, &["data", "used"]),
        find_path(body, &["data"]),
    ) {
        (Some(m), _) => splice(body, vec![(m.value, b"4242".to_vec())]),
        (None, Some(d)) => match insert_member(body, d.value, "used", b"4242") {
            Some(out) => out,
            None => panic!("data is an object but insert_member refused it"),
        },
        (None, None) => panic!("serde_json sees data but find_path does not"),
    };
    let after: Value = match serde_json::from_slice(&edited) {
        Ok(v) => v,
        Err(e) => panic!("the edit broke the JSON: {e}"),
    };
    assert_eq!(after["data"]["used"], Value::from(4242u64));
    let mut want = before.clone();
    if let Some(Value::Object(d)) = want.get_mut("data") {
        d.insert("used".into(), Value::from(4242u64));
    }
    assert_eq!(
        after,
        Value::Object(want),
        "the edit touched another member"
    );
}
