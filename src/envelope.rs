//! The upstream's response envelope, `{"code":..,"success":..,"msg":..,"data":..}`,
//! and the codes the gate answers with. Only the reply phase turns errors into it.

use serde::Serialize;

/// Upstream business codes the gate itself may answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Code {
    /// 1: internal error.
    Internal = 1,
    /// 3: business error (the upstream's answer for a task that does not exist).
    NotFound = 3,
    /// 1001: authentication failed.
    Auth = 1001,
    /// 1002: insufficient points (budget).
    Budget = 1002,
    /// 1003: bad parameters.
    Invalid = 1003,
    /// 1005: concurrent-task or rate limit reached.
    Limit = 1005,
}

impl Code {
    /// The numeric code as the upstream writes it.
    pub fn as_i64(self) -> i64 {
        self as i64
    }

    /// The HTTP status used when `reject_status = "semantic"`.
    pub fn semantic_status(self) -> u16 {
        match self {
            Code::Internal => 500,
            Code::NotFound => 404,
            Code::Auth => 401,
            Code::Budget => 402,
            Code::Invalid => 400,
            Code::Limit => 429,
        }
    }
}

/// A compact error envelope: `{"code":1002,"success":false,"msg":"...","data":null}`.
/// serde_json never escapes `/`, so URLs in messages stay as written.
pub fn error_body(code: Code, msg: &str) -> Vec<u8> {
    #[derive(Serialize)]
    struct Env<'a> {
        code: i64,
        success: bool,
        msg: &'a str,
        data: Option<()>,
    }
    serde_json::to_vec(&Env {
        code: code.as_i64(),
        success: false,
        msg,
        data: None,
    })
    .unwrap_or_else(|_| {
        br#"{"code":1,"success":false,"msg":"internal error","data":null}"#.to_vec()
    })
}

/// A compact success envelope around `data`, fields in the upstream's order
/// (`code`, `success`, `msg`, `data`): some clients match the raw text.
pub fn ok_body<T: Serialize>(data: &T) -> Vec<u8> {
    #[derive(Serialize)]
    struct Env<'a, T> {
        code: i64,
        success: bool,
        msg: &'a str,
        data: &'a T,
    }
    serde_json::to_vec(&Env {
        code: 0,
        success: true,
        msg: "success",
        data,
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ok_body_keeps_the_upstreams_field_order() {
        let b = ok_body(&serde_json::json!({"a": 1}));
        assert_eq!(
            std::str::from_utf8(&b).unwrap(),
            r#"{"code":0,"success":true,"msg":"success","data":{"a":1}}"#
        );
    }

    #[test]
    fn error_body_is_compact_with_unescaped_slashes() {
        let b = error_body(Code::Budget, "see https://x/y");
        assert_eq!(
            std::str::from_utf8(&b).unwrap(),
            r#"{"code":1002,"success":false,"msg":"see https://x/y","data":null}"#
        );
    }
}
