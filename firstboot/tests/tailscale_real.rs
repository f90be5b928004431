//! The contract the tailscale step assumes, checked against the real programs: Tailscale's
//! `tailscaled`/`tailscale` v1.102.3 and a real Headscale v0.29.2, both on the host's loopback
//! (built by `.ci/go-tools.sh`). `tailscaled --tun=userspace-networking` with its own state dir
//! and socket needs no TUN device and no root network changes; `--no-logs-no-support` (and
//! TS_NO_LOGS_NO_SUPPORT) keeps it from uploading logs, and Headscale's DERP map names only
//! 127.0.0.1, so no traffic leaves the machine.
//!
//! It proves: the exact `tailscale up` command line kiln builds (`up_args`: `--auth-key
//! file:PATH`, `--login-server`, `--hostname`, `--advertise-tags`) is accepted and joins; the
//! `status --json` fields kiln reads (`BackendState`, `TailscaleIPs`, `Self.DNSName`) are there
//! with the types `parse_status` expects; kiln's second `up` without the key on a Running node
//! is accepted (no "requires mentioning all non-default flags"); a restarted tailscaled with the
//! same state is Running again without the key; Headscale lists the node with its hostname,
//! tags and online.
//!
//! The other host tests (`--root` trees, no TUN, no systemd) keep the contract stand-ins in
//! tests/standins/; this is where those stand-ins' Tailscale contract meets the real client.

use kiln_firstboot::tailscale::{parse_status, up_args};
use kiln_plan::{Plan, Url};
use kiln_testkit::gotools;
use kiln_testkit::headscale::{Headscale, BASE_DOMAIN};
use serde_json::Value;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Tailscaled {
    child: Child,
    socket: PathBuf,
}

impl Drop for Tailscaled {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The real tailscaled in userspace mode, state and socket under `dir`.
fn tailscaled(tools: &gotools::GoTools, dir: &Path, log: &str) -> Tailscaled {
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let socket = dir.join("tailscaled.sock");
    let log = std::fs::File::create(dir.join(log)).unwrap();
    let child = Command::new(tools.tailscaled())
        .arg("--tun=userspace-networking")
        .arg(format!("--statedir={}", state.display()))
        .arg(format!("--socket={}", socket.display()))
        .arg("--port=0")
        .arg("--no-logs-no-support")
        .env("TS_NO_LOGS_NO_SUPPORT", "true")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let ts = Tailscaled { child, socket };
    let until = Instant::now() + Duration::from_secs(60);
    while status_json(tools, &ts).is_none() {
        assert!(Instant::now() < until, "tailscaled did not answer in 60 s");
        std::thread::sleep(Duration::from_millis(200));
    }
    ts
}

/// `tailscale --socket S ARGS`: (success, stdout+stderr).
fn tailscale(tools: &gotools::GoTools, ts: &Tailscaled, args: &[String]) -> (bool, String) {
    let out = Command::new(tools.tailscale())
        .arg(format!("--socket={}", ts.socket.display()))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn status_json(tools: &gotools::GoTools, ts: &Tailscaled) -> Option<Value> {
    let out = Command::new(tools.tailscale())
        .arg(format!("--socket={}", ts.socket.display()))
        .args(["status", "--json"])
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

fn wait_state(tools: &gotools::GoTools, ts: &Tailscaled, want: &str) -> Value {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = status_json(tools, ts) {
            if v["BackendState"] == want {
                return v;
            }
            assert!(Instant::now() < until, "not {want} in 60 s: {v}");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn in_cgnat(ip: &str) -> bool {
    // 100.64.0.0/10: the tailnet's IPv4 range.
    ip.parse::<Ipv4Addr>()
        .is_ok_and(|a| a.octets()[0] == 100 && (a.octets()[1] & 0xc0) == 64)
}

#[test]
fn real_tailscaled_joins_headscale_with_kilns_up_flags_and_status_fields() {
    let Some(tools) = gotools::find("real tailscaled + headscale") else {
        return;
    };
    let hs = Headscale::start(&tools.headscale, None, "kiln", &["tag:k8s"]).unwrap();
    let user = hs.create_user("kiln").unwrap();
    let key = hs.preauth_key(user, &["tag:k8s"], false).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("tailscale-auth-key");
    std::fs::write(&key_file, format!("{key}\n")).unwrap();

    // The test plan, joined to this Headscale.
    let mut plan: Plan =
        serde_json::from_str(include_str!("../../tests/golden/manifests/plan.json")).unwrap();
    plan.tailscale.login_server = Some(Url::parse(&hs.server_url).unwrap());
    let hostname = plan.tailscale.hostname.clone();

    // Advertised tags with a pre-auth key are refused by Headscale (what kiln's builder
    // warns about for `tags` + `login-server`): the key carries the tags instead.
    assert_eq!(plan.tailscale.tags, ["tag:k8s"]);
    {
        let d = dir.path().join("advertising");
        std::fs::create_dir_all(&d).unwrap();
        let k = d.join("key");
        let other = hs.preauth_key(user, &["tag:k8s"], false).unwrap();
        std::fs::write(&k, other).unwrap();
        let ts = tailscaled(&tools, &d, "tailscaled.log");
        let mut a = up_args(&plan, Some(k.to_str().unwrap()));
        a.push("--timeout=30s".into());
        let (ok, out) = tailscale(&tools, &ts, &a);
        assert!(
            !ok,
            "Headscale accepted --advertise-tags with a pre-auth key: {out}"
        );
        assert!(out.contains("are invalid or not permitted"), "{out}");
    }
    plan.tailscale.tags.clear();

    let ts = tailscaled(&tools, dir.path(), "tailscaled-1.log");
    assert_eq!(
        wait_state(&tools, &ts, "NeedsLogin")["BackendState"],
        "NeedsLogin"
    );
    let args = up_args(&plan, Some(key_file.to_str().unwrap()));
    assert!(
        args.contains(&"--login-server".to_string()),
        "{args:?}: no --login-server"
    );
    let (ok, out) = tailscale(&tools, &ts, &args);
    assert!(ok, "tailscale {args:?}: {out}");

    // The fields kiln reads, as the real client writes them.
    let raw = wait_state(&tools, &ts, "Running");
    assert!(raw["TailscaleIPs"].is_array(), "{raw}");
    assert!(raw["Self"]["DNSName"].is_string(), "{raw}");
    let st = parse_status(&raw.to_string()).unwrap();
    assert_eq!(st.backend_state, "Running");
    assert!(st.ips.iter().any(|ip| in_cgnat(ip)), "{:?}", st.ips);
    assert_eq!(st.dns_name, format!("{hostname}.{BASE_DOMAIN}"));

    // Headscale's view: the node, its hostname and tags, online.
    let node = hs
        .wait_node(&hostname, |n| n["online"] == true)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", hs.log()));
    assert_eq!(node["tags"], serde_json::json!(["tag:k8s"]), "{node}");
    let ips: Vec<&str> = node["ip_addresses"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(st.ips.iter().all(|ip| ips.contains(&ip.as_str())), "{node}");

    // kiln's `up` again, without the key, on the Running node (a Stopped node comes back
    // this way): the same non-default flags, so the CLI accepts it.
    let again = up_args(&plan, None);
    let (ok, out) = tailscale(&tools, &ts, &again);
    assert!(ok, "tailscale {again:?} on a Running node: {out}");

    // A restart with the same state (a reboot): Running, with the key file gone.
    std::fs::remove_file(&key_file).unwrap();
    drop(ts);
    let ts = tailscaled(&tools, dir.path(), "tailscaled-2.log");
    let raw2 = wait_state(&tools, &ts, "Running");
    let st2 = parse_status(&raw2.to_string()).unwrap();
    assert_eq!(
        st2.ips, st.ips,
        "the node's addresses changed across a restart"
    );
    assert_eq!(hs.nodes().unwrap().len(), 1, "a second node registered");
}

/// A node (its own tailscaled, state dir and socket under `dir`, like a fresh VM disk) joined
/// with kiln's `up` flags and `key`; the daemon and its Running `status --json`.
fn join(tools: &gotools::GoTools, plan: &Plan, dir: &Path, key: &str) -> (Tailscaled, Value) {
    std::fs::create_dir_all(dir).unwrap();
    let key_file = dir.join("tailscale-auth-key");
    std::fs::write(&key_file, format!("{key}\n")).unwrap();
    let ts = tailscaled(tools, dir, "tailscaled.log");
    let args = up_args(plan, Some(key_file.to_str().unwrap()));
    let (ok, out) = tailscale(tools, &ts, &args);
    assert!(ok, "tailscale {args:?}: {out}");
    let st = wait_state(tools, &ts, "Running");
    (ts, st)
}

fn node_id(n: &Value) -> u64 {
    n["id"]
        .as_u64()
        .or_else(|| n["id"].as_str().and_then(|s| s.parse().ok()))
        .unwrap_or_else(|| panic!("no node id in {n}"))
}

/// What Headscale v0.29.2 does with the name of a rebuilt node: a new machine key (a new disk)
/// registering with the same hostname while the old node is still listed. The old node keeps
/// its entry and its `given_name`; the new one gets `HOSTNAME-1` (hscontrol/state/
/// node_store.go `resolveGivenName`: base, base-1, base-2, first unused) and that is its
/// MagicDNS name. Deleting the old node afterwards does not dependably give the name back;
/// `headscale nodes rename` does. (qemu/tests/rebuild.rs proves the other way, deleting the old node
/// before the rebuilt one joins, with a real rebuilt VM.)
#[test]
fn headscale_names_a_rebuilt_node_hostname_1_while_the_old_node_is_listed() {
    let Some(tools) = gotools::find("headscale names on rebuild") else {
        return;
    };
    let hs = Headscale::start(&tools.headscale, None, "kiln", &["tag:k8s"]).unwrap();
    let user = hs.create_user("kiln").unwrap();
    // Reusable: the identical payload joins twice, as a Headscale rebuild must (no minting).
    let key = hs.preauth_key(user, &["tag:k8s"], true).unwrap();
    let mut plan: Plan =
        serde_json::from_str(include_str!("../../tests/golden/manifests/plan.json")).unwrap();
    plan.tailscale.login_server = Some(Url::parse(&hs.server_url).unwrap());
    plan.tailscale.tags.clear();
    let hostname = plan.tailscale.hostname.clone();
    let dir = tempfile::tempdir().unwrap();

    // The first node, then destroyed (its tailscaled and state gone, Headscale keeps it).
    let (first, st1) = join(&tools, &plan, &dir.path().join("node-1"), &key);
    let old = hs
        .wait_node(&hostname, |n| n["online"] == true)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", hs.log()));
    assert_eq!(old["given_name"], hostname.as_str(), "{old}");
    let dns1 = parse_status(&st1.to_string()).unwrap().dns_name;
    assert_eq!(dns1, format!("{hostname}.{BASE_DOMAIN}"));
    drop(first);

    // The rebuilt node: same hostname, new machine key.
    let (second, st2) = join(&tools, &plan, &dir.path().join("node-2"), &key);
    // The old node stays listed (tagged nodes never expire), offline, under its name.
    let until = Instant::now() + Duration::from_secs(60);
    let nodes = loop {
        let nodes = hs.nodes().unwrap();
        assert_eq!(nodes.len(), 2, "the old node is still listed: {nodes:?}");
        let old_now = nodes.iter().find(|n| node_id(n) == node_id(&old)).unwrap();
        // Headscale's JSON leaves `online` out when it is false.
        if old_now["online"] != true {
            break nodes;
        }
        assert!(
            Instant::now() < until,
            "the old node still online: {old_now}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    let old_now = nodes.iter().find(|n| node_id(n) == node_id(&old)).unwrap();
    let new = nodes.iter().find(|n| node_id(n) != node_id(&old)).unwrap();
    assert_eq!(old_now["given_name"], hostname.as_str(), "{old_now}");
    assert_eq!(old_now["name"], hostname.as_str(), "{old_now}");
    assert_eq!(new["name"], hostname.as_str(), "{new}");
    assert_eq!(new["given_name"], format!("{hostname}-1"), "{new}");
    let suffixed = format!("{hostname}-1.{BASE_DOMAIN}");
    assert_eq!(parse_status(&st2.to_string()).unwrap().dns_name, suffixed);

    // Deleting the old node frees the name, but Headscale gives it back only if the client
    // later reports changed host info (state.go `UpdateNodeFromMapRequest` re-resolves an
    // auto-derived `HOSTNAME-N` then): seen at once in one run, not within 60 s in others.
    // `headscale nodes rename` sets it, and the running client is told its name.
    hs.delete_node(node_id(&old)).unwrap();
    let nodes = hs.nodes().unwrap();
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    hs.rename_node(node_id(new), &hostname).unwrap();
    assert_eq!(hs.nodes().unwrap()[0]["given_name"], hostname.as_str());
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let st = status_json(&tools, &second).unwrap();
        let name = parse_status(&st.to_string()).unwrap().dns_name;
        if name == dns1 {
            break;
        }
        assert!(Instant::now() < until, "still {name} 60 s after the rename");
        std::thread::sleep(Duration::from_millis(300));
    }
}
