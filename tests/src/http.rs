//! A minimal HTTP/1.1 GET from inside a network namespace, for the discovery's HTTP
//! endpoint (which listens on the simulated host's loopback by default).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// An HTTP answer: status code and body.
#[derive(Debug, Clone)]
pub struct HttpReply {
    pub status: u16,
    pub body: String,
}

/// `METHOD path` to `addr` from inside network namespace `ns` (`/run/netns/<ns>`), on
/// a thread of its own that joins the namespace, so the caller's stays untouched.
pub fn http_request(ns: &str, addr: &str, method: &str, path: &str) -> Result<HttpReply> {
    let ns_path = format!("/run/netns/{ns}");
    let addr: SocketAddr = addr
        .parse()
        .with_context(|| format!("bad address {addr}"))?;
    let request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    std::thread::spawn(move || -> Result<HttpReply> {
        let f = std::fs::File::open(&ns_path).with_context(|| format!("opening {ns_path}"))?;
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns {ns_path}: {}", std::io::Error::last_os_error());
        }
        let timeout = Duration::from_secs(5);
        let mut s = TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("connecting to {addr} in {ns_path}"))?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        s.write_all(request.as_bytes())?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)
            .with_context(|| format!("reading the answer from {addr}"))?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .with_context(|| format!("no header end in {text:?}"))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("no status in {head:?}"))?;
        Ok(HttpReply {
            status,
            body: body.to_string(),
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("HTTP thread panicked"))?
}

/// `GET path`.
pub fn http_get(ns: &str, addr: &str, path: &str) -> Result<HttpReply> {
    http_request(ns, addr, "GET", path)
}

/// The value of one series in Prometheus text, by its exact name and labels.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}
