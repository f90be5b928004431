//! The K3s stand-in's join contract on the host (both ends on 127.0.0.1), as K3s documents
//! it and `pkg/clientaccess/token.go` implements it: the server serves `GET /cacerts` on its
//! supervisor port; an agent with a `K10<sha256 of /cacerts>::<user>:<password>` token fetches
//! the CA, refuses a hash mismatch, then registers with its node password; the server records
//! the peer address and lists the agent as a node; a restarted agent is the same node.

mod steps_common;

use serde_json::Value;
use std::fs;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Node {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Node {
    fn new(config: &str) -> Node {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let bin = root.join("usr/local/bin/k3s");
        fs::create_dir_all(bin.parent().unwrap()).unwrap();
        fs::copy(steps_common::standins_dir().join("k3s"), &bin).unwrap();
        let n = Node { _tmp: tmp, root };
        n.write("/etc/rancher/k3s/config.yaml", config);
        n
    }
    fn p(&self, node_path: &str) -> PathBuf {
        self.root.join(node_path.trim_start_matches('/'))
    }
    fn write(&self, node_path: &str, text: &str) {
        let p = self.p(node_path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }
    fn k3s(&self, args: &[&str]) -> Command {
        let mut c = Command::new(self.p("/usr/local/bin/k3s"));
        c.args(args).env_remove("NOTIFY_SOCKET");
        c
    }
    fn spawn(&self, cmd: &str) -> Child {
        self.k3s(&[cmd])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }
    fn nodes(&self) -> Value {
        let o = self
            .k3s(&["kubectl", "get", "nodes", "-o", "json"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    }
    fn registered(&self) -> Value {
        fs::read(self.p("/var/lib/rancher/k3s/server/standin-nodes.json"))
            .map(|b| serde_json::from_slice(&b).unwrap())
            .unwrap_or(Value::Null)
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Stops a stand-in this test started and returns what it wrote to stderr.
fn stop(mut c: Child) -> String {
    let _ = c.kill();
    let _ = c.wait();
    let mut s = String::new();
    c.stderr.take().unwrap().read_to_string(&mut s).unwrap();
    s
}

/// A server agents may join (it has an agent token), listening on 127.0.0.1 only.
fn server() -> (Node, Child, u16) {
    let port = free_port();
    let s = Node::new(&format!(
        "agent-token-file: /etc/kiln/secrets/k3s-agent-token\nbind-address: 127.0.0.1\nhttps-listen-port: {port}\nnode-name: srv\n"
    ));
    s.write("/etc/kiln/secrets/k3s-agent-token", "agent-secret-1\n");
    let child = s.spawn("server");
    let at = s.p("/var/lib/rancher/k3s/server/agent-token");
    wait("the server's agent token", 30, || at.exists());
    wait("the supervisor port", 30, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    (s, child, port)
}

fn agent(port: u16, token: &str) -> Node {
    let a = Node::new(&format!(
        "flannel-iface: tailscale0\nnode-ip: 100.64.0.9\nnode-name: agent1\nserver: https://127.0.0.1:{port}\ntoken-file: /etc/kiln/secrets/k3s-token\n"
    ));
    a.write("/etc/kiln/secrets/k3s-token", token);
    a
}

fn agent_token(s: &Node) -> String {
    fs::read_to_string(s.p("/var/lib/rancher/k3s/server/agent-token")).unwrap()
}

fn joined(a: &Node) -> bool {
    a.p("/var/lib/rancher/k3s/agent/client-kubelet.crt")
        .exists()
        && a.p("/var/lib/rancher/k3s/agent/kubelet.kubeconfig")
            .exists()
}

fn agent_nodes(s: &Node) -> Vec<Value> {
    s.nodes()["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["metadata"]["name"] != "srv")
        .cloned()
        .collect()
}

#[test]
fn an_agent_with_the_k10_token_joins_is_listed_with_its_peer_and_rejoins_as_the_same_node() {
    let (s, srv, port) = server();
    let token = agent_token(&s);
    // The token pins the CA the server serves at /cacerts (K10<sha256 hex>::node:<secret>).
    let ca = fs::read(s.p("/var/lib/rancher/k3s/server/tls/server-ca.crt")).unwrap();
    assert_eq!(
        token.trim(),
        format!("K10{}::node:agent-secret-1", kiln_plan::Sha256::digest(&ca))
    );
    let a = agent(port, &token);
    let ag = a.spawn("agent");
    wait("the agent to join", 30, || joined(&a));
    let nodes = agent_nodes(&s);
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    let n = &nodes[0];
    assert_eq!(n["metadata"]["name"], "agent1");
    assert_eq!(n["status"]["conditions"][0]["type"], "Ready");
    assert_eq!(n["status"]["conditions"][0]["status"], "True");
    // The address the agent connected from (on the tailnet in the VM test: its 100.x).
    assert_eq!(s.registered()["agent1"]["peer"], "127.0.0.1");
    assert_eq!(n["status"]["addresses"][0]["address"], "127.0.0.1");
    let log = stop(ag);
    assert!(log.contains("joined https://127.0.0.1:"), "{log}");

    // A restart of the agent (same node password) is the same node, not a second one.
    fs::remove_file(a.p("/var/lib/rancher/k3s/agent/client-kubelet.crt")).unwrap();
    let ag = a.spawn("agent");
    wait("the agent to rejoin", 30, || joined(&a));
    stop(ag);
    assert_eq!(agent_nodes(&s).len(), 1);
    assert_eq!(s.registered()["agent1"]["registrations"], 2);
    stop(srv);
}

#[test]
fn a_token_with_another_ca_hash_is_refused_and_the_agent_never_registers() {
    let (s, srv, port) = server();
    let a = agent(
        port,
        &format!("K10{}::node:agent-secret-1\n", "ab".repeat(32)),
    );
    let ag = a.spawn("agent");
    std::thread::sleep(Duration::from_secs(3));
    let log = stop(ag);
    assert!(
        log.contains("token CA hash does not match the Cluster CA certificate hash"),
        "{log}"
    );
    assert!(!joined(&a));
    assert!(agent_nodes(&s).is_empty());
    assert_eq!(s.registered(), Value::Null);
    stop(srv);
}

#[test]
fn a_wrong_password_or_another_nodes_name_is_refused_by_the_server() {
    let (s, srv, port) = server();
    let ca_hash = agent_token(&s)[3..67].to_string();
    // Right CA, wrong secret: 401, never joined.
    let a = agent(port, &format!("K10{ca_hash}::node:not-the-secret\n"));
    let ag = a.spawn("agent");
    std::thread::sleep(Duration::from_secs(3));
    let log = stop(ag);
    assert!(log.contains("401"), "{log}");
    assert!(!joined(&a));
    // The right token, but a second machine with the same node name (another node password).
    let one = agent(port, &agent_token(&s));
    let ag = one.spawn("agent");
    wait("the first agent1", 30, || joined(&one));
    stop(ag);
    let two = agent(port, &agent_token(&s));
    let ag = two.spawn("agent");
    std::thread::sleep(Duration::from_secs(3));
    let log = stop(ag);
    assert!(log.contains("Node password rejected"), "{log}");
    assert!(!joined(&two));
    assert_eq!(agent_nodes(&s).len(), 1);
    stop(srv);
}

#[test]
fn the_agent_refuses_what_k3s_agent_refuses() {
    let run = |config: &str, token: &str| -> String {
        let a = Node::new(config);
        a.write("/etc/kiln/secrets/k3s-token", token);
        let o = a.k3s(&["agent"]).output().unwrap();
        assert!(!o.status.success(), "{config} was accepted");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let base = "server: https://127.0.0.1:9\ntoken-file: /etc/kiln/secrets/k3s-token\n";
    let e = run(&format!("{base}cluster-init: true\n"), "s3cret\n");
    assert!(e.contains("unknown flag --cluster-init"), "{e}");
    let e = run(&format!("{base}tls-san: [x]\n"), "s3cret\n");
    assert!(e.contains("unknown flag --tls-san"), "{e}");
    let e = run(
        "server: http://127.0.0.1:9\ntoken-file: /etc/kiln/secrets/k3s-token\n",
        "s3cret\n",
    );
    assert!(e.contains("only https:// URLs are supported"), "{e}");
    let e = run(base, "K10abc::node:s3cret\n");
    assert!(e.contains("invalid token CA hash length"), "{e}");
    let e = run(base, &format!("K10{}::nocolon\n", "0".repeat(64)));
    assert!(e.contains("invalid token format"), "{e}");
    let e = run("token-file: /etc/kiln/secrets/k3s-token\n", "s3cret\n");
    assert!(e.contains("--server is required"), "{e}");
}
