//! Surgical edits of JSON text: find the byte span of a member's value and replace
//! just that span, so every other byte (spacing, escapes, 64-bit integers, field
//! order) reaches the other side exactly as it was sent.
//!
//! The scanner is deliberately small: it understands JSON's lexical structure well
//! enough to skip strings, numbers and nested values; it does not validate deeply.
//! Callers use it only on bodies that serde_json has already parsed successfully.

use std::ops::Range;

/// Where one member of an object sits in the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberSpan {
    /// The value's bytes (e.g. `123`, `"abc"`, `{...}`).
    pub value: Range<usize>,
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// End of the string starting at `i` (which must be `"`), exclusive of nothing: returns
/// the index just past the closing quote.
fn skip_string(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'\\' => j += 2,
            b'"' => return Some(j + 1),
            _ => j += 1,
        }
    }
    None
}

/// Index just past the value starting at `i`.
fn skip_value(b: &[u8], i: usize) -> Option<usize> {
    match *b.get(i)? {
        b'"' => skip_string(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => {
                        j = skip_string(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            None
        }
        _ => {
            let mut j = i;
            while j < b.len() && !matches!(b[j], b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
            {
                j += 1;
            }
            (j > i).then_some(j)
        }
    }
}

fn key_matches(raw: &[u8], want: &str) -> bool {
    if !raw.contains(&b'\\') {
        return raw == want.as_bytes();
    }
    // A key written with escapes (`"\u0075sed"`): decode it to compare.
    let mut quoted = Vec::with_capacity(raw.len() + 2);
    quoted.push(b'"');
    quoted.extend_from_slice(raw);
    quoted.push(b'"');
    serde_json::from_slice::<String>(&quoted).is_ok_and(|k| k == want)
}

/// Find member `key` of the object whose text spans `obj` within `b`. The last
/// occurrence wins, as in serde_json.
pub fn find_member(b: &[u8], obj: Range<usize>, key: &str) -> Option<MemberSpan> {
    let mut i = skip_ws(b, obj.start);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    let mut found = None;
    loop {
        i = skip_ws(b, i);
        match b.get(i)? {
            b'}' => return found,
            b',' => {
                i += 1;
                continue;
            }
            b'"' => {}
            _ => return None,
        }
        let kend = skip_string(b, i)?;
        let raw_key = &b[i + 1..kend - 1];
        i = skip_ws(b, kend);
        if b.get(i) != Some(&b':') {
            return None;
        }
        let vstart = skip_ws(b, i + 1);
        let vend = skip_value(b, vstart)?;
        if vend > obj.end {
            return None;
        }
        if key_matches(raw_key, key) {
            found = Some(MemberSpan {
                value: vstart..vend,
            });
        }
        i = vend;
    }
}

/// Find a member by path from the root object (e.g. `["data", "used"]`).
pub fn find_path(b: &[u8], path: &[&str]) -> Option<MemberSpan> {
    let mut span = skip_ws(b, 0)..b.len();
    let mut last = None;
    for k in path {
        let m = find_member(b, span.clone(), k)?;
        span = m.value.clone();
        last = Some(m);
    }
    last
}

/// Apply replacements (non-overlapping spans, any order) and return the new text.
pub fn splice(b: &[u8], mut edits: Vec<(Range<usize>, Vec<u8>)>) -> Vec<u8> {
    edits.sort_by_key(|(r, _)| r.start);
    let extra: usize = edits.iter().map(|(_, v)| v.len()).sum();
    let mut out = Vec::with_capacity(b.len() + extra);
    let mut at = 0;
    for (r, v) in edits {
        if r.start < at {
            continue;
        }
        out.extend_from_slice(&b[at..r.start]);
        out.extend_from_slice(&v);
        at = r.end;
    }
    out.extend_from_slice(&b[at..]);
    out
}

/// Insert `"key":value` as the first member of the object at `obj` (used when the
/// member to set is absent).
pub fn insert_member(b: &[u8], obj: Range<usize>, key: &str, value: &[u8]) -> Option<Vec<u8>> {
    let open = skip_ws(b, obj.start);
    if b.get(open) != Some(&b'{') {
        return None;
    }
    let after = skip_ws(b, open + 1);
    let empty = b.get(after) == Some(&b'}');
    let mut ins = Vec::with_capacity(key.len() + value.len() + 4);
    ins.push(b'"');
    ins.extend_from_slice(key.as_bytes());
    ins.extend_from_slice(b"\":");
    ins.extend_from_slice(value);
    if !empty {
        ins.push(b',');
    }
    Some(splice(b, vec![(open + 1..open + 1, ins)]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_members_and_keeps_other_bytes() {
        let src = br#"{ "code" : 0, "data": {"paintingSign":"a\"b}", "used": 12, "balance" : 99.5, "x":[1,{"used":3}]}, "msg":"ok"}"#;
        let used = find_path(src, &["data", "used"]).unwrap();
        assert_eq!(&src[used.value.clone()], b"12");
        let bal = find_path(src, &["data", "balance"]).unwrap();
        let out = splice(
            src,
            vec![(bal.value, b"7".to_vec()), (used.value, b"5".to_vec())],
        );
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{ "code" : 0, "data": {"paintingSign":"a\"b}", "used": 5, "balance" : 7, "x":[1,{"used":3}]}, "msg":"ok"}"#
        );
    }

    #[test]
    fn matches_escaped_keys() {
        let src = br#"{"\u0075sed": 3}"#;
        let m = find_path(src, &["used"]).unwrap();
        assert_eq!(&src[m.value], b"3");
    }

    #[test]
    fn absent_member_is_none_and_insert_adds_it() {
        let src = br#"{"data":{}}"#;
        assert!(find_path(src, &["data", "used"]).is_none());
        let data = find_path(src, &["data"]).unwrap();
        let out = insert_member(src, data.value, "used", b"4").unwrap();
        assert_eq!(out, br#"{"data":{"used":4}}"#);
    }

    #[test]
    fn big_integers_elsewhere_are_untouched() {
        let src = br#"{"modelId":12345678901234567890,"data":{"used":1}}"#;
        let m = find_path(src, &["data", "used"]).unwrap();
        let out = splice(src, vec![(m.value, b"2".to_vec())]);
        assert_eq!(
            out,
            br#"{"modelId":12345678901234567890,"data":{"used":2}}"#
        );
    }

    #[test]
    fn truncated_text_never_panics() {
        let src = br#"{"data":{"used":1, "x":"abc"#;
        for n in 0..src.len() {
            let _ = find_path(&src[..n], &["data", "used"]);
            let _ = find_path(&src[..n], &["data", "zzz"]);
        }
    }
}
