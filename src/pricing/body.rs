//! Reading request bodies: one borrowed, skipping pass, then field rules.
//!
//! Bodies are parsed once by serde_json into small structs whose scalar fields are
//! `&RawValue`: the exact text of the value, borrowed from the body. Unknown fields
//! and big strings (a base64 `img` of hundreds of KB) are skipped, never copied,
//! and no tree of the whole body is built. The rules that follow (whole number,
//! range, flag) read that text, so a message can name the field and quote what
//! the client sent.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::value::MapAccessDeserializer;
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::decimal::{self, Num, MICRO};
use super::PriceError;

/// Longest piece of a client's value quoted back in a message.
const QUOTE_CHARS: usize = 40;

/// Parses `body` as a JSON object into `T`, with a message naming the problem.
pub(crate) fn parse_object<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, PriceError> {
    serde_json::from_slice::<Object<T>>(body)
        .map(|o| o.0)
        .map_err(|e| PriceError::Body(format!("must be a JSON object ({e})")))
}

/// A value that must be a JSON object. Derived struct impls would also accept an
/// array (positionally), which would read `[512]` as a width; this refuses it.
pub(crate) struct Object<T>(pub(crate) T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = T;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(V(PhantomData)).map(Object)
    }
}

/// A nested value that should be an object: either it is, or we note what it was
/// so the field rule can say so (instead of a bare serde message).
pub(crate) enum Shape<T> {
    /// It was an object.
    Obj(T),
    /// It was something else: "a string", "an array", ...
    Wrong(&'static str),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Shape<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Shape<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map)).map(Shape::Obj)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Shape::Wrong("an array"))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Shape::Wrong("a boolean"))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Shape::Wrong("a number"))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Shape::Wrong("a number"))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Shape::Wrong("a number"))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
                Ok(Shape::Wrong("a string"))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Shape::Wrong("null"))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// The length of a value that should be an array; elements are skipped unread.
pub(crate) enum ArrayLen {
    /// It was an array of this many elements.
    Len(u64),
    /// It was something else.
    Wrong(&'static str),
}

impl<'de> Deserialize<'de> for ArrayLen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ArrayLen;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ArrayLen, A::Error> {
                let mut n = 0u64;
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    n += 1;
                }
                Ok(ArrayLen::Len(n))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ArrayLen, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(ArrayLen::Wrong("an object"))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<ArrayLen, E> {
                Ok(ArrayLen::Wrong("a boolean"))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<ArrayLen, E> {
                Ok(ArrayLen::Wrong("a number"))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<ArrayLen, E> {
                Ok(ArrayLen::Wrong("a number"))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<ArrayLen, E> {
                Ok(ArrayLen::Wrong("a number"))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<ArrayLen, E> {
                Ok(ArrayLen::Wrong("a string"))
            }
            fn visit_unit<E: de::Error>(self) -> Result<ArrayLen, E> {
                Ok(ArrayLen::Wrong("null"))
            }
        }
        d.deserialize_any(V)
    }
}

/// An object key, borrowed when it has no escapes.
pub(crate) struct Key<'a>(pub(crate) Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// What a raw JSON value is, with scalars read out.
pub(crate) enum Kind<'a> {
    Null,
    Bool(bool),
    Number(&'a str),
    String(Cow<'a, str>),
    Object,
    Array,
}

/// Classifies raw JSON text (serde_json has already validated it).
pub(crate) fn kind(raw: &RawValue) -> Kind<'_> {
    let text = raw.get().trim();
    match text.as_bytes().first() {
        Some(b'n') => Kind::Null,
        Some(b't') => Kind::Bool(true),
        Some(b'f') => Kind::Bool(false),
        Some(b'{') => Kind::Object,
        Some(b'[') => Kind::Array,
        Some(b'"') => Kind::String(unquote(text)),
        _ => Kind::Number(text),
    }
}

/// The content of a JSON string literal; borrowed unless it has escapes.
fn unquote(text: &str) -> Cow<'_, str> {
    let inner = text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(text);
    if !inner.contains('\\') {
        return Cow::Borrowed(inner);
    }
    match serde_json::from_str::<String>(text) {
        Ok(s) => Cow::Owned(s),
        Err(_) => Cow::Borrowed(inner),
    }
}

/// How a value is quoted back to the client in a message: short, never the whole
/// of a large value.
pub(crate) fn got(raw: &RawValue) -> String {
    match kind(raw) {
        Kind::Null => "null".into(),
        Kind::Bool(b) => b.to_string(),
        Kind::Number(t) => clip(t),
        Kind::String(s) => serde_json::to_string(&clip(&s)).unwrap_or_else(|_| "a string".into()),
        Kind::Object => "an object".into(),
        Kind::Array => "an array".into(),
    }
}

fn clip(s: &str) -> String {
    match s.char_indices().nth(QUOTE_CHARS) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_owned(),
    }
}

/// Reads a raw value as a number: a JSON number, or a string holding one
/// (surrounding spaces allowed, a leading `+` allowed). `None` for anything else.
pub(crate) fn number(raw: &RawValue) -> Option<Num> {
    match kind(raw) {
        Kind::Number(t) => decimal::parse(t, false),
        Kind::String(s) => decimal::parse(s.trim(), true),
        _ => None,
    }
}

fn field_err(field: &str, rule: impl Into<String>, raw: &RawValue) -> PriceError {
    PriceError::Field {
        field: field.to_owned(),
        rule: rule.into(),
        got: got(raw),
    }
}

/// A whole number in `min..=max`; `default` when absent or null.
pub(crate) fn whole(
    raw: Option<&RawValue>,
    field: &str,
    min: u64,
    max: u64,
    default: u64,
) -> Result<u64, PriceError> {
    match raw {
        None => Ok(default),
        Some(raw) => whole_in(raw, field, min, max),
    }
}

/// A whole number in `min..=max`, or `None` when absent or null.
pub(crate) fn whole_opt(
    raw: Option<&RawValue>,
    field: &str,
    min: u64,
    max: u64,
) -> Result<Option<u64>, PriceError> {
    raw.map(|r| whole_in(r, field, min, max)).transpose()
}

fn whole_in(raw: &RawValue, field: &str, min: u64, max: u64) -> Result<u64, PriceError> {
    let rule = || format!("must be a whole number between {min} and {max}");
    let n = number(raw).ok_or_else(|| field_err(field, rule(), raw))?;
    match n.whole {
        Some(v) if !n.negative && v >= u128::from(min) && v <= u128::from(max) => {
            u64::try_from(v).map_err(|_| field_err(field, rule(), raw))
        }
        _ => Err(field_err(field, rule(), raw)),
    }
}

/// A number in `0..=max_micro` (millionths, see [`decimal`]), 0 when absent or null.
pub(crate) fn fraction(
    raw: Option<&RawValue>,
    field: &str,
    max_micro: u128,
) -> Result<u128, PriceError> {
    let Some(raw) = raw else { return Ok(0) };
    let rule = || {
        format!(
            "must be a number between 0 and {}",
            decimal::format_scaled(max_micro, 6)
        )
    };
    let n = number(raw).ok_or_else(|| field_err(field, rule(), raw))?;
    match n.micro {
        Some(v) if !n.negative && v <= max_micro => Ok(v),
        _ => Err(field_err(field, rule(), raw)),
    }
}

/// A flag: `true`/`false`, `"true"`/`"false"` (any case), `1`/`0`, `"1"`/`"0"`;
/// false when absent or null.
pub(crate) fn flag(raw: Option<&RawValue>, field: &str) -> Result<bool, PriceError> {
    let Some(raw) = raw else { return Ok(false) };
    let value = match kind(raw) {
        Kind::Bool(b) => Some(b),
        Kind::Number("1") => Some(true),
        Kind::Number("0") => Some(false),
        Kind::String(s) => match s.trim() {
            t if t.eq_ignore_ascii_case("true") || t == "1" => Some(true),
            t if t.eq_ignore_ascii_case("false") || t == "0" => Some(false),
            _ => None,
        },
        _ => None,
    };
    value.ok_or_else(|| field_err(field, "must be true or false", raw))
}

/// An id (`taskId`, `workflowId`, `utilityToolId`): a string as written, or a
/// number's text (a whole number in canonical digits, so `7` and `7.0` agree).
/// Big ids above 2^53 keep every digit. `None` for other kinds or an empty string.
pub(crate) fn id(raw: &RawValue) -> Option<String> {
    match kind(raw) {
        Kind::String(s) if !s.is_empty() => Some(s.into_owned()),
        Kind::Number(t) => match decimal::parse(t, false) {
            Some(Num {
                negative: false,
                whole: Some(v),
                ..
            }) => Some(v.to_string()),
            _ => Some(t.to_owned()),
        },
        _ => None,
    }
}

/// Whether a micro value is above one (the switch for hires fix and upscale).
pub(crate) fn above_one(micro: u128) -> bool {
    micro > MICRO
}

/// A value built from the entries of a JSON object with the help of a list of
/// field names known only at run time (from the price table).
pub(crate) trait FromMapWith: Sized {
    /// Reads the object's entries.
    fn from_map<'de, A: MapAccess<'de>>(fields: &[String], map: A) -> Result<Self, A::Error>;
}

/// Like [`parse_object`], for a [`FromMapWith`] value.
pub(crate) fn parse_object_seed<T: FromMapWith>(
    body: &[u8],
    fields: &[String],
) -> Result<T, PriceError> {
    struct Seed<'f, T>(&'f [String], PhantomData<T>);
    impl<'de, T: FromMapWith> de::DeserializeSeed<'de> for Seed<'_, T> {
        type Value = T;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
            d.deserialize_map(self)
        }
    }
    impl<'de, T: FromMapWith> Visitor<'de> for Seed<'_, T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            T::from_map(self.0, map)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = de::DeserializeSeed::deserialize(Seed(fields, PhantomData), &mut de)
        .and_then(|v| de.end().map(|()| v))
        .map_err(|e| PriceError::Body(format!("must be a JSON object ({e})")))?;
    Ok(value)
}
