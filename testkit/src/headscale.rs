//! A real Headscale control server (v0.29.2, built by `.ci/go-tools.sh`) on the host's
//! loopback, with its config, keys, SQLite database and unix socket in a temp dir: the tailnet
//! the tests' real Tailscale clients join. Nothing phones out: no DERP map download (a static
//! one-region map on 127.0.0.1 instead: Headscale refuses an empty map, and a client that
//! tries that relay reaches only its own loopback), no update check, no logtail, no upstream
//! DNS servers, no ACME. (Test support: nothing in the product calls it.)

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// The tailnet's MagicDNS suffix (`Self.DNSName` is `<name>.kiln-test.internal.`).
pub const BASE_DOMAIN: &str = "kiln-test.internal";

pub struct Headscale {
    child: Child,
    bin: PathBuf,
    config: PathBuf,
    /// Loopback port of the control server's HTTP listener.
    pub port: u16,
    /// The URL clients are told to use (`server_url`): loopback, or what a guest sees.
    pub server_url: String,
    pub dir: tempfile::TempDir,
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Policy: the test user owns `tags`, everyone may reach everyone (Headscale's default
/// without a policy, written out so tagged keys are valid).
fn policy(user: &str, tags: &[&str]) -> String {
    let owners: serde_json::Map<String, Value> = tags
        .iter()
        .map(|t| (t.to_string(), serde_json::json!([format!("{user}@")])))
        .collect();
    serde_json::json!({
        "tagOwners": owners,
        "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
    })
    .to_string()
}

impl Headscale {
    /// Starts Headscale on a free loopback port. `server_url`: the URL clients use (a guest
    /// reaches the port through a guestfwd address); `None` = `http://127.0.0.1:PORT`.
    /// `user`/`tags`: the policy's tag owners.
    pub fn start(bin: &Path, server_url: Option<&str>, user: &str, tags: &[&str]) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("kiln-hs").tempdir()?;
        Self::start_in(bin, dir, server_url, user, tags)
    }

    /// Starts Headscale in `dir`, keeping the keys and database already there (a copy of a
    /// stopped one's [`Headscale::stop`] dir: the same users and pre-auth keys).
    pub fn start_in(
        bin: &Path,
        dir: tempfile::TempDir,
        server_url: Option<&str>,
        user: &str,
        tags: &[&str],
    ) -> Result<Self> {
        let d = dir.path();
        let port = free_port()?;
        let server_url = server_url
            .map(str::to_string)
            .unwrap_or_else(|| format!("http://127.0.0.1:{port}"));
        std::fs::write(d.join("policy.json"), policy(user, tags))?;
        std::fs::write(
            d.join("derp.yaml"),
            "regions:\n  900:\n    regionid: 900\n    regioncode: kiln\n    regionname: kiln loopback\n    \
             nodes:\n      - name: 900a\n        regionid: 900\n        hostname: 127.0.0.1\n        \
             ipv4: 127.0.0.1\n        ipv6: none\n        stunport: -1\n        stunonly: false\n        derpport: 0\n",
        )?;
        let config = d.join("config.yaml");
        let p = |n: &str| d.join(n).display().to_string();
        let yaml = format!(
            r#"server_url: {server_url}
listen_addr: 127.0.0.1:{port}
metrics_listen_addr: 127.0.0.1:{metrics}
grpc_listen_addr: 127.0.0.1:{grpc}
grpc_allow_insecure: false
noise:
  private_key_path: {noise}
prefixes:
  v4: 100.64.0.0/10
  v6: fd7a:115c:a1e0::/48
  allocation: sequential
derp:
  server:
    enabled: false
  urls: []
  paths: [{derp}]
  auto_update_enabled: false
disable_check_updates: true
database:
  type: sqlite
  sqlite:
    path: {db}
    write_ahead_log: true
log:
  level: info
policy:
  mode: file
  path: {policy}
dns:
  magic_dns: true
  base_domain: {BASE_DOMAIN}
  override_local_dns: false
  nameservers:
    global: []
unix_socket: {sock}
unix_socket_permission: "0770"
logtail:
  enabled: false
"#,
            metrics = free_port()?,
            grpc = free_port()?,
            noise = p("noise_private.key"),
            derp = p("derp.yaml"),
            db = p("db.sqlite"),
            policy = p("policy.json"),
            sock = p("headscale.sock"),
        );
        std::fs::write(&config, yaml)?;
        let log = std::fs::File::create(d.join("headscale.log"))?;
        let child = Command::new(bin)
            .args(["serve", "-c"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let hs = Headscale {
            child,
            bin: bin.to_path_buf(),
            config,
            port,
            server_url,
            dir,
        };
        hs.wait_ready()?;
        Ok(hs)
    }

    fn wait_ready(&self) -> Result<()> {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            if self.cli(&["users", "list"]).is_ok()
                && std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            {
                return Ok(());
            }
            if Instant::now() > until {
                bail!(
                    "headscale did not come up in 60 s; its log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("headscale.log")).unwrap_or_default()
    }

    /// `headscale -c CONFIG ARGS -o json`, parsed.
    pub fn cli(&self, args: &[&str]) -> Result<Value> {
        let out = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .args(["-o", "json"])
            .output()
            .with_context(|| format!("running {}", self.bin.display()))?;
        if !out.status.success() {
            bail!(
                "headscale {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("headscale {}: output is not JSON", args.join(" ")))
    }

    /// `users create NAME`; its id.
    pub fn create_user(&self, name: &str) -> Result<u64> {
        let v = self.cli(&["users", "create", name])?;
        v["id"]
            .as_u64()
            .with_context(|| format!("users create: no id in {v}"))
    }

    /// `preauthkeys create --user ID --tags …`: a single-use (unless `reusable`) key.
    pub fn preauth_key(&self, user: u64, tags: &[&str], reusable: bool) -> Result<String> {
        let id = user.to_string();
        let tags = tags.join(",");
        let mut args = vec!["preauthkeys", "create", "--user", &id, "--expiration", "1h"];
        if !tags.is_empty() {
            args.extend(["--tags", &tags]);
        }
        if reusable {
            args.push("--reusable");
        }
        let v = self.cli(&args)?;
        v["key"]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("preauthkeys create: no key in {v}"))
    }

    /// `nodes list`: every node, as Headscale's JSON (`name`, `given_name`, `tags`,
    /// `online`, `ip_addresses`, …).
    pub fn nodes(&self) -> Result<Vec<Value>> {
        match self.cli(&["nodes", "list"])? {
            Value::Array(v) => Ok(v),
            Value::Null => Ok(vec![]),
            other => bail!("nodes list: expected an array, got {other}"),
        }
    }

    /// `nodes delete --identifier ID --force`: what an operator runs before re-creating a node
    /// to keep its name (see docs/node.md).
    pub fn delete_node(&self, id: u64) -> Result<()> {
        self.cli(&[
            "nodes",
            "delete",
            "--identifier",
            &id.to_string(),
            "--force",
        ])?;
        Ok(())
    }

    /// `nodes rename --identifier ID NAME`: sets the node's `given_name` (its MagicDNS label).
    pub fn rename_node(&self, id: u64, name: &str) -> Result<()> {
        self.cli(&["nodes", "rename", "--identifier", &id.to_string(), name])?;
        Ok(())
    }

    /// Waits until a node with this hostname satisfies `ok`; the node.
    pub fn wait_node(&self, name: &str, ok: impl Fn(&Value) -> bool) -> Result<Value> {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let nodes = self.nodes()?;
            if let Some(n) = nodes.iter().find(|n| n["name"] == name && ok(n)) {
                return Ok(n.clone());
            }
            if Instant::now() > until {
                bail!("no node {name:?} as expected in 60 s: {nodes:?}");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Headscale {
    /// Stops the server (SIGTERM: SQLite is closed cleanly) and hands back its dir.
    #[allow(unsafe_code)] // kill(2); the block says why it is sound
    pub fn stop(mut self) -> tempfile::TempDir {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let until = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let tmp = tempfile::Builder::new()
            .prefix("kiln-hs")
            .tempdir()
            .expect("temp dir");
        let dir = std::mem::replace(&mut self.dir, tmp);
        drop(self);
        dir
    }

    /// A copy of this (stopped) server's dir, for [`Headscale::start_in`].
    pub fn copy_dir(dir: &Path) -> Result<tempfile::TempDir> {
        let new = tempfile::Builder::new().prefix("kiln-hs").tempdir()?;
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            if e.file_type()?.is_file() && e.file_name() != "headscale.sock" {
                std::fs::copy(e.path(), new.path().join(e.file_name()))?;
            }
        }
        Ok(new)
    }
}

impl Drop for Headscale {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
