//! The upstream client: one pooled reqwest client for the whole gate, so no request
//! pays for connection setup. It never retries: a billable submit sent twice could
//! be billed twice.

use crate::config::{Secret, UpstreamConfig};
use bytes::Bytes;
use dashmap::DashMap;
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use std::sync::Arc;
use std::time::Duration;

/// How a forward failed, in the terms that decide the charge.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The request never reached the upstream (connection refused, connect timeout,
    /// DNS): nothing can have been billed.
    #[error("upstream unreachable: {0}")]
    NotSent(String),
    /// The request was sent, then the answer was lost (reset, timeout, cut body): the
    /// upstream may or may not have run it.
    #[error("upstream answer lost: {0}")]
    Unknown(String),
}

impl ForwardError {
    /// Whether the upstream can have acted on the request.
    pub fn maybe_sent(&self) -> bool {
        matches!(self, ForwardError::Unknown(_))
    }
}

/// One answer from the upstream, fully read.
#[derive(Debug, Clone)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// `Content-Type`, when sent.
    pub content_type: Option<HeaderValue>,
    /// The body bytes as sent.
    pub body: Bytes,
}

/// The pooled upstream client. Cheap to clone.
#[derive(Clone)]
pub struct Upstream {
    client: reqwest::Client,
    base: String,
    token: Secret,
    /// The token as a header value, made once (marked sensitive); `None` when it
    /// cannot be one, and each send then fails as a request reqwest cannot build.
    auth: Option<HeaderValue>,
    /// Parsed URLs of paths sent without a query: a clone costs less than a
    /// parse of scheme, host and path for every request (2% of a gate's CPU).
    urls: Arc<DashMap<Box<str>, reqwest::Url>>,
    max_answer: usize,
}

/// At most this many paths keep a parsed URL. The routed paths are a fixed set,
/// so the bound only matters if that changes.
const MAX_URLS: usize = 256;

const AUTH_TOKEN: HeaderName = HeaderName::from_static("auth-token");

/// Request headers passed on to the upstream; everything else (the client's own
/// credentials above all) stays at the gate.
const FORWARDED: [HeaderName; 3] = [
    CONTENT_TYPE,
    hyper::header::ACCEPT,
    hyper::header::USER_AGENT,
];

impl Upstream {
    /// Build the client from the configuration.
    pub fn new(cfg: &UpstreamConfig) -> Result<Upstream, ForwardError> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(cfg.connect_timeout_ms))
            .timeout(Duration::from_secs(cfg.timeout_secs))
            .pool_max_idle_per_host(cfg.pool_max_idle)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ForwardError::NotSent(format!("cannot build client: {e}")))?;
        let auth = HeaderValue::from_str(cfg.token.expose()).ok().map(|mut v| {
            v.set_sensitive(true);
            v
        });
        Ok(Upstream {
            client,
            base: cfg.url.clone(),
            token: cfg.token.clone(),
            auth,
            urls: Arc::default(),
            max_answer: cfg.max_answer_bytes,
        })
    }

    /// The base URL (for readiness checks and logs; carries no secret).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Send one request with the operator's token and read the whole answer.
    pub async fn send(
        &self,
        get: bool,
        path_and_query: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<Answer, ForwardError> {
        let url = self.url(path_and_query)?;
        let mut req = if get {
            self.client.get(url)
        } else {
            self.client.post(url).body(body)
        };
        for name in FORWARDED.iter() {
            if let Some(v) = headers.get(name) {
                req = req.header(name, v);
            }
        }
        req = match &self.auth {
            Some(v) => req.header(AUTH_TOKEN, v.clone()),
            None => req.header(AUTH_TOKEN, self.token.expose()),
        };
        let mut resp = req.send().await.map_err(classify)?;
        let status = resp.status().as_u16();
        let content_type = resp.headers().get(CONTENT_TYPE).cloned();
        if resp
            .content_length()
            .is_some_and(|n| n > self.max_answer as u64)
        {
            return Err(ForwardError::Unknown("answer larger than the limit".into()));
        }
        let mut buf =
            Vec::with_capacity(resp.content_length().unwrap_or(1024).min(1 << 20) as usize);
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if buf.len() + chunk.len() > self.max_answer {
                        return Err(ForwardError::Unknown("answer larger than the limit".into()));
                    }
                    buf.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => return Err(ForwardError::Unknown(describe(&e))),
            }
        }
        Ok(Answer {
            status,
            content_type,
            body: Bytes::from(buf),
        })
    }
}

impl Upstream {
    /// The upstream URL of a client's path (and query), parsed once per path.
    fn url(&self, path_and_query: &str) -> Result<reqwest::Url, ForwardError> {
        if let Some(url) = self.urls.get(path_and_query) {
            return Ok(url.clone());
        }
        let url = reqwest::Url::parse(&format!("{}{}", self.base, path_and_query))
            .map_err(|e| ForwardError::NotSent(format!("cannot make the upstream URL: {e}")))?;
        if !path_and_query.contains('?') && self.urls.len() < MAX_URLS {
            self.urls.insert(path_and_query.into(), url.clone());
        }
        Ok(url)
    }
}

/// Decide whether a send error can have reached the upstream.
fn classify(e: reqwest::Error) -> ForwardError {
    if e.is_connect() || e.is_builder() {
        ForwardError::NotSent(describe(&e))
    } else {
        ForwardError::Unknown(describe(&e))
    }
}

/// An error's chain as text. reqwest errors carry the URL, which holds no secret
/// (the token travels in a header).
fn describe(e: &reqwest::Error) -> String {
    use std::error::Error;
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(url: &str) -> Upstream {
        let cfg = UpstreamConfig {
            url: url.into(),
            ..UpstreamConfig::default()
        };
        Upstream::new(&cfg).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_paths_url_is_the_parse_of_base_and_path_and_only_query_free_paths_are_kept() {
        let up = upstream("http://127.0.0.1:9/prefix");
        for path in [
            "/aiapi/v1/draw",
            "/a/../b%20c",
            "/aiapi/v1/draw?taskId=1&x=%41",
        ] {
            let expected = reqwest::Url::parse(&format!("http://127.0.0.1:9/prefix{path}"))
                .map(|u| u.to_string())
                .ok();
            for _ in 0..2 {
                assert_eq!(up.url(path).map(|u| u.to_string()).ok(), expected, "{path}");
            }
        }
        assert_eq!(up.urls.len(), 2);
        assert!(up.urls.get("/aiapi/v1/draw").is_some());

        for i in 0..MAX_URLS + 10 {
            assert!(up.url(&format!("/p{i}")).is_ok());
        }
        assert_eq!(up.urls.len(), MAX_URLS);

        let bad = upstream("not a url");
        assert!(matches!(bad.url("/x"), Err(ForwardError::NotSent(_))));
    }
}
