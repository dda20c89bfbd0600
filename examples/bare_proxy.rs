//! The gate's HTTP stack with nothing of the gate in it: a hyper server that
//! forwards every request to one upstream with reqwest and answers with what
//! came back. No keys, pricing, ledger or audit.
//!
//! `bench/load.py` runs it beside nginx and the gate, so that the table shows
//! how much of the distance to nginx is the stack (hyper + reqwest + tokio) and
//! how much is the gate's own work.
//!
//!     cargo build --release --example bare_proxy
//!     BARE_PROXY_TOKEN=... target/release/examples/bare_proxy 127.0.0.1:8080 http://127.0.0.1:9000
//!
//! Like nginx in the table, it replaces the client's token with the upstream's
//! (given in the environment, so that it is not on the command line).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::sync::Arc;

#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

struct Proxy {
    client: reqwest::Client,
    upstream: String,
    token: String,
}

async fn forward(p: Arc<Proxy>, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return status(400),
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut out = p
        .client
        .request(parts.method, format!("{}{}", p.upstream, path))
        .body(body);
    for name in [
        hyper::header::CONTENT_TYPE,
        hyper::header::ACCEPT,
        hyper::header::USER_AGENT,
    ] {
        if let Some(v) = parts.headers.get(&name) {
            out = out.header(name, v);
        }
    }
    out = out.header("Auth-Token", &p.token);
    let answer = match out.send().await {
        Ok(a) => a,
        Err(_) => return status(502),
    };
    let code = answer.status();
    let content_type = answer.headers().get(hyper::header::CONTENT_TYPE).cloned();
    let bytes = match answer.bytes().await {
        Ok(b) => b,
        Err(_) => return status(502),
    };
    let mut resp = Response::new(Full::new(bytes));
    *resp.status_mut() = code;
    if let Some(ct) = content_type {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, ct);
    }
    resp
}

fn status(code: u16) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = hyper::StatusCode::from_u16(code).unwrap_or_default();
    resp
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        eprintln!(
            "usage: bare_proxy LISTEN_ADDR UPSTREAM_URL  (upstream token in BARE_PROXY_TOKEN)"
        );
        std::process::exit(2);
    };
    let proxy = Arc::new(Proxy {
        client: reqwest::Client::builder()
            .tcp_nodelay(true)
            .redirect(reqwest::redirect::Policy::none())
            .build()?,
        upstream: upstream.trim_end_matches('/').to_owned(),
        token: std::env::var("BARE_PROXY_TOKEN").unwrap_or_default(),
    });
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let proxy = proxy.clone();
                async move { Ok::<_, Infallible>(forward(proxy, req).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
