//! What a K3s agent node is given: its `config.yaml` (the plan's `k3s agent` keys plus the
//! tailnet address as `node-ip`) and `k3s-agent.service`, as golden files, every config key a
//! real K3s v1.32 agent flag (tests/upstream/k3s-v1.32-agent-flags.txt).

mod steps_common;

use kiln_firstboot::k3s;
use std::collections::BTreeMap;
use steps_common::golden;

fn pins() -> serde_json::Value {
    let sha = "0".repeat(64);
    let p = |path: &str| serde_json::json!({"url-path": path, "sha256": sha});
    serde_json::json!({
        "k3s": p("k3s/v1.32.4%2Bk3s1/k3s"),
        "k3s-checksums": p("k3s/v1.32.4%2Bk3s1/sha256sum-amd64.txt"),
        "tailscale": p("tailscale/tailscale_1.102.3_amd64.tgz"),
        "argocd": p("argocd/v3.4.7/install.yaml"),
    })
}

fn agent() -> kiln_plan::Plan {
    steps_common::agent_plan(
        "http://127.0.0.1:9/",
        &pins(),
        "https://ameciclo-k3s.example.ts.net:6443",
    )
}

fn facts() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("tailscale.ipv4".to_string(), "100.64.0.7".to_string()),
        (
            "tailscale.dns-name".to_string(),
            "ameciclo-agent.example.ts.net".to_string(),
        ),
    ])
}

#[test]
fn the_agent_config_joins_the_server_on_the_tailnet_address_and_tailscale0() {
    let cfg = k3s::config_yaml(&agent(), &facts()).unwrap();
    golden("k3s-agent-config.yaml", cfg.as_bytes());
    let v: BTreeMap<String, serde_yaml::Value> = serde_yaml::from_str(&cfg).unwrap();
    assert_eq!(v["server"], "https://ameciclo-k3s.example.ts.net:6443");
    assert_eq!(v["node-ip"], "100.64.0.7");
    assert_eq!(v["flannel-iface"], "tailscale0");
    assert_eq!(v["token-file"], "/etc/kiln/secrets/k3s-token");
    // No server keys: the tailnet name goes into the *server's* tls-san, not the agent's.
    assert!(
        !v.contains_key("tls-san") && !v.contains_key("disable"),
        "{cfg}"
    );
}

#[test]
fn every_key_of_the_rendered_agent_config_is_a_real_k3s_v1_32_agent_flag() {
    let real = kiln_testkit::k3s_agent_flags();
    assert!(real.len() > 40, "the upstream list looks truncated");
    let cfg = k3s::config_yaml(&agent(), &facts()).unwrap();
    let v: BTreeMap<String, serde_yaml::Value> = serde_yaml::from_str(&cfg).unwrap();
    for k in v.keys() {
        assert!(
            real.contains(k),
            "{k} is not a `k3s agent` flag in K3s v1.32"
        );
    }
}

#[test]
fn the_agent_config_needs_the_tailnet_address_first() {
    let err = k3s::config_yaml(&agent(), &BTreeMap::new()).unwrap_err();
    assert!(
        format!("{err:#}").contains("needs its tailnet address"),
        "{err:#}"
    );
}

#[test]
fn the_agent_unit_runs_k3s_agent_under_its_own_name() {
    let u = k3s::units(&agent());
    assert_eq!(u.unit, "k3s-agent.service");
    assert_eq!(u.unit_path, "/etc/systemd/system/k3s-agent.service");
    assert_eq!(u.env_path, "/etc/systemd/system/k3s-agent.service.env");
    golden("k3s-agent.service", u.unit_text.as_bytes());
    let exec: Vec<&str> = u
        .unit_text
        .lines()
        .filter(|l| l.starts_with("ExecStart="))
        .collect();
    assert_eq!(exec, ["ExecStart=/usr/local/bin/k3s agent"]);
    assert!(u
        .unit_text
        .contains("EnvironmentFile=-/etc/systemd/system/k3s-agent.service.env"));
    // The server's unit is unchanged by the agent path.
    let server = steps_common::plan("http://127.0.0.1:9/", &pins());
    assert_eq!(k3s::units(&server).unit, "k3s.service");
}

#[test]
fn the_token_files_k3s_reads_itself_are_the_ones_the_k3s_step_fetches_from_key_vault() {
    assert_eq!(k3s::token_files(&agent()), ["/etc/kiln/secrets/k3s-token"]);
    let mut server = steps_common::plan("http://127.0.0.1:9/", &pins());
    assert!(k3s::token_files(&server).is_empty());
    server.k3s.config.insert(
        "agent-token-file".into(),
        serde_json::json!("/etc/kiln/secrets/k3s-agent-token"),
    );
    assert_eq!(
        k3s::token_files(&server),
        ["/etc/kiln/secrets/k3s-agent-token"]
    );
}
