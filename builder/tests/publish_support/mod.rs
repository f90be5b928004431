//! Test harness for the Azure publish tests: a real Azurite on 127.0.0.1 and a loopback fault proxy.
//!
//! Azurite (npm package `azurite`) is found at `$KILN_AZURITE`, on `PATH` as `azurite-blob`, or
//! under `<workspace>/target/azurite/node_modules/.bin/` (where `.ci/run` installs it). When it is
//! missing the tests print why and pass vacuously, unless `KILN_REQUIRE_AZURITE` is set (CI), in
//! which case they fail.
#![allow(dead_code)]

use kiln::publish::StorageAccount;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Azurite's published development account (a well-known, non-secret key).
pub const ACCOUNT: &str = "devstoreaccount1";
pub const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn find_azurite() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KILN_AZURITE") {
        return Some(PathBuf::from(p));
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let c = dir.join("azurite-blob");
            if c.is_file() {
                return Some(c);
            }
        }
    }
    ["target", "target-azure"]
        .iter()
        .map(|t| {
            workspace()
                .join(t)
                .join("azurite/node_modules/.bin/azurite-blob")
        })
        .find(|p| p.exists())
}

/// `None` means "skip": Azurite is not installed and CI did not ask for it.
pub fn azurite_or_skip(test: &str) -> Option<PathBuf> {
    match find_azurite() {
        Some(p) => Some(p),
        None if std::env::var_os("KILN_REQUIRE_AZURITE").is_some() => panic!(
            "KILN_REQUIRE_AZURITE is set but azurite-blob was not found (set KILN_AZURITE or \
             `npm install --prefix target/azurite azurite@3.35.0`)"
        ),
        None => {
            eprintln!(
                "SKIPPED {test}: azurite-blob not found (install: npm install --prefix target/azurite \
                 azurite@3.35.0; set KILN_REQUIRE_AZURITE=1 to make this a failure)"
            );
            None
        }
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Azurite {
    bin: PathBuf,
    child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Azurite {
    pub fn start(bin: &Path) -> Azurite {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Azurite {
            bin: bin.to_path_buf(),
            child: None,
            port: free_port(),
            dir,
        };
        a.restart();
        a
    }

    /// (Re)starts on the same port and workspace, so stored blobs survive a stop/start.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "azurite already running");
        let log = std::fs::File::create(self.dir.path().join("azurite.out")).unwrap();
        let child = Command::new(&self.bin)
            .args(["--blobHost", "127.0.0.1", "--blobPort"])
            .arg(self.port.to_string())
            .arg("--location")
            .arg(self.dir.path().join("data"))
            .args(["--disableTelemetry", "--silent"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.bin.display()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                let out = std::fs::read_to_string(self.dir.path().join("azurite.out"))
                    .unwrap_or_default();
                panic!("azurite exited with {status} before listening:\n{out}");
            }
            assert!(
                Instant::now() < deadline,
                "azurite did not listen within 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("azurite running").id()
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{ACCOUNT}", self.port)
    }

    pub fn connection_string(&self) -> String {
        connection_string_for(&self.endpoint())
    }

    pub fn account(&self) -> StorageAccount {
        StorageAccount::from_connection_string(&self.connection_string()).unwrap()
    }
}

pub fn connection_string_for(endpoint: &str) -> String {
    format!(
        "DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};BlobEndpoint={endpoint};"
    )
}

impl Drop for Azurite {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A loopback TCP proxy in front of Azurite that answers the first `fail_first` connections with
/// `503 Server Busy` (what Azure Storage sends when throttling) and pipes the rest through.
pub struct FaultProxy {
    pub port: u16,
    pub served_503: Arc<AtomicUsize>,
    pub forwarded: Arc<AtomicUsize>,
}

impl FaultProxy {
    pub fn start(upstream_port: u16, fail_first: usize) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let served_503 = Arc::new(AtomicUsize::new(0));
        let forwarded = Arc::new(AtomicUsize::new(0));
        let (s503, fwd) = (served_503.clone(), forwarded.clone());
        let budget = Arc::new(AtomicUsize::new(fail_first));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let fail = budget
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                if fail {
                    s503.fetch_add(1, Ordering::SeqCst);
                    std::thread::spawn(move || answer_503(conn));
                } else {
                    fwd.fetch_add(1, Ordering::SeqCst);
                    std::thread::spawn(move || pipe(conn, upstream_port));
                }
            }
        });
        FaultProxy {
            port,
            served_503,
            forwarded,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{ACCOUNT}", self.port)
    }
}

fn answer_503(conn: TcpStream) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut content_length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let l = line.to_ascii_lowercase();
        if let Some(v) = l.strip_prefix("content-length:") {
            content_length = v.trim().parse().unwrap_or(0);
        }
        if line == "\r\n" {
            break;
        }
    }
    // Drain the body so the client sees a response, not a reset, whatever it was sending.
    let mut body = vec![0u8; content_length];
    let _ = reader.read_exact(&mut body);
    let mut conn = conn;
    let _ = conn.write_all(
        b"HTTP/1.1 503 Server Busy\r\nContent-Length: 0\r\nx-ms-error-code: ServerBusy\r\nConnection: close\r\n\r\n",
    );
    let _ = conn.shutdown(Shutdown::Both);
}

fn pipe(client: TcpStream, upstream_port: u16) {
    let Ok(upstream) = TcpStream::connect(("127.0.0.1", upstream_port)) else {
        return;
    };
    let (mut c_r, mut u_w) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
    let t = std::thread::spawn(move || {
        let _ = std::io::copy(&mut c_r, &mut u_w);
        let _ = u_w.shutdown(Shutdown::Write);
    });
    let (mut u_r, mut c_w) = (upstream, client);
    let _ = std::io::copy(&mut u_r, &mut c_w);
    let _ = c_w.shutdown(Shutdown::Write);
    let _ = t.join();
}

/// Accepts connections, reads nothing back, never answers: a hung storage front end.
pub struct HangServer {
    pub port: u16,
    accepted: Arc<AtomicUsize>,
}

impl HangServer {
    pub fn start() -> HangServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let a = accepted.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in listener.incoming().flatten() {
                a.fetch_add(1, Ordering::SeqCst);
                held.push(conn);
            }
        });
        HangServer { port, accepted }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{ACCOUNT}", self.port)
    }
}

/// `curl` as the bootstrap runs it; returns (HTTP status, body).
pub fn curl(url: &str) -> (u16, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("body");
    let o = Command::new("curl")
        .args(["-sS", "--noproxy", "*", "-o"])
        .arg(&out)
        .args(["-w", "%{http_code}", url])
        .output()
        .expect("running curl");
    let code: u16 = String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    (code, std::fs::read(&out).unwrap_or_default())
}

/// Deterministic pseudo-random bytes (incompressible enough to look like a real bundle).
pub fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}
