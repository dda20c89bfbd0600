//! Records built field by field, for the request path.
//!
//! A record built as a `serde_json::Map` costs a tree node per field, a
//! `String` per name and per text value, and then an encoding pass over the
//! tree; the request path writes three records per draw. [`Fields`] encodes
//! each value as it is added and keeps only the names (fixed `&'static str`s)
//! and where each value's bytes are. The line it makes is the line the `Map`
//! would make with the same entries: the fields in name order (a `Map`'s
//! order), a field added twice keeps its last value, and secret fields (and
//! prompt fields unless `log_prompts`) are left out at every depth, as
//! [`scrub`](super::scrub) leaves them out of a `Map`.

use super::is_dropped;
use serde::Serialize;

/// A record's fields, encoded as they are added. Made by
/// [`Audit::fields`](super::Audit::fields), sent by
/// [`Audit::record_fields`](super::Audit::record_fields).
#[derive(Debug)]
pub struct Fields {
    log_prompts: bool,
    /// Each field's name and the range of its encoded value in `values`, as
    /// added (a name added twice is here twice).
    names: Vec<(&'static str, usize, usize)>,
    values: Vec<u8>,
}

impl Fields {
    pub(super) fn new(log_prompts: bool) -> Fields {
        Fields {
            log_prompts,
            names: Vec::with_capacity(16),
            values: Vec::with_capacity(256),
        }
    }

    /// A text field.
    pub fn str(&mut self, name: &'static str, v: &str) -> &mut Fields {
        self.put(name, |out| json(out, v))
    }

    /// A whole number.
    pub fn u64(&mut self, name: &'static str, v: u64) -> &mut Fields {
        self.put(name, |out| json(out, &v))
    }

    /// A signed whole number.
    pub fn i64(&mut self, name: &'static str, v: i64) -> &mut Fields {
        self.put(name, |out| json(out, &v))
    }

    /// A number with a fraction (`null` when not finite, as in a `Map`).
    pub fn f64(&mut self, name: &'static str, v: f64) -> &mut Fields {
        self.put(name, |out| json(out, &v))
    }

    /// `true` or `false`.
    pub fn bool(&mut self, name: &'static str, v: bool) -> &mut Fields {
        self.put(name, |out| {
            out.extend_from_slice(if v { b"true" } else { b"false" })
        })
    }

    /// A nested object, built by `build` under the same rules.
    pub fn object(&mut self, name: &'static str, build: impl FnOnce(&mut Fields)) -> &mut Fields {
        let log_prompts = self.log_prompts;
        self.put(name, |out| {
            let mut inner = Fields::new(log_prompts);
            build(&mut inner);
            inner.write_object(out);
        })
    }

    /// An array of objects, one built by `build` from each item.
    pub fn objects<T>(
        &mut self,
        name: &'static str,
        items: impl IntoIterator<Item = T>,
        mut build: impl FnMut(&mut Fields, T),
    ) -> &mut Fields {
        let log_prompts = self.log_prompts;
        self.put(name, |out| {
            out.push(b'[');
            let mut inner = Fields::new(log_prompts);
            for (i, item) in items.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                inner.names.clear();
                inner.values.clear();
                build(&mut inner, item);
                inner.write_object(out);
            }
            out.push(b']');
        })
    }

    /// The first name the writer reserves for itself, if any field has one.
    pub(super) fn reserved(&self) -> Option<&'static str> {
        self.names
            .iter()
            .map(|(n, ..)| *n)
            .find(|n| super::RESERVED_FIELDS.contains(n))
    }

    /// `,"name":value` for each field in name order: the bytes
    /// the writer's `encode_fields` makes of the same `Map`.
    pub fn encode(mut self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.values.len() + 16 * self.names.len());
        self.write_fields(&mut out);
        out
    }

    fn write_object(&mut self, out: &mut Vec<u8>) {
        let start = out.len();
        self.write_fields(out);
        match out.get_mut(start) {
            // The first field's comma opens the object instead.
            Some(comma) => *comma = b'{',
            None => out.push(b'{'),
        }
        out.push(b'}');
    }

    fn write_fields(&mut self, out: &mut Vec<u8>) {
        // A stable sort: a name added twice keeps its values in the order added.
        self.names.sort_by(|a, b| a.0.cmp(b.0));
        for (i, &(name, start, end)) in self.names.iter().enumerate() {
            if self.names.get(i + 1).is_some_and(|next| next.0 == name) {
                continue; // a Map keeps the last value added under a name
            }
            out.push(b',');
            json(out, name);
            out.push(b':');
            out.extend_from_slice(&self.values[start..end]);
        }
    }

    fn put(&mut self, name: &'static str, write: impl FnOnce(&mut Vec<u8>)) -> &mut Fields {
        if is_dropped(name, self.log_prompts) {
            return self;
        }
        let start = self.values.len();
        write(&mut self.values);
        self.names.push((name, start, self.values.len()));
        self
    }
}

/// JSON of a value that cannot fail to serialize (text, numbers).
fn json(out: &mut Vec<u8>, v: &(impl Serialize + ?Sized)) {
    if serde_json::to_writer(&mut *out, v).is_err() {
        out.extend_from_slice(b"null");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{scrub, writer::encode_fields};
    use serde_json::{json, Map, Value};

    fn map(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    fn built(log_prompts: bool) -> Fields {
        let mut f = Fields::new(log_prompts);
        f.str("event", "request")
            .u64("price", 17)
            .str("request_id", "r\"1\\\n")
            .i64("code", -3)
            .f64("latency_ms", 0.125)
            .f64("nan", f64::NAN)
            .bool("replay", false)
            .str("token", "secret!")
            .str("prompt", "a cat")
            .object("settlement", |o| {
                o.str("key", "key_1").str("id", "r1").u64("points", 3);
            })
            .object("empty", |_| {})
            .objects("breakdown", ["a", "b"], |o, item| {
                o.str("item", item).str("points", "1.5").str("Image", "x");
            })
            .objects("none", Vec::<u8>::new(), |_, _| {})
            .u64("price", 18);
        f
    }

    fn as_map(log_prompts: bool) -> Map<String, Value> {
        let mut m = map(json!({
            "event": "request", "price": 17, "request_id": "r\"1\\\n", "code": -3,
            "latency_ms": 0.125, "nan": Value::from(f64::NAN), "replay": false,
            "token": "secret!", "prompt": "a cat",
            "settlement": {"key": "key_1", "id": "r1", "points": 3},
            "empty": {},
            "breakdown": [
                {"item": "a", "points": "1.5", "Image": "x"},
                {"item": "b", "points": "1.5", "Image": "x"},
            ],
            "none": [],
        }));
        m.insert("price".into(), 18.into());
        scrub(&mut m, log_prompts);
        m
    }

    #[test]
    fn a_record_built_field_by_field_is_the_line_its_map_makes() {
        for log_prompts in [false, true] {
            let fields = built(log_prompts).encode();
            let from_map = encode_fields(&as_map(log_prompts)).unwrap_or_default();
            assert_eq!(
                String::from_utf8_lossy(&fields),
                String::from_utf8_lossy(&from_map),
                "log_prompts = {log_prompts}"
            );
        }
        let fields = String::from_utf8(built(false).encode()).unwrap_or_default();
        assert!(!fields.contains("secret!") && !fields.contains("a cat"));
        assert!(fields.contains(r#","price":18,"#), "{fields}");
    }

    #[test]
    fn reserved_names_are_found() {
        let mut f = Fields::new(false);
        f.str("event", "x");
        assert_eq!(f.reserved(), None);
        f.u64("seq", 1);
        assert_eq!(f.reserved(), Some("seq"));
    }
}
