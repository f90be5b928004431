//! A K3s agent node built by the real `kiln-firstboot run --root` against the contract
//! stand-ins (artifacts from the loopback mirror through the production download path), joining
//! a K3s stand-in server on 127.0.0.1: Tailscale first, then `k3s agent` on the tailnet
//! address, the server steps not applicable, the server listing the agent; a rerun changes
//! nothing.

mod steps_common;

use std::fs;
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use steps_common::*;

/// A stand-in K3s server agents may join, on 127.0.0.1 only; stopped when dropped.
struct Server {
    _tmp: tempfile::TempDir,
    root: std::path::PathBuf,
    child: Option<Child>,
    port: u16,
}

impl Server {
    fn start() -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let w = |p: &str, t: &str| {
            let p = root.join(p);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, t).unwrap();
        };
        w(
            "etc/rancher/k3s/config.yaml",
            &format!("agent-token-file: /etc/kiln/secrets/k3s-agent-token\nbind-address: 127.0.0.1\nhttps-listen-port: {port}\nnode-name: ameciclo-k3s\n"),
        );
        w("etc/kiln/secrets/k3s-agent-token", "agent-secret-1\n");
        let bin = root.join("usr/local/bin/k3s");
        fs::create_dir_all(bin.parent().unwrap()).unwrap();
        fs::copy(standins_dir().join("k3s"), &bin).unwrap();
        let child = Command::new(&bin)
            .arg("server")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let until = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < until, "the server stand-in did not listen");
            std::thread::sleep(Duration::from_millis(100));
        }
        Server {
            _tmp: tmp,
            root,
            child: Some(child),
            port,
        }
    }
    fn agent_token(&self) -> String {
        fs::read_to_string(self.root.join("var/lib/rancher/k3s/server/agent-token")).unwrap()
    }
    fn nodes(&self) -> serde_json::Value {
        let o = Command::new(self.root.join("usr/local/bin/k3s"))
            .args(["kubectl", "get", "nodes", "-o", "json"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    }
    fn registered(&self) -> serde_json::Value {
        serde_json::from_slice(
            &fs::read(
                self.root
                    .join("var/lib/rancher/k3s/server/standin-nodes.json"),
            )
            .unwrap(),
        )
        .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            let mut log = String::new();
            let _ = c.stderr.take().unwrap().read_to_string(&mut log);
            if std::thread::panicking() {
                eprintln!("--- server stand-in log:\n{log}");
            }
        }
    }
}

#[test]
fn an_agent_joins_its_server_after_tailscale_and_a_rerun_changes_nothing() {
    let server = Server::start();
    let url = format!("https://127.0.0.1:{}", server.port);
    let (node, _mirror, _pins, plan) = setup(|plan, _| to_agent(plan, &url));
    write_secret(&node.root, AGENT_TOKEN_FILE, server.agent_token().trim());

    let out = node.run_daemon();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "agent run failed ({}):\n{stdout}\n{}\n--- k3s-agent log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        fs::read_to_string(node.p("/var/log/standin-systemd/k3s-agent.service.log"))
            .unwrap_or_default()
    );
    let st = status(&node.root);
    let states = step_states(&st);
    assert_eq!(
        states,
        [
            ("tailscale".to_string(), "done".to_string()),
            ("k3s".into(), "done".into()),
            ("tailscale-operator".into(), "not-applicable".into()),
            ("argocd".into(), "not-applicable".into()),
            ("gitops".into(), "not-applicable".into()),
            ("verify".into(), states[5].1.clone()),
        ]
    );
    assert!(
        matches!(states[5].1.as_str(), "done" | "skipped"),
        "{states:?}"
    );

    // k3s agent, its own unit, on the tailnet address the tailscale step recorded.
    let ip = st["facts"]["tailscale.ipv4"].as_str().unwrap().to_string();
    assert!(ip.starts_with("100."), "{ip}");
    let cfg: std::collections::BTreeMap<String, serde_yaml::Value> =
        serde_yaml::from_str(&fs::read_to_string(node.p("/etc/rancher/k3s/config.yaml")).unwrap())
            .unwrap();
    assert_eq!(cfg["node-ip"], ip.as_str());
    assert_eq!(cfg["flannel-iface"], "tailscale0");
    assert_eq!(cfg["server"], url.as_str());
    assert_eq!(
        fs::read_to_string(node.p("/etc/systemd/system/k3s-agent.service")).unwrap(),
        kiln_firstboot::k3s_agent::unit_text()
    );
    assert!(
        !node.p("/etc/systemd/system/k3s.service").exists(),
        "no server unit on an agent"
    );
    assert!(!node.p("/var/lib/rancher/k3s/server/manifests").exists());
    assert!(
        stdout.contains("kiln: step argocd not applicable"),
        "{stdout}"
    );

    // The server lists the agent, registered from the agent's address (127.0.0.1 here; its
    // 100.x over tailscale0 in the two-VM test).
    let nodes = server.nodes();
    let agent = nodes["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["metadata"]["name"] == plan.node.hostname)
        .unwrap_or_else(|| panic!("the server does not list {}: {nodes}", plan.node.hostname))
        .clone();
    assert_eq!(agent["status"]["conditions"][0]["status"], "True");
    assert_eq!(
        server.registered()[&plan.node.hostname]["peer"],
        "127.0.0.1"
    );
    // Neither the server's token nor its agent token leaves anything readable behind.
    let token = node.p(AGENT_TOKEN_FILE);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&token).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // A second run (a reboot): every step is in place and nothing changes.
    let before = snapshot(&node.root);
    let out = node.run_daemon();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let states = step_states(&status(&node.root));
    assert_eq!(states[0].1, "skipped");
    assert_eq!(states[1].1, "skipped");
    assert_eq!(states[2].1, "not-applicable");
    assert_eq!(snapshot(&node.root), before);
    assert_eq!(server.registered()[&plan.node.hostname]["registrations"], 1);
}
