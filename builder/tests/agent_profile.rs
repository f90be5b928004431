//! The agent role: an agent profile resolves into a `k3s agent` plan (its server over the
//! tailnet, its token as a 0600 secret file, agent flags only, no server sections), and a
//! server's `k3s.agent-token` becomes `agent-token-file`.

mod common;

use kiln::pipeline;
use kiln::resolve::Resolved;
use kiln_plan::{Role, StepId};
use std::path::Path;
use std::process::Command;

fn resolve(p: &Path) -> Resolved {
    pipeline::resolve(p, &common::no_env)
        .map_err(|e| e.to_string())
        .unwrap()
        .1
}

fn agent_base() -> std::path::PathBuf {
    common::repo().join("tests/profiles/good/agent-base.yaml")
}

#[test]
fn an_agent_profile_resolves_to_a_k3s_agent_plan_joining_its_server_over_the_tailnet() {
    let r = resolve(&agent_base());
    let p = &r.plan;
    assert_eq!(
        p.node.role,
        Role::Agent {
            server: "https://test-node:6443".parse().unwrap(),
            token_file: "/etc/kiln/secrets/k3s-token".into(),
        }
    );
    let keys: Vec<&str> = p.k3s.config.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        ["flannel-iface", "node-name", "server", "token-file"],
        "node-ip is added on the node from the tailnet address"
    );
    assert_eq!(p.k3s.config["server"], "https://test-node:6443");
    assert_eq!(p.k3s.config["token-file"], "/etc/kiln/secrets/k3s-token");
    assert_eq!(p.k3s.config["flannel-iface"], "tailscale0");
    let real = kiln_testkit::k3s_agent_flags();
    for k in p.k3s.config.keys() {
        assert!(real.contains(k), "{k} is not a k3s agent flag");
    }
    assert!(p.argocd.is_none() && p.gitops.is_none() && p.tailscale.operator.is_none());
    assert!(kiln_plan::manifests::bundled(p).is_empty());
    assert_eq!(
        p.step_order(),
        [
            StepId::Tailscale,
            StepId::K3s,
            StepId::TailscaleOperator,
            StepId::Argocd,
            StepId::Gitops,
            StepId::Verify
        ]
    );
    for s in [StepId::TailscaleOperator, StepId::Argocd, StepId::Gitops] {
        assert!(!p.applies(s), "{s} is a server step");
    }
    // The join token is a secret file like every other; the server's OAuth secret is not here.
    let files: Vec<&str> = r.secrets.iter().map(|s| s.node_path).collect();
    assert_eq!(
        files,
        [
            "/etc/kiln/secrets/k3s-token",
            "/etc/kiln/secrets/tailscale-auth-key"
        ]
    );
    // The plan round-trips through the daemon's strict reader.
    let back = kiln_plan::Plan::from_json(&p.to_json()).unwrap();
    assert_eq!(&back, p);
}

#[test]
fn an_agent_names_its_server_by_tailnet_name_or_https_url() {
    let dir = tempfile::tempdir().unwrap();
    for (server, want) in [
        ("ameciclo-k3s", "https://ameciclo-k3s:6443/"),
        (
            "ameciclo-k3s.example.ts.net",
            "https://ameciclo-k3s.example.ts.net:6443/",
        ),
        ("https://100.64.0.1:6443", "https://100.64.0.1:6443/"),
        ("https://server.example", "https://server.example/"),
    ] {
        let p = dir.path().join("agent.yaml");
        std::fs::write(
            &p,
            format!(
                "extends: {}\nnode:\n  role:\n    agent:\n      server: {server}\n",
                agent_base().display()
            ),
        )
        .unwrap();
        let r = resolve(&p);
        let Role::Agent { server: got, .. } = &r.plan.node.role else {
            panic!("not an agent")
        };
        assert_eq!(got.as_str(), want, "{server}");
    }
}

#[test]
fn a_server_with_an_agent_token_gets_agent_token_file_and_a_0600_secret() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("server.yaml");
    std::fs::write(
        &p,
        format!(
            "extends: {}\nk3s:\n  agent-token: {{file: {}}}\n",
            common::repo()
                .join("tests/profiles/good/base.yaml")
                .display(),
            common::repo()
                .join("tests/profiles/good/secrets/k3s-agent-token")
                .display()
        ),
    )
    .unwrap();
    let r = resolve(&p);
    assert_eq!(
        r.plan.k3s.config["agent-token-file"],
        "/etc/kiln/secrets/k3s-agent-token"
    );
    let s = r
        .secrets
        .iter()
        .find(|s| s.key == "k3s.agent-token")
        .expect("the agent token is a secret file");
    assert_eq!(s.node_path, "/etc/kiln/secrets/k3s-agent-token");
    assert!(!r
        .plan
        .to_json()
        .windows(20)
        .any(|w| w == b"fake-agent-token-for"));
}

#[test]
fn a_servers_tls_san_carries_its_tailnet_name_for_agents_joining_by_it() {
    let r = resolve(&common::repo().join("tests/profiles/good/base.yaml"));
    assert_eq!(
        r.plan.k3s.config["tls-san"],
        serde_json::json!(["test-node"])
    );
    let agent = resolve(&agent_base());
    assert!(!agent.plan.k3s.config.contains_key("tls-san"));
}

#[test]
fn kiln_plan_of_an_agent_lists_the_server_steps_as_not_applicable() {
    let o = Command::new(common::kiln_bin())
        .arg("plan")
        .arg(agent_base())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        out.contains("K3s agent of https://test-node:6443/"),
        "{out}"
    );
    assert!(out.contains("1. tailscale"), "{out}");
    assert!(out.contains("2. k3s"), "{out}");
    for step in ["3. tailscale-operator", "4. argocd", "5. gitops"] {
        let line = out.lines().find(|l| l.contains(step)).unwrap_or("");
        assert!(line.contains("not applicable"), "{step}: {out}");
    }
    assert!(!out.contains("fake-agent-token"), "{out}");
}

#[test]
fn an_agent_profile_builds_a_payload_and_bundle_without_server_manifests() {
    let daemon = kiln::elf::tiny_static_elf();
    let out = pipeline::build(&agent_base(), &daemon, 0, &common::no_env)
        .map_err(|e| format!("{e:?}"))
        .unwrap();
    assert!(out.0.plan.manifests.is_empty());
}

#[test]
fn the_ameciclo_agent_example_extends_the_server_profile_and_joins_it_by_its_tailnet_name() {
    let server = resolve(&common::repo().join("profiles/ameciclo.yaml"));
    let r = resolve(&common::repo().join("profiles/ameciclo-agent.yaml"));
    let p = &r.plan;
    assert_eq!(p.node.hostname, "ameciclo-agent-1");
    assert_eq!(p.tailscale.hostname, "ameciclo-agent-1");
    let Role::Agent {
        server: url,
        token_file,
    } = &p.node.role
    else {
        panic!("not an agent")
    };
    assert_eq!(url.as_str(), "https://ameciclo-k3s:6443/");
    // The server's certificate carries the name the agent joins by.
    assert!(
        server.plan.k3s.config["tls-san"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("ameciclo-k3s")),
        "{:?}",
        server.plan.k3s.config
    );
    // Both read the same agent token from Key Vault: the server as agent-token-file, the
    // agent as its token-file. Nothing is read at build time.
    assert_eq!(
        server.plan.k3s.config["agent-token-file"],
        "/etc/kiln/secrets/k3s-agent-token"
    );
    let vault = |r: &Resolved| -> Vec<(String, String)> {
        r.plan
            .key_vault
            .iter()
            .flat_map(|kv| &kv.secrets)
            .map(|v| (v.file.clone(), v.secret.clone()))
            .collect()
    };
    assert!(vault(&server).contains(&(
        "/etc/kiln/secrets/k3s-agent-token".into(),
        "k3s-agent-token".into()
    )));
    let agent_vault = vault(&r);
    assert!(agent_vault.contains(&(token_file.clone(), "k3s-agent-token".into())));
    assert!(agent_vault.iter().all(|(f, _)| !f.contains("oauth")));
    assert!(r.secrets.is_empty());
    // Same pins as the server (the shared base), agent flags only, no server sections.
    assert_eq!(p.k3s.binary, server.plan.k3s.binary);
    assert_eq!(p.tailscale.tarball, server.plan.tailscale.tarball);
    let real = kiln_testkit::k3s_agent_flags();
    for k in p.k3s.config.keys() {
        assert!(real.contains(k), "{k}");
    }
    assert_eq!(
        p.k3s.config["node-label"],
        serde_json::json!(["ameciclo.org/pool=general"])
    );
    assert!(p.argocd.is_none() && p.gitops.is_none() && p.tailscale.operator.is_none());
}
