//! A loopback HTTP/1.1 artifact mirror with fault injection.
//!
//! Serves one directory (URL paths are percent-decoded, so `/k3s/v1.32.4%2Bk3s1/k3s` is the
//! file `k3s/v1.32.4+k3s1/k3s`), answers `Range: bytes=N-[M]` with 206 + `Content-Range`, and
//! closes every connection after one response. Per path, a script of [`Fault`]s is consumed
//! one per request; when it runs out the file is served normally (or a [`Fault`] can be made
//! permanent with [`Mirror::fault_always`]).
//!
//! Used by the daemon's download tests, the steps' tests, and `kiln qemu` (the guest reaches it
//! through `guestfwd`). Std threads only; it binds 127.0.0.1 unless told otherwise.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// What to do to one response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status and a short body instead of the file (e.g. 500, 503, 429).
    Status(u16),
    /// 404 even though the file exists.
    NotFound,
    /// Read the request, then send nothing until the mirror is dropped.
    Hang,
    /// Send the headers and the first `n` body bytes, then stall until the mirror is dropped
    /// (a deterministic "mid-download" point).
    HangAfter(u64),
    /// Send the headers (honest Content-Length) and the first `n` body bytes, then close.
    Truncate(u64),
    /// Serve the file with the byte at this offset (of the whole file) inverted.
    FlipByte(u64),
    /// Serve the whole body with a `Content-Length` header of this value.
    WrongLength(u64),
    /// Serve the whole file with 200 and ignore any `Range` header.
    IgnoreRange,
    /// Serve normally but pace the body at about this many bytes per second.
    Slow(u64),
}

/// One request as the mirror saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// Decoded path without the leading `/`.
    pub path: String,
    pub range: Option<String>,
    pub status: u16,
    pub fault: Option<Fault>,
}

#[derive(Default)]
struct Faults {
    scripted: HashMap<String, VecDeque<Fault>>,
    always: HashMap<String, Fault>,
}

struct Shared {
    dir: PathBuf,
    faults: Mutex<Faults>,
    log: Mutex<Vec<Request>>,
    stop: AtomicBool,
}

/// A running mirror; stops (and releases hung connections) when dropped.
pub struct Mirror {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl Mirror {
    /// Serves `dir` on 127.0.0.1 with a free port.
    pub fn start(dir: impl Into<PathBuf>) -> io::Result<Mirror> {
        Mirror::start_on(dir, "127.0.0.1:0".parse().unwrap())
    }

    /// Serves `dir` on `addr` (keep it on loopback).
    pub fn start_on(dir: impl Into<PathBuf>, addr: SocketAddr) -> io::Result<Mirror> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            dir: dir.into(),
            faults: Mutex::new(Faults::default()),
            log: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let s2 = shared.clone();
        let accept = std::thread::Builder::new()
            .name("kiln-mirror".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if s2.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let s3 = s2.clone();
                    let _ = std::thread::Builder::new()
                        .name("kiln-mirror-conn".into())
                        .spawn(move || {
                            let _ = handle(&s3, conn);
                        });
                }
            })?;
        Ok(Mirror {
            addr,
            shared,
            accept: Some(accept),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
    /// `http://127.0.0.1:PORT/` (with the trailing slash, ready for `Url::join`).
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Queues faults for `path` (decoded, no leading `/`): request n gets the n-th fault, later
    /// requests are served normally.
    pub fn fault(&self, path: &str, script: impl IntoIterator<Item = Fault>) {
        let mut f = self.shared.faults.lock().unwrap();
        f.scripted
            .entry(path.trim_start_matches('/').to_string())
            .or_default()
            .extend(script);
    }

    /// Applies `fault` to every request for `path` (after any scripted ones).
    pub fn fault_always(&self, path: &str, fault: Fault) {
        let mut f = self.shared.faults.lock().unwrap();
        f.always
            .insert(path.trim_start_matches('/').to_string(), fault);
    }

    /// Removes every fault for `path`.
    pub fn clear_faults(&self, path: &str) {
        let mut f = self.shared.faults.lock().unwrap();
        let p = path.trim_start_matches('/');
        f.scripted.remove(p);
        f.always.remove(p);
    }

    /// Every request served so far, in order.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.log.lock().unwrap().clone()
    }

    /// How many requests named `path`.
    pub fn hits(&self, path: &str) -> usize {
        let p = path.trim_start_matches('/');
        self.shared
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path == p)
            .count()
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

/// Percent-decodes a URL path; `None` for anything that would leave the served directory.
fn decode_path(raw: &str) -> Option<String> {
    let raw = raw.split(['?', '#']).next().unwrap_or("");
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let h = std::str::from_utf8(&bytes[i + 1..i + 3]).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    let s = String::from_utf8(out).ok()?;
    let rel = s.trim_start_matches('/').to_string();
    let ok = Path::new(&rel)
        .components()
        .all(|c| matches!(c, Component::Normal(_)));
    ok.then_some(rel)
}

fn parse_range(v: &str, len: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = v.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None; // multi-range: ignore, serve the whole file
    }
    let (a, b) = spec.split_once('-')?;
    let start: u64 = a.trim().parse().ok()?;
    let end = if b.trim().is_empty() {
        len.saturating_sub(1)
    } else {
        b.trim().parse::<u64>().ok()?.min(len.saturating_sub(1))
    };
    if start >= len || end < start {
        return Some(Err(()));
    }
    Some(Ok((start, end)))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

fn handle(shared: &Shared, conn: TcpStream) -> io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let mut range = None;
    let mut head_bytes = line.len();
    loop {
        let mut h = String::new();
        let n = reader.read_line(&mut h)?;
        head_bytes += n;
        if n == 0 || h == "\r\n" || h == "\n" || head_bytes > 64 * 1024 {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.trim().eq_ignore_ascii_case("range") {
                range = Some(v.trim().to_string());
            }
        }
    }
    let mut conn = conn;
    let path = decode_path(&target);
    let fault = path.as_ref().and_then(|p| {
        let mut f = shared.faults.lock().unwrap();
        match f.scripted.get_mut(p).and_then(|q| q.pop_front()) {
            Some(x) => Some(x),
            None => f.always.get(p).cloned(),
        }
    });
    let log = |status: u16| {
        shared.log.lock().unwrap().push(Request {
            method: method.clone(),
            path: path.clone().unwrap_or_else(|| target.clone()),
            range: range.clone(),
            status,
            fault: fault.clone(),
        });
    };
    let simple = |conn: &mut TcpStream, status: u16, extra: &str| -> io::Result<()> {
        let body = format!("{status} {}\n", reason(status));
        write!(
            conn,
            "HTTP/1.1 {status} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}",
            reason(status),
            body.len()
        )?;
        conn.flush()
    };
    if method != "GET" && method != "HEAD" {
        log(405);
        return simple(&mut conn, 405, "");
    }
    let Some(rel) = path.clone() else {
        log(400);
        return simple(&mut conn, 400, "");
    };
    match &fault {
        Some(Fault::Status(s)) => {
            log(*s);
            return simple(&mut conn, *s, "");
        }
        Some(Fault::NotFound) => {
            log(404);
            return simple(&mut conn, 404, "");
        }
        Some(Fault::Hang) => {
            log(0);
            stall(shared);
            return Ok(());
        }
        _ => {}
    }
    let file_path = shared.dir.join(&rel);
    let mut file = match File::open(&file_path) {
        Ok(f) if f.metadata().map(|m| m.is_file()).unwrap_or(false) => f,
        _ => {
            log(404);
            return simple(&mut conn, 404, "");
        }
    };
    let len = file.metadata()?.len();
    let use_range = !matches!(fault, Some(Fault::IgnoreRange));
    let (status, start, end) = match range.as_deref().filter(|_| use_range) {
        Some(r) => match parse_range(r, len) {
            Some(Ok((a, b))) => (206, a, b),
            Some(Err(())) => {
                log(416);
                return simple(&mut conn, 416, &format!("Content-Range: bytes */{len}\r\n"));
            }
            None => (200, 0, len.saturating_sub(1)),
        },
        None => (200, 0, len.saturating_sub(1)),
    };
    let body_len = if len == 0 { 0 } else { end - start + 1 };
    let declared = match fault {
        Some(Fault::WrongLength(n)) => n,
        _ => body_len,
    };
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/octet-stream\r\nContent-Length: {declared}\r\nAccept-Ranges: bytes\r\nConnection: close\r\n",
        reason(status)
    );
    if status == 206 {
        head.push_str(&format!("Content-Range: bytes {start}-{end}/{len}\r\n"));
    }
    head.push_str("\r\n");
    log(status);
    conn.write_all(head.as_bytes())?;
    if method == "HEAD" {
        return conn.flush();
    }
    file.seek(SeekFrom::Start(start))?;
    let limit = match fault {
        Some(Fault::Truncate(n)) | Some(Fault::HangAfter(n)) => n.min(body_len),
        _ => body_len,
    };
    let mut sent = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    while sent < limit {
        let want = ((limit - sent) as usize).min(match fault {
            Some(Fault::Slow(bps)) => (bps as usize / 10).clamp(1, buf.len()),
            _ => buf.len(),
        });
        let n = file.read(&mut buf[..want])?;
        if n == 0 {
            break;
        }
        if let Some(Fault::FlipByte(off)) = fault {
            let abs = start + sent;
            if off >= abs && off < abs + n as u64 {
                buf[(off - abs) as usize] ^= 0xff;
            }
        }
        conn.write_all(&buf[..n])?;
        sent += n as u64;
        if let Some(Fault::Slow(_)) = fault {
            conn.flush()?;
            std::thread::sleep(Duration::from_millis(100));
            if shared.stop.load(Ordering::SeqCst) {
                break;
            }
        }
    }
    conn.flush()?;
    if let Some(Fault::HangAfter(_)) = fault {
        stall(shared);
    }
    let _ = conn.shutdown(Shutdown::Both);
    Ok(())
}

fn stall(shared: &Shared) {
    while !shared.stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(m: &Mirror, path: &str, range: Option<&str>) -> (String, Vec<u8>) {
        let mut c = TcpStream::connect(m.addr()).unwrap();
        let r = range.map(|r| format!("Range: {r}\r\n")).unwrap_or_default();
        write!(c, "GET /{path} HTTP/1.1\r\nHost: x\r\n{r}\r\n").unwrap();
        let mut all = Vec::new();
        c.read_to_end(&mut all).unwrap();
        let split = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        (
            String::from_utf8_lossy(&all[..split]).into_owned(),
            all[split + 4..].to_vec(),
        )
    }

    #[test]
    fn serves_decoded_paths_ranges_and_scripted_faults() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("k3s/v1.32.4+k3s1")).unwrap();
        std::fs::write(d.path().join("k3s/v1.32.4+k3s1/k3s"), b"0123456789").unwrap();
        let m = Mirror::start(d.path()).unwrap();
        let p = "k3s/v1.32.4%2Bk3s1/k3s";
        let (h, b) = get(&m, p, None);
        assert!(h.starts_with("HTTP/1.1 200"), "{h}");
        assert_eq!(b, b"0123456789");
        let (h, b) = get(&m, p, Some("bytes=4-"));
        assert!(
            h.contains("206") && h.contains("Content-Range: bytes 4-9/10"),
            "{h}"
        );
        assert_eq!(b, b"456789");
        let (h, _) = get(&m, p, Some("bytes=10-"));
        assert!(h.contains("416"), "{h}");

        m.fault(
            "k3s/v1.32.4+k3s1/k3s",
            [Fault::Status(503), Fault::FlipByte(0), Fault::Truncate(3)],
        );
        assert!(get(&m, p, None).0.contains("503"));
        assert_eq!(get(&m, p, None).1[0], b'0' ^ 0xff);
        let (h, b) = get(&m, p, None);
        assert!(h.contains("Content-Length: 10"), "{h}");
        assert_eq!(b, b"012");
        assert_eq!(get(&m, p, None).1, b"0123456789");
        assert_eq!(m.hits("k3s/v1.32.4+k3s1/k3s"), 7);
        assert!(get(&m, "../etc/passwd", None).0.contains("400"));
        assert!(get(&m, "nope", None).0.contains("404"));
    }
}
