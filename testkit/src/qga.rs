//! A minimal QEMU guest agent (QGA) client over the VM's `org.qemu.guest_agent.0` port: enough
//! for the chaos test to act inside a running guest from the host (`guest-exec` of `pkill`,
//! reading `/run/kiln/status.json`) without any hook in the product or a network path.
//!
//! The agent only answers once the guest has booted far enough to start it, and a guest reset
//! drops whatever it was doing; so every call first synchronises with `guest-sync-delimited`
//! (a fresh id, replies to older ids and stray bytes are skipped), and calls take a timeout.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

pub struct Qga {
    socket: PathBuf,
    stream: Option<UnixStream>,
    buf: Vec<u8>,
    next_id: u64,
}

/// What a `guest-exec` run ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecResult {
    pub exit_code: Option<i64>,
    pub signal: Option<i64>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Qga {
    /// A client for the VM's QGA socket; connects lazily (QEMU creates it when it starts).
    pub fn new(socket: &Path) -> Self {
        Qga {
            socket: socket.to_path_buf(),
            stream: None,
            buf: Vec::new(),
            // Distinct per client, so replies meant for an earlier client are never taken.
            next_id: (std::process::id() as u64) << 20
                | (std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.subsec_nanos() as u64 & 0xfffff)
                    .unwrap_or(0)),
        }
    }

    fn stream(&mut self) -> Result<&mut UnixStream> {
        if self.stream.is_none() {
            let s = UnixStream::connect(&self.socket)
                .with_context(|| format!("connecting to QGA socket {}", self.socket.display()))?;
            s.set_read_timeout(Some(Duration::from_millis(200)))?;
            self.stream = Some(s);
            self.buf.clear();
        }
        Ok(self.stream.as_mut().unwrap())
    }

    fn send(&mut self, bytes: &[u8]) -> Result<()> {
        let r = self.stream()?.write_all(bytes);
        if let Err(e) = r {
            self.stream = None;
            return Err(e).context("writing to the QGA socket");
        }
        Ok(())
    }

    /// The next complete JSON message, or None when `until` passes first.
    fn read_message(&mut self, until: Instant) -> Result<Option<Value>> {
        loop {
            // 0xFF is the delimiter `guest-sync-delimited` puts before its reply: drop it.
            self.buf.retain(|&b| b != 0xff);
            if let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                match serde_json::from_slice::<Value>(&line) {
                    Ok(v) => return Ok(Some(v)),
                    // Half a message from before a reset: skip it.
                    Err(_) => continue,
                }
            }
            if Instant::now() >= until {
                return Ok(None);
            }
            let mut chunk = [0u8; 65536];
            let r = self.stream()?.read(&mut chunk);
            match r {
                Ok(0) => {
                    self.stream = None;
                    bail!("QGA socket {} closed", self.socket.display());
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => {
                    self.stream = None;
                    return Err(e).context("reading from the QGA socket");
                }
            }
        }
    }

    /// Waits until the agent answers (it starts late in the guest's boot), up to `timeout`.
    pub fn sync(&mut self, timeout: Duration) -> Result<()> {
        let until = Instant::now() + timeout;
        loop {
            self.next_id += 1;
            let id = self.next_id;
            let msg = json!({"execute": "guest-sync-delimited", "arguments": {"id": id}});
            // A leading 0xFF resets the agent's parser if a reset cut a request in half.
            let mut bytes = vec![0xffu8];
            bytes.extend_from_slice(format!("{msg}\n").as_bytes());
            let sent = self.send(&bytes);
            if sent.is_ok() {
                let wait = (Instant::now() + Duration::from_secs(3)).min(until);
                while let Ok(Some(v)) = self.read_message(wait) {
                    if v.get("return").and_then(Value::as_u64) == Some(id) {
                        return Ok(());
                    }
                }
            } else {
                std::thread::sleep(Duration::from_millis(200));
            }
            if Instant::now() >= until {
                bail!(
                    "the guest agent did not answer on {} within {}s",
                    self.socket.display(),
                    timeout.as_secs()
                );
            }
        }
    }

    /// Runs one agent command (after [`Qga::sync`]) and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value, timeout: Duration) -> Result<Value> {
        self.sync(timeout)?;
        let msg = json!({"execute": command, "arguments": arguments});
        self.send(format!("{msg}\n").as_bytes())?;
        let until = Instant::now() + timeout;
        loop {
            match self.read_message(until)? {
                Some(v) => {
                    if let Some(err) = v.get("error") {
                        bail!("QGA {command} failed: {err}");
                    }
                    // The agent answers in order and the sync just matched its own reply, so
                    // every older reply has been read: the next one is ours.
                    match v.get("return") {
                        Some(r) => return Ok(r.clone()),
                        None => continue,
                    }
                }
                None => bail!("QGA {command}: no reply within {}s", timeout.as_secs()),
            }
        }
    }

    /// Runs `path args...` in the guest and waits for it to end.
    pub fn exec(&mut self, path: &str, args: &[&str], timeout: Duration) -> Result<ExecResult> {
        let started = self.execute(
            "guest-exec",
            json!({"path": path, "arg": args, "capture-output": true}),
            timeout,
        )?;
        let pid = started["pid"]
            .as_i64()
            .with_context(|| format!("guest-exec {path}: no pid in {started}"))?;
        let until = Instant::now() + timeout;
        loop {
            let st = self.execute("guest-exec-status", json!({"pid": pid}), timeout)?;
            if st["exited"].as_bool() == Some(true) {
                let data = |k: &str| -> Result<Vec<u8>> {
                    match st[k].as_str() {
                        Some(s) => base64_decode(s),
                        None => Ok(Vec::new()),
                    }
                };
                return Ok(ExecResult {
                    exit_code: st["exitcode"].as_i64(),
                    signal: st["signal"].as_i64(),
                    stdout: data("out-data")?,
                    stderr: data("err-data")?,
                });
            }
            if Instant::now() >= until {
                bail!(
                    "guest-exec {path} {args:?} still running after {}s",
                    timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Contents of a guest file (e.g. on a tmpfs the disk reader cannot see).
    pub fn read_file(&mut self, path: &str, timeout: Duration) -> Result<Vec<u8>> {
        let handle = self.execute(
            "guest-file-open",
            json!({"path": path, "mode": "r"}),
            timeout,
        )?;
        let handle = handle
            .as_i64()
            .with_context(|| format!("guest-file-open {path}: {handle}"))?;
        let mut out = Vec::new();
        let r = (|| -> Result<()> {
            loop {
                let chunk = self.execute(
                    "guest-file-read",
                    json!({"handle": handle, "count": 48 * 1024}),
                    timeout,
                )?;
                out.extend(base64_decode(chunk["buf-b64"].as_str().unwrap_or(""))?);
                if chunk["eof"].as_bool() != Some(false) {
                    return Ok(());
                }
            }
        })();
        let _ = self.execute("guest-file-close", json!({"handle": handle}), timeout);
        r.with_context(|| format!("reading guest file {path}"))?;
        Ok(out)
    }
}

/// Standard base64 (the agent's encoding of command output and file data).
pub fn base64_decode(s: &str) -> Result<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let clean: Vec<u8> = s
        .bytes()
        .filter(|b| !b.is_ascii_whitespace() && *b != b'=')
        .collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        if chunk.len() == 1 {
            bail!("truncated base64 data");
        }
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            let v = val(c).with_context(|| format!("invalid base64 byte {c:#x}"))?;
            acc |= v << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes_padded_and_unpadded_data() {
        assert_eq!(base64_decode("").unwrap(), b"");
        assert_eq!(base64_decode("Zg==").unwrap(), b"f");
        assert_eq!(base64_decode("Zm8=").unwrap(), b"fo");
        assert_eq!(base64_decode("Zm9v").unwrap(), b"foo");
        assert_eq!(base64_decode("Zm9vYmFy\n").unwrap(), b"foobar");
        assert_eq!(base64_decode("a2lsbjoK").unwrap(), b"kiln:\n");
        assert!(base64_decode("Zm9v!").is_err());
    }

    #[test]
    fn replies_to_earlier_syncs_and_torn_lines_are_skipped() {
        // A fake agent on a socketpair: a torn line from before a "reset", a reply to an old
        // sync, then the answers to ours.
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qga.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let agent = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut r = std::io::BufReader::new(s.try_clone().unwrap());
            let mut line = Vec::new();
            use std::io::BufRead;
            // guest-sync-delimited
            r.read_until(b'\n', &mut line).unwrap();
            assert_eq!(line[0], 0xff, "sync must start with the delimiter byte");
            let v: Value = serde_json::from_slice(&line[1..]).unwrap();
            let id = v["arguments"]["id"].as_u64().unwrap();
            s.write_all(b"{\"return\": {\"pi").unwrap();
            s.write_all(b"\n{\"return\": 7}\n").unwrap();
            s.write_all(&[0xff]).unwrap();
            s.write_all(format!("{{\"return\": {id}}}\n").as_bytes())
                .unwrap();
            line.clear();
            r.read_until(b'\n', &mut line).unwrap();
            s.write_all(b"{\"return\": {\"pid\": 42}}\n").unwrap();
            // guest-file-open answers with a bare number, like a sync reply.
            line.clear();
            r.read_until(b'\n', &mut line).unwrap();
            let v: Value = serde_json::from_slice(&line[1..]).unwrap();
            let id = v["arguments"]["id"].as_u64().unwrap();
            s.write_all(&[0xff]).unwrap();
            s.write_all(format!("{{\"return\": {id}}}\n").as_bytes())
                .unwrap();
            line.clear();
            r.read_until(b'\n', &mut line).unwrap();
            s.write_all(b"{\"return\": 1000}\n").unwrap();
        });
        let mut q = Qga::new(&sock);
        let r = q
            .execute(
                "guest-exec",
                json!({"path": "/bin/true"}),
                Duration::from_secs(5),
            )
            .unwrap();
        assert_eq!(r["pid"], 42);
        let h = q
            .execute(
                "guest-file-open",
                json!({"path": "/x"}),
                Duration::from_secs(5),
            )
            .unwrap();
        assert_eq!(h, 1000);
        agent.join().unwrap();
    }
}
