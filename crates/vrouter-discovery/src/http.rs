//! The HTTP endpoint: `/healthz`, `/readyz`, `/metrics`, `/v1/status`. A task of its
//! own beside the loop; it reads the state files (off the runtime thread) and the
//! loop's shared [`Live`] facts, and never waits on the loop.

use crate::readiness::Live;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

/// At most this many connections are served at once; more wait in the backlog.
const MAX_CONNECTIONS: usize = 32;

/// Binds the listener (so a taken port is reported at start) and serves it forever.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// `steering_table` is the netdev table whose rule counters the status shows.
pub async fn serve(
    listener: TcpListener,
    state_dir: PathBuf,
    steering_table: String,
    live: Arc<Live>,
) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = match limit.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => return,
        };
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!("HTTP accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let state_dir = state_dir.clone();
        let table = steering_table.clone();
        let live = live.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state_dir = state_dir.clone();
                let table = table.clone();
                let live = live.clone();
                async move { Ok::<_, Infallible>(answer(&req, state_dir, table, live).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), service);
            // A connection that idles after its requests is closed, so it cannot hold
            // a permit forever.
            match tokio::time::timeout(Duration::from_secs(30), conn).await {
                Ok(Err(e)) => debug!("HTTP connection from {peer}: {e}"),
                Err(_) => debug!("HTTP connection from {peer} closed after 30 s"),
                Ok(Ok(())) => {}
            }
            drop(permit);
        });
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";

async fn answer<B>(
    req: &Request<B>,
    state_dir: PathBuf,
    steering_table: String,
    live: Arc<Live>,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "only GET and HEAD\n".into(),
        );
        r.headers_mut()
            .insert(hyper::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        // Alive means the control loop still completes reconciles, not only that this
        // task answers.
        "/healthz" => match live.stalled(std::time::Instant::now()) {
            None => reply(StatusCode::OK, TEXT, "ok\n".into()),
            Some(why) => reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, format!("{why}\n")),
        },
        "/readyz" => {
            let facts = live.facts();
            if facts.ready {
                reply(StatusCode::OK, TEXT, "ready\n".into())
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    format!("not ready: {}\n", facts.not_ready.join("; ")),
                )
            }
        }
        path @ ("/metrics" | "/v1/status") => {
            let metrics = path == "/metrics";
            let facts = live.facts();
            let hist = live.reconcile_duration.clone();
            // File reads and parsing happen off the runtime thread the loop runs on.
            let built = tokio::task::spawn_blocking(move || {
                let dir = vrouter_state::StateDir::open_readonly(&state_dir)
                    .map_err(|e| e.to_string())?;
                let counters = crate::steering::counters_or_none(&steering_table);
                let status = crate::status::from_dir(&dir, Some(facts), &counters)?;
                Ok::<_, String>(if metrics {
                    crate::metrics::render(&status, Some(&hist))
                } else {
                    serde_json::to_string_pretty(&status).expect("a Status always serialises")
                        + "\n"
                })
            })
            .await;
            match built {
                Ok(Ok(body)) if metrics => {
                    reply(StatusCode::OK, crate::metrics::CONTENT_TYPE, body)
                }
                Ok(Ok(body)) => reply(StatusCode::OK, JSON, body),
                Ok(Err(e)) => reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, format!("{e}\n")),
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    TEXT,
                    format!("status task failed: {e}\n"),
                ),
            }
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found; try /healthz, /readyz, /metrics or /v1/status\n".into(),
        ),
    }
}

/// A plain HTTP/1.0 GET for `vrouter-discovery health`: (status code, body). An
/// unspecified listen address is asked on loopback.
pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    // Within the image HEALTHCHECK's 3 s timeout.
    let timeout = Duration::from_secs(1);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = Vec::new();
    stream.take(64 * 1024).read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP answer");
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(bad)?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((code, body.to_string()))
}
